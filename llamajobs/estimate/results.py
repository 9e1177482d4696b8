"""What `estimate hours` and `estimate memory` return: frozen dataclasses whose `to_json()` is the
command's `--json` document (CLI.md; frozen by tests/test_result_snapshots.py).

Fields are declared in the order of the document's keys, so `to_json` is the fields in order;
a field that a document carries only sometimes (`spec`, `predicted_tokens_per_s`) is left out while
it is None, as the documents did when they were dicts. Views read the attributes, never the keys.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from llamajobs.spec import JobSpec


def _json(value: Any) -> Any:
    if hasattr(value, "to_json"):
        return value.to_json()
    if isinstance(value, (tuple, list)):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value


class _Document:
    """`to_json()`: the fields in declaration order; those named in `_OPTIONAL` only when not None."""

    __slots__ = ()
    _OPTIONAL: frozenset[str] = frozenset()

    def to_json(self) -> dict[str, Any]:
        return {f.name: _json(getattr(self, f.name)) for f in fields(self)  # type: ignore[arg-type]
                if not (f.name in self._OPTIONAL and getattr(self, f.name) is None)}


@dataclass(frozen=True, kw_only=True, slots=True)
class StepPlan(_Document):
    """How the run would step: its micro-batch, whether auto picked it, how gradients accumulate."""
    micro_batch: int
    micro_batch_auto: bool
    micro_batches_per_step: int
    gradient_accumulation: str  # "none", "unsharded" or "sharded" (Plan.accumulation)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSummary(_Document):
    """The run `estimate hours` planned, as its flags resolved (ops adds it to a prediction)."""
    size: str
    mode: str
    strategy: str
    nodes: int
    gpus_per_node: int
    seq_len: int
    global_batch: int
    micro_batch: int
    micro_batch_auto: bool
    sharded_accumulation: bool

    @classmethod
    def of(cls, spec: JobSpec) -> RunSummary:
        return cls(size=spec.size, mode=spec.mode, strategy=spec.strategy, nodes=spec.nodes,
                   gpus_per_node=spec.gpus_per_node, seq_len=spec.seq_len, global_batch=spec.global_batch,
                   micro_batch=spec.micro_batch, micro_batch_auto=spec.micro_batch_auto,
                   sharded_accumulation=spec.sharded_accumulation)


@dataclass(frozen=True, kw_only=True, slots=True)
class PredictedHours(_Document):
    """`estimate hours` from the model (timing.hours)."""
    _OPTIONAL = frozenset({"spec"})

    hours_per_epoch: float | None  # None without a token count
    tokens_per_epoch: int | None
    tokens_per_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    peak: str  # the GPU's name
    peak_tflops: float
    gpu_mem_gib: float
    cpu_mem_gib: float
    fits: bool
    verdict: str
    step_s: float
    steps_per_epoch: float | None
    accumulation: int  # micro-batches per optimizer step
    plan: StepPlan
    time_parts_s: dict[str, float]  # compute_s, host_floor_s, ...: the step's terms
    expected_error: str
    largest_fitting_micro_batch: int | None
    source: str = "predicted"
    # fsdp strategies: the layout across nodes this run takes ("node" or "all"); None for the others
    shard_within: str | None = None
    # with several nodes: both layouts priced ("layouts": step_s, comm_s, gpu_mem_gib, verdict...) and why
    shard_within_choice: dict[str, Any] | None = None
    spec: RunSummary | None = None

    @property
    def measured(self) -> bool:
        return False


@dataclass(frozen=True, kw_only=True, slots=True)
class MeasuredHours(_Document):
    """`estimate hours JOB`: from the job's steady measured throughput (measured.hours_from_metrics)."""
    _OPTIONAL = frozenset({"predicted_tokens_per_s"})

    hours_per_epoch: float | None
    tokens_per_epoch: int | None
    tokens_per_s: float
    tokens_per_s_per_gpu: float | None
    mfu: float | None
    peak: str | None
    gpu_mem_gib: float | None
    cpu_mem_gib: None = None  # not measured; the key stays for scripts that read every hours document alike
    fits: bool = True
    step_s: float
    steady_steps: int
    step: int
    total_steps: int | None
    remaining_s: float | None
    remaining_hours: float | None
    checkpoint_s: float
    source: str = "measured"
    predicted_tokens_per_s: float | None = None  # the model's, on the card the job ran on (when in the catalog)

    @property
    def measured(self) -> bool:
        return True


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryRow(_Document):
    """One strategy of `estimate memory`: memory.memory()'s terms at the plan it would run, its speed."""
    strategy: str
    gpu_mem_gib: float
    cpu_mem_gib: float
    verdict: str
    gpu_verdict: str
    cpu_verdict: str
    gpu: str
    gpu_capacity_gib: float
    node_ram_gib: float
    gpu_parts_gib: dict[str, float]
    cpu_parts_gib: dict[str, float]
    tokens_per_s: float
    micro_batch: int
    accumulation: str


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryTable(_Document):
    strategies: tuple[MemoryRow, ...]
    recommended: str | None  # the fastest strategy that fits; None when none does


@dataclass(frozen=True, kw_only=True, slots=True)
class GridRow(_Document):
    """One size x strategy cell of the planning grid, at the plan it would run."""
    size: str
    strategy: str
    mode: str
    hours_per_epoch: float | None
    mfu: float
    tokens_per_s: float
    gpu_mem_gib: float
    cpu_mem_gib: float
    verdict: str
    micro_batch: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Grid(_Document):
    rows: tuple[GridRow, ...]
