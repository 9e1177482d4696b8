"""The run's event log: one JSONL file per writer (events/<host>-<pid>.jsonl), merged by time on read.

Files written from several hosts are never shared appends: on NFS/Lustre those interleave or tear.
"""

from __future__ import annotations

import json
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
    events = []
    for path in (Path(run_dir) / "events").glob("*.jsonl"):
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:  # a writer killed mid-line; the rest still counts
                continue
    return sorted(events, key=lambda e: e.get("time", 0))
