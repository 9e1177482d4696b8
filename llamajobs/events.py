"""The run's event log: one JSONL file per writer (events/<host>-<pid>.jsonl), merged by time on read.

Files written from several hosts are never shared appends: on NFS/Lustre those interleave or tear.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamajobs import files

# An events file holds a few hundred bytes per save, signal and attempt; a larger one is damage, left
# unread (every status call reads every running job's events).
MAX_FILE_BYTES = 16 << 20


def record(run_dir: str | Path, event: str, **fields: Any) -> None:
    folder = Path(run_dir) / "events"
    folder.mkdir(exist_ok=True)
    line = json.dumps({"time": time.time(), "event": event, "host": socket.gethostname(), **fields})
    with open(folder / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a") as f:
        f.write(line + "\n")


@dataclass(frozen=True, slots=True)
class History:
    """A run's events, oldest first, how many lines were not events (torn by a writer killed
    mid-line, or damaged: not JSON, not an object, no event name, a time that is not a number), and
    the files that could not be read at all (unreadable, too large, a FIFO or device: not a regular file)."""

    events: list[dict[str, Any]]
    bad_lines: int = 0
    unread: tuple[str, ...] = ()


def history(run_dir: str | Path) -> History:
    """Every event file of the run merged by time; never raises for a file it cannot read (`unread` names it)."""
    events, bad, unread = [], 0, []
    for path in sorted((Path(run_dir) / "events").glob("*.jsonl")):
        try:
            text = files.read_text(path, MAX_FILE_BYTES, errors="replace")
        except OSError as e:
            unread.append(f"events/{path.name} {e.strerror or e}")
            continue
        for line in text.splitlines():
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                event = None
            if _is_event(event):
                events.append(event)
            elif line.strip():
                bad += 1
    return History(events=sorted(events, key=lambda e: e["time"]), bad_lines=bad, unread=tuple(unread))


def read(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's events, oldest first; lines that are not events, and files that cannot be read, are skipped."""
    return history(run_dir).events


def _is_event(value: Any) -> bool:
    if not isinstance(value, dict) or not isinstance(value.get("event"), str):
        return False
    when = value.get("time")
    if not isinstance(when, (int, float)) or isinstance(when, bool):
        return False
    try:
        return math.isfinite(when)
    except OverflowError:  # an integer beyond float's range
        return False


@dataclass(frozen=True, slots=True)
class Attempt:
    """One run of the job between two requeues, as `status JOB` shows it."""

    number: int
    nodes: str | None  # SLURM's node list (n[1-2]), else the hosts the workers reported
    resumed_step: int | None  # the checkpoint it resumed from; None: from the start
    end: str  # how it ended: "stopped at step 23 (preempted)", "node failure (n2)", "finished at step 120", ...


def attempts(events: list[dict[str, Any]]) -> list[Attempt]:
    """The job's attempts from its events: each worker start opens one; the launcher's `attempt` event
    (SLURM) names the nodes and says how the attempt before it ended in the cluster's words."""
    found: list[dict[str, Any]] = []
    nodes = None
    for e in events:
        kind = e["event"]
        if kind == "attempt":
            nodes = e.get("hosts")
            if found and e.get("previous_state") and not found[-1]["end"].startswith(("stopped", "finished")):
                failed = ", ".join(e.get("failed_nodes") or [])
                state = e["previous_state"]
                found[-1]["end"] = ("node failure" if state == "NODE_FAIL" else state.lower()) + (f" ({failed})" if failed else "")
        elif kind == "started":
            hosts = e.get("hosts")
            found.append({"number": len(found), "nodes": nodes or (" ".join(hosts) if isinstance(hosts, list) else None),
                          "resumed_step": None, "end": "running", "signal": None})
            nodes = None
        elif not found:
            continue
        elif kind == "resumed":
            found[-1]["resumed_step"] = e.get("step")
        elif kind == "signalled":
            # (after a stop, the requeue's own SIGTERM reaches the other nodes' launchers: not an end)
            if e.get("verdict") in ("cancelled", "requeued") and found[-1]["end"] == "running":
                found[-1]["end"] = e["verdict"] if e["verdict"] == "cancelled" else "requeued by the cluster"
            elif found[-1]["signal"] is None:
                found[-1]["signal"] = e.get("verdict")
        elif kind == "stopped":
            found[-1]["end"] = f"stopped at step {e.get('step')}" + (f" ({found[-1]['signal']})" if found[-1]["signal"] else "")
        elif kind == "finished":
            found[-1]["end"] = f"finished at step {e.get('step')}" if e.get("step") is not None else "finished"
    return [Attempt(number=a["number"], nodes=a["nodes"], resumed_step=a["resumed_step"], end=a["end"]) for a in found]
