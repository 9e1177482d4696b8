"""Reading a file that something else wrote (a run dir's spec.json, job.json, events, metrics, logs):
regular files only, and never more than a bound.

A FIFO in place of a run dir's file would block open() and read() for ever, and a link to /dev/zero
would read until memory runs out; one such file must not hang or exhaust a command about every job.
So the file is opened without blocking (O_NONBLOCK: opening a FIFO returns at once) and its type is
checked on the opened descriptor, not by a stat before the open that the path could change after.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class Refused(OSError):
    """A file that is not read: not a regular file, or larger than any such file is. Its text is the
    reason alone (strerror; the path is in filename), for messages that name the path themselves."""

    def __str__(self) -> str:
        return self.strerror


def open_regular(path: str | Path) -> BinaryIO:
    """The file opened for binary reading; OSError (FileNotFoundError when missing) unless it is a
    regular file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in KINDS if test(mode)), "not a regular file")
            raise Refused(errno.EINVAL, f"is {kind}, not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | Path, limit: int) -> bytes:
    """The whole file; OSError when it is not a regular file or holds more than `limit` bytes."""
    chunks, total = [], 0
    with open_regular(path) as f:
        # in pieces: read(limit) would allocate all of `limit` up front, whatever the file's size
        while total <= limit and (chunk := f.read(min(1 << 16, limit + 1 - total))):
            chunks.append(chunk)
            total += len(chunk)
    if total > limit:
        raise Refused(errno.EFBIG, f"is larger than {limit:,} bytes, more than such a file ever holds", str(path))
    return b"".join(chunks)


def read_text(path: str | Path, limit: int, errors: str = "strict") -> str:
    """read_bytes decoded as UTF-8 (UnicodeDecodeError, a ValueError, when it is not, unless `errors`)."""
    return read_bytes(path, limit).decode("utf-8", errors)


def tail(f: BinaryIO, nbytes: int) -> tuple[bytes, bool]:
    """The last `nbytes` of an open file, and whether that is less than the whole file."""
    size = os.fstat(f.fileno()).st_size
    if size > nbytes:
        f.seek(size - nbytes)
    return f.read(nbytes), size > nbytes


def lines(f: BinaryIO, max_line: int, chunk: int = 1 << 16) -> Iterator[bytes | None]:
    """The file's lines (without their end), read a chunk at a time: memory stays within about
    `chunk` + `max_line` bytes whatever the file holds. A line longer than `max_line` is yielded as
    None (damage: no line of ours is that long) and is never held whole."""
    partial, overlong = b"", False
    while block := f.read(chunk):
        pieces = (partial + block).split(b"\n")
        partial = pieces.pop()
        for piece in pieces:
            yield None if overlong or len(piece) > max_line else piece
            overlong = False
        if len(partial) > max_line:  # skip the rest of this line as it comes
            partial, overlong = b"", True
    if partial or overlong:
        yield None if overlong or len(partial) > max_line else partial
