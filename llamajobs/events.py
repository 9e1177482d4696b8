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


def record(run_dir: str | Path, event: str, **fields: Any) -> None:
    folder = Path(run_dir) / "events"
    folder.mkdir(exist_ok=True)
    line = json.dumps({"time": time.time(), "event": event, "host": socket.gethostname(), **fields})
    with open(folder / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a") as f:
        f.write(line + "\n")


@dataclass(frozen=True, slots=True)
class History:
    """A run's events, oldest first, and how many lines were not events (torn by a writer killed
    mid-line, or damaged: not JSON, not an object, no event name, a time that is not a number)."""

    events: list[dict[str, Any]]
    bad_lines: int = 0


def history(run_dir: str | Path) -> History:
    """Every event file of the run merged by time; an unreadable file raises OSError."""
    events, bad = [], 0
    for path in sorted((Path(run_dir) / "events").glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if _is_event(event):
                events.append(event)
            elif line.strip():
                bad += 1
    return History(events=sorted(events, key=lambda e: e["time"]), bad_lines=bad)


def read(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's events, oldest first; lines that are not events are skipped."""
    return history(run_dir).events


def _is_event(value: Any) -> bool:
    if not isinstance(value, dict) or not isinstance(value.get("event"), str):
        return False
    when = value.get("time")
    return isinstance(when, (int, float)) and not isinstance(when, bool) and math.isfinite(when)
