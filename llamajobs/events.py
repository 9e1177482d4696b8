"""The run's event log: one JSONL file per writer (events/<host>-<pid>.jsonl), merged by time on read.

Files written from several hosts are never shared appends: on NFS/Lustre those interleave or tear.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any


def record(run_dir: str | Path, event: str, **fields: Any) -> None:
    folder = Path(run_dir) / "events"
    folder.mkdir(exist_ok=True)
    line = json.dumps({"time": time.time(), "event": event, "host": socket.gethostname(), **fields})
    with open(folder / f"{socket.gethostname()}-{os.getpid()}.jsonl", "a") as f:
        f.write(line + "\n")


def read(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every event, oldest first. Any line that is not an event (a writer killed mid-line, or
    damage: not JSON, not an object, no event name, a time that is not a number) is skipped; an
    unreadable file raises OSError."""
    events = []
    for path in sorted((Path(run_dir) / "events").glob("*.jsonl")):
        for line in path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if (isinstance(event, dict) and isinstance(event.get("event"), str)
                    and isinstance(event.get("time"), (int, float)) and not isinstance(event["time"], bool)
                    and math.isfinite(event["time"])):
                events.append(event)
    return sorted(events, key=lambda e: e["time"])
