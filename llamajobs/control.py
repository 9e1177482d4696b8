"""Files in a run dir that steer the running workers (written by launchers and the CLI, read by rank 0)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# Rank 0 checks for it at every optimizer-step boundary; all ranks then checkpoint that step and exit.
STOP_REQUEST = "stop-request"


def request_stop(run_dir: Path, reason: str) -> None:
    tmp = run_dir / f".{STOP_REQUEST}.tmp"
    tmp.write_text(json.dumps({"reason": reason, "time": time.time()}) + "\n")
    os.replace(tmp, run_dir / STOP_REQUEST)
