"""The stop protocol's shared parts: the file in a run dir that steers the running workers (written by
launchers and the CLI, read by rank 0), and how much time a stop needs (the signal delay, the save)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from llamajobs import catalog

if TYPE_CHECKING:
    from llamajobs.spec import JobSpec

# Rank 0 checks for it at every optimizer-step boundary; all ranks then checkpoint that step and exit.
STOP_REQUEST = "stop-request"


def request_stop(run_dir: Path, reason: str) -> None:
    tmp = run_dir / f".{STOP_REQUEST}.tmp"
    tmp.write_text(json.dumps({"reason": reason, "time": time.time()}) + "\n")
    os.replace(tmp, run_dir / STOP_REQUEST)


# Seconds the node launcher waits for the workers to save and exit once it asked them to stop; the
# signal delay (signal_delay_s) leaves this much room before the time limit.
STOP_MARGIN_S = 30


def checkpoint_bytes(spec: JobSpec) -> float:
    """What a checkpoint holds: the trained parameters with Adam's state, ~16 bytes each in fp32 (a 7B
    full checkpoint is ~108 GB). A frozen base is not saved: a LoRA run's checkpoint is its adapter
    and the adapter's optimizer state (kilobytes for the tiny model, ~100 MB for 7B r8 q/v)."""
    return 16 * catalog.trained_params(spec.shape, spec.mode_info, spec.lora_r, spec.lora_targets,
                                       spec.num_virtual_tokens)


def save_seconds(spec: JobSpec, write_bytes_per_s: float = 1e9) -> float:
    """A checkpoint's predicted save time at the filesystem's speed: minutes for a 7B full one."""
    return checkpoint_bytes(spec) / write_bytes_per_s


def signal_delay_s(spec: JobSpec) -> int:
    """How long before the time limit SLURM signals: time to save a checkpoint, doubled, plus the
    margin for the workers to reach a step boundary; never below submitit's default 90 s."""
    return int(max(120, 2 * save_seconds(spec) + 2 * STOP_MARGIN_S))


def stop_wait_s(spec: JobSpec) -> int:
    """How long node 0's launcher waits for the save once it asked the workers to stop."""
    return max(60, signal_delay_s(spec) - STOP_MARGIN_S)
