"""One typed metrics row: rank 0 of the worker appends them to RUN_DIR/metrics.jsonl; status, estimate
and plot read them back. No torch here: the login node reads rows without it."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamajobs import files

METRICS_FILE = "metrics.jsonl"
TAIL_BYTES = 65536  # what `status` reads of each job: the last ~150 rows
MAX_LINE = 65536  # a row is about 500 bytes; a longer line is damage, skipped without being held whole
# A whole-file read keeps at most this many rows (a 170 MB file holds ~400,000): enough for plot's
# curves and the sparkline, while memory stays bounded whatever the file's length (see Thinned).
MAX_ROWS = 2048
# Numbers beyond this are damage, not measurements (10**18 tokens, seconds or FLOP/s is beyond any run):
# refused when read, so that no sum, product or date of them overflows downstream.
MAX_MAGNITUDE = 1e18


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
    # --objective dpo (loss is then the mean pair loss), means over the step's pairs; rewards are
    # beta x (policy - reference) log-probabilities of an answer
    reward_accuracy: float | None = None  # the share of pairs whose chosen answer's reward is the higher
    reward_margin: float | None = None  # chosen's reward minus rejected's
    chosen_logp: float | None = None  # the policy's log-probability of the chosen answer (summed over its tokens)
    rejected_logp: float | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_mapping(cls, data: Any) -> MetricsRow:
        """A row from one parsed JSON line; ValueError naming the field when it is not a row."""
        if not isinstance(data, dict):
            raise ValueError(f"not an object: {type(data).__name__}")
        values = {}
        for name, kind, required in _ROW_FIELDS:
            if name not in data:
                if required:
                    raise ValueError(f"no {name!r}")
                continue
            values[name] = _typed(name, kind, data[name])
        return cls(**values)


# (name, type, required) of each field, looked up once: a long metrics file is read row by row
_ROW_FIELDS = tuple((f.name, str(f.type), f.default is dataclasses.MISSING) for f in dataclasses.fields(MetricsRow))


def _typed(name: str, kind: str, value: Any) -> Any:
    if type(value) in (int, float) and kind != "str":  # the common case first; type(): a bool is no number here
        try:
            number = float(value)  # an integer of 400 digits is beyond float's range: OverflowError
        except OverflowError:
            raise ValueError(f"{name} is a number beyond any measurement") from None
        if -MAX_MAGNITUDE <= number <= MAX_MAGNITUDE:
            return int(value) if kind == "int" else number
        if name == "loss" and not math.isfinite(number):  # a diverged step's loss is kept (and shown as such)
            return number
        raise ValueError(f"{name} {number!r} is not a {kind} within ±{MAX_MAGNITUDE:g}")
    if value is None and "None" in kind or kind == "str" and isinstance(value, str):
        return value
    raise ValueError(f"{name} {value!r} is not a {kind}")


@dataclass(frozen=True, slots=True)
class Metrics:
    """What a run's metrics.jsonl holds: its rows, and how many lines were not rows (torn by a
    writer still writing, or damaged)."""

    rows: list[MetricsRow]
    bad_lines: int = 0

    @property
    def last(self) -> MetricsRow | None:
        return self.rows[-1] if self.rows else None


def read(run_dir: Path, tail_bytes: int | None = TAIL_BYTES, max_rows: int | None = None) -> Metrics:
    """metrics.jsonl's last `tail_bytes`; or (None) the whole file in one streamed pass, thinned to at
    most `max_rows` rows (default MAX_ROWS; Thinned: the measured throughput stays exact). Memory is
    bounded either way.
    A missing file is no rows; one that cannot be read, or is no regular file, raises OSError."""
    try:
        f = files.open_regular(Path(run_dir) / METRICS_FILE)
    except FileNotFoundError:
        return Metrics(rows=[])
    with f:
        if tail_bytes is None:
            thinned, bad = Thinned(max_rows or MAX_ROWS), 0
            for line in files.lines(f, MAX_LINE):
                row = parse(line) if line is not None else None
                if row is None:
                    bad += 1
                else:
                    thinned.add(row)
            return Metrics(rows=thinned.rows(), bad_lines=bad)
        text, cut = files.tail(f, tail_bytes)
    lines = text.split(b"\n")[1 if cut else 0:]  # the first line of a tail is cut
    if lines and not lines[-1]:
        lines.pop()
    parsed = [parse(line) for line in lines]
    rows = [row for row in parsed if row is not None]
    return Metrics(rows=rows, bad_lines=len(parsed) - len(rows))


def parse(line: bytes) -> MetricsRow | None:
    """One line of metrics.jsonl as a row; None when it is not one (torn, damaged, a value out of range)."""
    try:
        return MetricsRow.from_mapping(json.loads(line.decode(errors="replace")))
    except (ValueError, RecursionError):  # json's errors are ValueErrors too
        return None


@dataclass(slots=True)
class _Span:
    """A run of neighbouring rows: the last (its step, loss, rates: a sample of the curves) and what
    the run adds up to. steps 0: a row never merged (the warm-up of an attempt, the first row of an
    attempt, a row without a step time)."""

    row: MetricsRow
    steps: int  # optimizer steps the run's step times cover
    seconds: float = 0.0  # sum of step_time_s x steps: the run's step time is seconds / steps
    wait_s: float = 0.0  # the same for data_wait_s and data_wait_frac
    wait_frac: float = 0.0
    checkpoint_s: float = 0.0
    mem_gib: float = 0.0
    validated: MetricsRow | None = None  # the run's last row with a validation loss
    merged: bool = False

    @classmethod
    def of(cls, row: MetricsRow, steps: int) -> _Span:
        return cls(row, steps, row.step_time_s * steps, row.data_wait_s * steps, row.data_wait_frac * steps,
                   row.checkpoint_s, row.mem_gib, row if row.val_loss is not None else None)

    def __add__(self, later: _Span) -> _Span:
        return _Span(later.row, self.steps + later.steps, self.seconds + later.seconds, self.wait_s + later.wait_s,
                     self.wait_frac + later.wait_frac, self.checkpoint_s + later.checkpoint_s,
                     max(self.mem_gib, later.mem_gib), later.validated or self.validated, merged=True)

    def as_row(self) -> MetricsRow:
        """The last row, with the run's step time, data wait and checkpoint seconds, its memory peak and
        its last validation: a row is written only when read, not on each merge."""
        if not self.merged:
            return self.row
        validated = self.validated or self.row
        return dataclasses.replace(self.row, step_time_s=self.seconds / self.steps, data_wait_s=self.wait_s / self.steps,
                                   data_wait_frac=self.wait_frac / self.steps, checkpoint_s=self.checkpoint_s,
                                   mem_gib=self.mem_gib, val_loss=validated.val_loss, val_s=validated.val_s)


class Thinned:
    """At most `max_rows` rows of a stream, kept in bounded memory: when there are too many, runs of
    neighbouring steady rows of one attempt are merged into their last row, whose step_time_s becomes
    the mean over the run's steps (and whose checkpoint seconds the sum, memory the peak). So every
    interval's seconds, the measured throughput of estimate/measured.py, stays what it was; each
    curve keeps a sample of rows, and a merged row the last validation loss of its run (shown at the
    run's last step). The first KEEP_WARMUP_STEPS steps of each attempt are never merged (measured.py
    leaves an attempt's warm-up out by its steps). A file of fewer than `max_rows` rows is kept whole."""

    KEEP_WARMUP_STEPS = 100  # >= Assumptions.warmup_steps (5)

    def __init__(self, max_rows: int) -> None:
        self.max_rows = max(2, max_rows)
        self.spans: list[_Span] = []
        self.width = 0  # the most steps a merged span covers; doubled when the rows are too many
        self.prev_step, self.prev_elapsed, self.attempt_start = 0, None, 0

    def add(self, row: MetricsRow) -> None:
        steps = 0
        if row.step and row.step_time_s > 0:  # the rows measured.py times, followed as it follows them
            if self.prev_elapsed is not None and (row.elapsed_s < self.prev_elapsed or row.step <= self.prev_step):
                self.attempt_start = row.step - max(1, round(row.elapsed_s / max(row.step_time_s, 1e-9)))
                self.prev_step = max(self.attempt_start, 0)  # a new attempt: never merged with the one before
            elif self.prev_step - self.attempt_start >= self.KEEP_WARMUP_STEPS:
                steps = row.step - self.prev_step
            self.prev_step, self.prev_elapsed = row.step, row.elapsed_s
        span = _Span.of(row, steps)
        if self.spans and self._mergeable(self.spans[-1], span):
            self.spans[-1] += span
        else:
            self.spans.append(span)
        if len(self.spans) > 2 * self.max_rows:
            self._compact()

    def rows(self) -> list[MetricsRow]:
        self._compact()
        return [s.as_row() for s in self.spans]

    def _mergeable(self, a: _Span, b: _Span) -> bool:
        return a.steps > 0 and b.steps > 0 and a.steps + b.steps <= self.width

    def _compact(self) -> None:
        while len(self.spans) > self.max_rows:
            pairs = [a.steps + b.steps for a, b in zip(self.spans, self.spans[1:]) if a.steps and b.steps]
            if not pairs:  # nothing steady to merge (a damaged file: every row a new attempt): keep every other
                self.spans = self.spans[::-1][::2][::-1]
                continue
            self.width = max(2 * self.width, min(pairs))
            merged: list[_Span] = []
            for span in self.spans:
                if merged and self._mergeable(merged[-1], span):
                    merged[-1] += span
                else:
                    merged.append(span)
            self.spans = merged
