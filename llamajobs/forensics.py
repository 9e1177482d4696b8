"""Log forensics of a job: its logs, each rank's, the first error (which rank, where, why), what a
collective timeout means, and whether it ran out of memory. Reads the run dir only; a log or error
file that is damaged or half-written is passed over."""

from __future__ import annotations

import json
import re
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path

from llamajobs import files
from llamajobs.registry import Job

# How gloo and NCCL say that a collective waited out its timeout: the rank that reports it is the
# one that waited, not the one that stopped.
COLLECTIVE_TIMEOUTS = ("Timed out waiting", "collective operation timeout")
ERROR_FILE_BYTES = 4 << 20  # torchrun's error.json: a message and a traceback
TRACEBACK = b"Traceback (most recent call last)"


def collective_timeout_hint(error: str | None) -> str | None:
    """What a collective timeout means, when the first error is one."""
    if error is None or not any(text in error for text in COLLECTIVE_TIMEOUTS):
        return None
    return ("a collective timed out: this rank waited --collective-timeout-minutes for a rank that stopped "
            "answering (hung, or its node died); that rank's log is the one that ends earliest")



def log_files(job: Job) -> list[Path]:
    """Every log of the job: submitit's per-node logs, then the per-rank worker logs."""
    submitit_logs = sorted((job.run_dir / "submitit").glob("*_log.*"))
    rank_logs = sorted((job.run_dir / "logs").glob("attempt-*/node-*/**/std*.log"))
    return submitit_logs + rank_logs


def _numbered(folder: Path, pattern: str) -> list[tuple[int, Path]]:
    """The entries matching `pattern` whose name ends in -N or is N, by N; others are not ours."""
    found = []
    for path in folder.glob(pattern):
        number = path.name.rpartition("-")[2]
        if number.isdigit() and path.is_dir():
            found.append((int(number), path))
    return sorted(found)


def _rank_dirs(job: Job) -> list[tuple[int, Path, Path]]:
    """(global rank, the rank's torchrun log dir, its node dir) for every attempt, oldest first.
    torchrun's layout under our per-attempt, per-node folder is <run id>/attempt_0/<local rank>/;
    ranks are node-major."""
    found = []
    for _, attempt in _numbered(job.run_dir / "logs", "attempt-*"):
        nodes = [node for _, node in _numbered(attempt, "node-*")]
        local_dirs = [sorted({p.parent for p in node.glob("*/attempt_*/*/std*.log") if p.parent.name.isdigit()},
                             key=lambda p: int(p.name))
                      for node in nodes]
        procs = max((len(d) for d in local_dirs), default=0)
        for node_rank, dirs in enumerate(local_dirs):
            found += [(node_rank * procs + int(local.name), local, nodes[node_rank]) for local in dirs]
    return found


def rank_logs(job: Job) -> dict[int, list[Path]]:
    """Each global rank's logs, oldest attempt first."""
    found: dict[int, list[Path]] = {}
    for rank, local, _ in _rank_dirs(job):
        found.setdefault(rank, []).extend(sorted(local.glob("std*.log")))
    return found


@dataclass(frozen=True, slots=True)
class FirstError:
    rank: int
    host: str
    message: str
    log: Path
    time: float


def first_error(job: Job) -> FirstError | None:
    """The earliest error a rank reported (torchrun's error.json, written by the worker's @record),
    or the earliest death without one that torchrun saw (a rank killed, or crashed in native code):
    later errors are usually other ranks noticing that one died. Times are whole seconds; at the same
    second a death without a Python error comes first (the others' errors are their reaction to it)."""
    found = []  # (time, 1 for a Python error or 0 for a death without one, rank, the error)
    newest: dict[int, tuple[Path, Path]] = {}  # rank -> (its log dir, its node dir), newest attempt
    for rank, local, node in _rank_dirs(job):
        newest[rank] = (local, node)
        try:
            info = json.loads(files.read_bytes(local / "error.json", ERROR_FILE_BYTES))["message"]
            when = float(info.get("extraInfo", {}).get("timestamp", 0))
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, OverflowError):
            continue  # none, half-written, or damaged
        error = FirstError(rank=rank, host=_host(node), message=str(info.get("message", "")).strip(),
                           log=local / "stderr.log", time=when)
        found.append((error.time, 1, rank, error))
    for death in torchrun_deaths(job):
        if death.rank in newest:
            local, node = newest[death.rank]
            death = replace(death, host=_host(node, death.host), log=local / "stderr.log")
        found.append((death.time, 0, death.rank, death))
    return min(found, key=lambda f: f[:3], default=(None,) * 4)[3]


# torchrun's summary of a failed launch, at the end of its output (the node launcher's log):
#   Root Cause (first observed failure):
#   [0]:
#     time      : 2026-11-28_02:21:45
#     host      : gpu003
#     rank      : 1 (local_rank: 1)
#     exitcode  : -9 (pid: 9638)
#     error_file: <N/A>
ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):\s*\[\d+\]:\s*time\s*:\s*(?P<time>\S+)\s*"
                        r"host\s*:\s*(?P<host>\S+)\s*rank\s*:\s*(?P<rank>\d+)[^\n]*\s*"
                        r"exitcode\s*:\s*(?P<code>-?\d+)[^\n]*\s*error_file:\s*(?P<file>\S+)")


def torchrun_deaths(job: Job, tail_bytes: int = 65536) -> list[FirstError]:
    """The ranks whose death torchrun reported as a node's first failure with no error file: they
    left no Python error (killed by a signal, os._exit, a crash in native code). Ranks that did
    leave one are found through their error.json."""
    deaths = []
    for path in sorted((job.run_dir / "submitit").glob("*_log.err")):
        try:
            with files.open_regular(path) as f:
                text = files.tail(f, tail_bytes)[0].decode(errors="replace")
            mtime = path.stat().st_mtime
        except OSError:
            continue
        for match in ROOT_CAUSE.finditer(text):
            if match["file"] != "<N/A>":
                continue
            code = int(match["code"])
            how = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                   else f"exited with code {code}")
            try:
                when = time.mktime(time.strptime(match["time"], "%Y-%m-%d_%H:%M:%S"))
            except (ValueError, OverflowError):
                when = mtime
            deaths.append(FirstError(rank=int(match["rank"]), host=match["host"], log=path, time=when,
                                     message=f"the process {how} without a Python error (killed, out of host "
                                             f"memory, or crashed in native code)"))
    return deaths


def _host(node: Path, default: str = "?") -> str:
    try:
        return files.read_text(node / "host", 4096, errors="replace").strip() or default
    except OSError:
        return default


OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory")


def is_out_of_memory(error: FirstError | None) -> bool:
    return error is not None and any(m in error.message for m in OOM_MARKERS)


def traceback_log(job: Job) -> Path | None:
    """The log that holds the root-cause traceback: the first failing rank's, else any worker log
    with a traceback, before submitit's."""
    if (error := first_error(job)) is not None:
        return error.log
    for path in sorted(log_files(job), key=lambda p: "submitit" in p.parts):
        if _holds_traceback(path):
            return path
    return None


def _holds_traceback(path: Path) -> bool:
    """Whether the log holds a traceback, read a chunk at a time (a log may be gigabytes); a log that
    cannot be read, or is no regular file, holds none."""
    try:
        with files.open_regular(path) as f:
            carry = b""
            while chunk := f.read(1 << 20):
                if TRACEBACK in carry + chunk:
                    return True
                carry = chunk[-len(TRACEBACK):]
    except OSError:
        pass
    return False
