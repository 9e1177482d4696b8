"""How `data prepare` reads its input files into records, each with its file line for error messages.

Files are JSON lines (optionally .gz), a JSON list of records, or one JSON document that the format
expands into records (LMFlow's {"type", "instances"}; PubMedQA's {pmid: record}). JSON lines are
handed on as raw bytes so that parsing happens in the worker processes; records of a list or a
document are parsed here.

What a file holds is read as it is, or refused at its line: only whitespace may follow a JSON
list's closing bracket, bytes that are not UTF-8 make their record a bad line (never silently
replaced), and a record nested deeper than MAX_NESTING levels is a bad line too (deeper ones would
exhaust Python's recursion where they are parsed or copied to a worker).
"""

from __future__ import annotations

import gzip
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from llamajobs.data.formats import BadRecord, Format

class CountingReader(io.RawIOBase):
    """A raw file whose position is the progress (for .gz the compressed bytes read)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f
        self.position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        self.position += n or 0
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def open_binary(path: Path) -> tuple[BinaryIO, CountingReader]:
    """The file's decompressed bytes (gzip by the .gz suffix), and the raw reader counting bytes."""
    raw = CountingReader(open(path, "rb", buffering=0))
    buffered = io.BufferedReader(raw, 1 << 20)
    if path.suffix == ".gz":
        return io.BufferedReader(gzip.GzipFile(fileobj=buffered), 1 << 20), raw  # type: ignore[arg-type]
    return buffered, raw


def iter_records(path: Path, fmt: Format) -> Iterator[tuple[int, Any]]:
    """(line, record) of every record of a file, in order: a JSON line's raw bytes (parsed later, in a
    worker), or a parsed record from a JSON list or a whole-file document. Blank lines are skipped.

    Raises FileError when the file's structure itself is broken (a JSON list that stops parsing),
    since nothing after that point can be read.
    """
    f, _ = open_binary(path)
    with f:
        yield from records(path, f, fmt)


def records(path: Path, f: BinaryIO, fmt: Format) -> Iterator[tuple[int, Any]]:
    first, number = b"", 0
    while not first.strip():  # leading blank lines
        first = f.readline()
        number += 1
        if not first:
            return
    if first.lstrip()[:1] == b"[":
        yield from _json_list(path, first, f, number)
        return
    if not _parses(first) and type(fmt).expand is not Format.expand:
        # A pretty-printed document (LMFlow's {"type", "instances"}, PubMedQA's {pmid: record}):
        # formats with such documents are small; anything else is JSON lines, its first line bad.
        data = first + f.read()
        try:
            document = json.loads(data)
        except ValueError:
            pass
        except RecursionError:
            raise FileError(path, number, f"the JSON document nests deeper than {MAX_NESTING} levels") from None
        else:
            try:
                for record in fmt.expand(document):
                    yield number, record
            except BadRecord as e:
                raise FileError(path, number, str(e)) from None
            return
        for offset, line in enumerate(data.split(b"\n")):
            if line.strip():
                yield number + offset, line
        return
    yield number, first
    for number, line in enumerate(f, number + 1):
        if line.strip():
            yield number, line


