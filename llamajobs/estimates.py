"""The operations of `llamajobs estimate` (and of sweeps and presets, which price runs the same way):
the planning grid, a run's predicted hours, the memory table, a job's measured hours. Typed results
(estimate.results); no click, no rich."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamajobs import catalog, estimate, events, site
from llamajobs.errors import Failure, SpecError
from llamajobs.fit import accelerator, node_ram_gib, plan_for_gpu
from llamajobs.ops import build_spec, job_metrics, training_job
from llamajobs.spec import JobSpec

def assumptions(assume: tuple[str, ...]) -> estimate.Assumptions:
    """--assume NAME=VALUE overrides of the estimator's constants."""
    pairs = {}
    for item in assume:
        name, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"--assume {item!r} is malformed; use NAME=VALUE, e.g. network_gbps=100")
        pairs[name.strip()] = value.strip()
    try:
        return estimate.with_overrides(pairs)
    except ValueError as e:
        raise SpecError(str(e)) from None




def _grid_axis(flags: dict[str, Any], name: str, known: list[str]) -> list[str] | None:
    raw = flags.get(name)
    if raw is None or ("," not in raw and raw != "all"):
        return None
    items = known if raw == "all" else [v.strip() for v in raw.split(",") if v.strip()]
    for item in items:
        if item not in known:
            raise SpecError(f"--{name} {item!r} is not allowed; choose from {', '.join(known)}, a comma list, or all")
    return items


def grid(flags: dict[str, Any], accel: catalog.Accelerator, tokens: int | None, a: estimate.Assumptions,
         cpu_mem_gib: float | None) -> estimate.Grid | None:
    """A planning grid when --size or --strategy names a comma list or `all`: one row per size ×
    strategy (hours per epoch, MFU, memory, verdict); None when each names one value."""
    sizes = _grid_axis(flags, "size", [s for s in catalog.SIZES if s != "tiny"])
    strategies = _grid_axis(flags, "strategy", list(catalog.STRATEGIES))
    if not (sizes or strategies):
        return None
    rows = []
    for size in sizes or [flags.get("size")]:
        for strategy in strategies or [flags.get("strategy")]:
            cell = {**flags, **({"size": size} if size else {}), **({"strategy": strategy} if strategy else {})}
            spec, _ = build_spec({k: v for k, v in cell.items() if v is not None}, cluster_default="slurm")
            rows.append(estimate.grid_row(spec, accel, spec.size, tokens, a, node_ram_gib(spec, cpu_mem_gib)))  # resolves
    return estimate.Grid(rows=tuple(rows))


SEED_TOKENS = 2_500_000_000  # the seed's corpus: tokens per epoch of its table


@dataclass(frozen=True, slots=True)
class StartingGrid:
    """`estimate hours` without flags: the seed's kind of table, 7B and 13B x every strategy."""
    result: estimate.Grid
    accelerator: catalog.Accelerator
    basis: str  # what the table assumes, in words


def starting_grid(a: estimate.Assumptions) -> StartingGrid:
    """On the seed's node (8 A100-80GB) at its 2.5B tokens per epoch; where the site profile names
    its GPU, on that GPU with the profile's defaults (nodes, GPUs per node, ...)."""
    profile, _ = site.load()
    flags: dict[str, Any] = {"size": "7b,13b", "strategy": "all"}
    if profile.gpu is None:
        flags.update(nodes=1, gpus_per_node=8)
    accel = accelerator(profile.gpu)
    spec, _ = build_spec({**flags, "size": "7b", "strategy": "fsdp"}, cluster_default="slurm")
    whose = "your site profile's defaults" if profile.gpu else "the seed's table"
    basis = (f"7B and 13B x every strategy on {spec.nodes} node{'s' if spec.nodes > 1 else ''} x {spec.gpus_per_node} "
             f"{accel.name} at {SEED_TOKENS / 1e9:g}B tokens per epoch ({whose}); give --size, --strategy, --gpu "
             f"and --tokens for your own run")
    return StartingGrid(grid(flags, accel, SEED_TOKENS, a, None), accel, basis)


def predicted_hours(spec: JobSpec, accel: catalog.Accelerator, tokens: int | None, a: estimate.Assumptions,
                    cpu_mem_gib: float | None) -> estimate.PredictedHours:
    asked = spec.shard_within  # (auto, before plan_for_gpu records the choice)
    spec = plan_for_gpu(spec, accel, a, cpu_mem_gib)
    result = estimate.hours(spec, accel, tokens, a, node_ram_gib(spec, cpu_mem_gib))
    # fsdp across nodes: both layouts priced, the one this run takes and why (None: no choice to make)
    choice = estimate.shard_choice(dataclasses.replace(spec, shard_within=asked), accel, a,
                                   node_ram_gib(spec, cpu_mem_gib))
    return dataclasses.replace(result, spec=estimate.RunSummary.of(spec), shard_within_choice=choice,
                               shard_within=(choice["shard_within"] if choice else "all")
                               if spec.strategy_info.fsdp else None)


def memory_table(spec: JobSpec, accel: catalog.Accelerator, a: estimate.Assumptions, cpu_mem_gib: float | None
                 ) -> estimate.MemoryTable:
    return estimate.memory_table(spec, accel, a, node_ram_gib(spec, cpu_mem_gib))


def measured_hours(runs: Path, job_id: int, tokens: int | None, a: estimate.Assumptions) -> estimate.MeasuredHours:
    """Hours per epoch from the job's steady measured throughput, and the model's prediction beside it."""
    job, spec = training_job(runs, job_id)
    result = estimate.hours_from_metrics(job_metrics(job), events.read(job.run_dir), tokens, spec.tokens_per_epoch, a)
    if result is None:
        raise Failure(f"job {job_id} has no measured throughput yet; try again after its first logged steps")
    gpu = catalog.GPUS.get(result.peak or "")
    if gpu is not None and spec.plans_gpus:
        result = dataclasses.replace(result, predicted_tokens_per_s=estimate.throughput(spec, gpu, a)["tokens_per_s"])
    return result


