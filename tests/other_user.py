"""Run a function as an unprivileged user, for what permissions decide: root reads and writes
anything, so as root (CI containers) the function runs in a forked child as `nobody`."""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

NOBODY = 65534


def as_other_user(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args), or the exception it raised (returned, not raised). Its paths must be reachable
    by `nobody` when we are root: make them under open_tmp()."""
    if os.getuid() != 0:
        try:
            return fn(*args)
        except Exception as e:
            return e
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop to nobody, run, send back the outcome, never return into pytest
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            outcome: Any = fn(*args)
        except Exception as e:
            outcome = e
        with os.fdopen(write, "wb") as f:
            pickle.dump(outcome, f)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(data)


@contextmanager
def open_tmp() -> Iterator[Path]:
    """A temporary folder every user can reach (pytest's tmp_path is root's own when we are root)."""
    folder = Path(tempfile.mkdtemp(prefix="llamajobs-perm-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir() and not path.is_symlink():
                path.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)