def _parses(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except RecursionError:  # JSON, too deep to parse: a JSON line that parse_record reports
        return True
    except ValueError:
        return False


def _json_list(path: Path, first: bytes, f: BinaryIO, line: int, chunk: int = 1 << 20) -> Iterator[tuple[int, Any]]:
    """The elements of a JSON list, read incrementally (memory: one chunk plus one element)."""
    decoder = json.JSONDecoder()
    # Bytes that are not UTF-8 become lone surrogates, which valid UTF-8 never decodes to: the
    # element holding them is a bad line (skippable), the list around it stays readable.
    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape")
    buffer = first.decode("utf-8", "surrogateescape")
    pos = buffer.index("[") + 1
    eof = False
    while True:
        while True:  # whitespace and the comma between elements, counting lines
            while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                line += buffer[pos] == "\n"
                pos += 1
            if pos < len(buffer) or eof:
                break
            buffer, pos = text.read(chunk), 0
            eof = not buffer
        if pos >= len(buffer):
            raise FileError(path, line, "the JSON list is not closed with ]")
        if buffer[pos] == "]":
            _nothing_after(path, buffer[pos + 1:], text, line, chunk)
            return
        while True:
            try:
                record, end = decoder.raw_decode(buffer, pos)
                break
            except RecursionError:  # the decoder cannot find where this record ends, so nothing after it is read
                reason = f"a record nests deeper than {MAX_NESTING} levels; a JSON list cannot be read past it"
                raise FileError(path, line, reason) from None
            except json.JSONDecodeError as e:
                more = "" if eof else text.read(chunk)
                if not more:
                    bad_line = line + buffer.count("\n", pos, e.pos)
                    reason = f"not valid JSON ({e.msg}); a JSON list cannot be read past it"
                    raise FileError(path, bad_line, reason) from None
                buffer, pos = buffer[pos:] + more, 0
            except ValueError as e:  # (an integer of more digits than Python converts)
                raise FileError(path, line, f"not valid JSON ({e}); a JSON list cannot be read past it") from None
        if not is_utf8(buffer[pos:end]):
            record = Unreadable("not valid UTF-8")
        yield line, record
        line += buffer.count("\n", pos, end)
        pos = end


def _nothing_after(path: Path, rest: str, text: io.TextIOWrapper, line: int, chunk: int) -> None:
    """After a JSON list's closing bracket only whitespace may follow: anything else (a second list,
    JSON lines appended to the file) would otherwise be dropped without a word."""
    while rest:
        stripped = rest.lstrip()
        if stripped:
            where = line + rest.count("\n", 0, len(rest) - len(stripped))
            raise FileError(path, where, "text after the closing ] of the JSON list; a file holds one JSON list, "
                                         "or JSON lines")
        line += rest.count("\n")
        rest = text.read(chunk)


def is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # (fails only on a lone surrogate: bytes that were not UTF-8)
        return True
    except UnicodeEncodeError:
        return False


class FileError(Exception):
    """A file whose structure is broken at a line (nothing after it can be read)."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        super().__init__(reason)
        self.path, self.line, self.reason = path, line, reason


@dataclass(frozen=True, slots=True)
class Unreadable:
    """What a reader yields in place of a record it could not take (a csv row of the wrong width, a
    csv row or JSON-list element that is not UTF-8, a record nested too deeply): the worker reports
    it as a bad line, which --skip-bad-lines skips."""
    reason: str


# Real records nest a few levels (a conversation's turns); far deeper ones would exhaust Python's
# recursion where the record is copied to a worker process or parsed.
MAX_NESTING = 100
TOO_DEEP = f"nested deeper than {MAX_NESTING} levels"


def too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    """Whether lists and objects nest in the value deeper than the limit (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def checked(record: Any) -> Any:
    """A record parsed in the reading process, or Unreadable when it nests too deeply to hand on."""
    return Unreadable(TOO_DEEP) if too_deep(record) else record


def parse_record(payload: Any) -> Any:
    """A record from what iter_records yielded: JSON lines are parsed here (in the worker)."""
    if isinstance(payload, Unreadable):
        raise BadRecord(payload.reason)
    if isinstance(payload, (bytes, str)):
        try:
            record = json.loads(payload)
        except UnicodeDecodeError:
            raise BadRecord("not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise BadRecord(f"not valid JSON ({e.msg} at column {e.colno})") from None
        except ValueError as e:  # (an integer of more digits than Python converts)
            raise BadRecord(f"not valid JSON ({e})") from None
        except RecursionError:
            raise BadRecord(TOO_DEEP) from None
        if too_deep(record):
            raise BadRecord(TOO_DEEP)
        return record
    return payload
