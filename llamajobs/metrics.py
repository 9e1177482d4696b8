"""One typed metrics row: rank 0 of the worker appends them to RUN_DIR/metrics.jsonl; status, estimate
and plot read them back. No torch here: the login node reads rows without it."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True, kw_only=True, slots=True)
class MetricsRow:
    step: int
    total_steps: int
    epoch: float  # epochs done, fractional
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # trained on so far
    tokens_per_s: float  # all ranks, over the steps since the previous row
    tokens_per_s_per_gpu: float  # per worker process (one per GPU)
    mfu: float | None  # model FLOPs over `peak`'s FLOP/s; None for a card the catalog does not know
    peak: str  # the device whose peak the MFU is over (a catalog GPU, or cpu-nominal)
    peak_flops: float | None
    step_time_s: float
    elapsed_s: float  # since this attempt started training
    time: float  # wall clock (time.time()) when the row was written
    mem_gib: float  # peak per process: GPU memory allocated, or RSS on the CPU
    data_wait_s: float = 0.0  # host seconds per step waiting for the next batch
    data_wait_frac: float = 0.0  # the same as a share of the step time
    checkpoint_s: float = 0.0  # seconds spent saving checkpoints since the previous row
    val_loss: float | None = None  # validation loss on the eval split, on the rows of the steps it ran
    val_s: float = 0.0  # seconds that validation took (left out of step_time_s)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_mapping(cls, data: Any) -> MetricsRow:
        """A row from one parsed JSON line; ValueError naming the field when it is not a row."""
        if not isinstance(data, dict):
            raise ValueError(f"not an object: {type(data).__name__}")
        values = {}
        for field in dataclasses.fields(cls):
            if field.name not in data:
                if field.default is dataclasses.MISSING:
                    raise ValueError(f"no {field.name!r}")
                continue
            values[field.name] = _typed(field, data[field.name])
        return cls(**values)


def _typed(field: dataclasses.Field, value: Any) -> Any:
    kind = str(field.type)
    if value is None and "None" in kind:
        return None
    if isinstance(value, bool) or (kind == "str") != isinstance(value, str):
        raise ValueError(f"{field.name} {value!r} is not a {kind}")
    if kind == "str":
        return value
    if not isinstance(value, (int, float)) or not math.isfinite(value) and field.name != "loss":
        raise ValueError(f"{field.name} {value!r} is not a {kind}")
    return int(value) if kind == "int" else float(value)


@dataclass(frozen=True, slots=True)
class Metrics:
    """What a run's metrics.jsonl holds: its rows, and how many lines were not rows (torn by a
    writer still writing, or damaged)."""

    rows: list[MetricsRow]
    bad_lines: int = 0

    @property
    def last(self) -> MetricsRow | None:
        return self.rows[-1] if self.rows else None


def read(run_dir: Path, tail_bytes: int | None = 65536) -> Metrics:
    """metrics.jsonl, or only its last lines. A missing file is no rows; an unreadable one raises OSError."""
    path = Path(run_dir) / METRICS_FILE
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return Metrics(rows=[])
    with f:
        size = path.stat().st_size
        if tail_bytes is not None and size > tail_bytes:
            f.seek(size - tail_bytes)
            lines = f.read().decode(errors="replace").splitlines()[1:]  # the first line of a tail is cut
        else:
            lines = f.read().decode(errors="replace").splitlines()
    rows, bad = [], 0
    for line in lines:
        try:
            rows.append(MetricsRow.from_mapping(json.loads(line)))
        except ValueError:  # json's errors are ValueErrors too
            bad += 1
    return Metrics(rows=rows, bad_lines=bad)
