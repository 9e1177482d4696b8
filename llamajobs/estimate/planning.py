"""What the CLI plans with: every strategy's memory side by side, a grid cell, submit's fit check and
its predicted hours."""

from __future__ import annotations

import dataclasses
from typing import Any

from llamajobs.catalog import GPUS, STRATEGIES, Accelerator
from llamajobs.estimate.assumptions import DEFAULT, Assumptions
from llamajobs.estimate.memory import memory
from llamajobs.estimate.plan import Plan, as_plan, plan_for_strategy
from llamajobs.estimate.results import GridRow, MemoryRow, MemoryTable
from llamajobs.estimate.timing import hours, throughput
from llamajobs.spec import JobSpec

DEFAULT_GPU = "a100-80g"


_PREFERENCE = {"fits": 0, "tight": 1, "does not fit": 2}


def micro_batch_choices(plan: Plan) -> list[int]:
    """What --micro-batch auto chooses from: every divisor of a rank's share of the global batch."""
    per_rank = max(1, plan.global_batch // plan.data_parallel)
    return [m for m in range(1, per_rank + 1) if per_rank % m == 0]


def shard_layouts(plan: Plan) -> list[str]:
    """The --shard-within layouts a plan may run: both for fsdp on several nodes under auto, else its own
    ("all" for auto where the two are the same: one node, or a strategy without the choice)."""
    if plan.shard_within != "auto":
        return [plan.shard_within]
    return ["node", "all"] if plan.strategy_info.fsdp and plan.nodes > 1 else ["all"]


def resolve(run: Plan | JobSpec, gpu: Accelerator, a: Assumptions = DEFAULT,
            node_ram_gib: float | None = None) -> Plan:
    """The plan that would run: with --micro-batch auto the fastest micro-batch that fits with
    headroom (verdict "fits"), and for FSDP with accumulation the unsharded fp32 accumulator when it
    fits, else (or when faster) reduce-scatter every micro-batch into the sharded gradient; with
    --shard-within auto on several nodes the faster of hybrid and full sharding that fits. Nothing
    fits: the choice that needs the least memory, so that the fit check says by how much."""
    plan = as_plan(run)
    sizes = micro_batch_choices(plan) if plan.micro_batch_auto else [plan.micro_batch]
    layouts = shard_layouts(plan)
    options = []
    for m, layout in ((m, layout) for m in sizes for layout in layouts):
        variant = dataclasses.replace(plan, micro_batch=m, sharded_accumulation=False, shard_within=layout)
        ways = [variant]
        if variant.strategy_info.fsdp and variant.accum > 1 and not variant.runs_unsharded:
            ways.append(dataclasses.replace(variant, sharded_accumulation=True))
        for option in ways:
            mem = memory(option, gpu, a=a, node_ram_gib=node_ram_gib)
            speed = throughput(option, gpu, a)["tokens_per_s"]
            options.append((_PREFERENCE[mem["verdict"]], -speed if mem["verdict"] != "does not fit" else mem["gpu_mem_gib"],
                            option))
    return min(options, key=lambda o: (o[0], o[1]))[2]


def shard_choice(run: Plan | JobSpec, gpu: Accelerator, a: Assumptions = DEFAULT,
                 node_ram_gib: float | None = None) -> dict[str, Any] | None:
    """For fsdp on several nodes: both layouts, each at the plan it would run (its own micro-batch and
    accumulation), which one `resolve` picks and why. None where there is no choice to make."""
    plan = as_plan(run)
    if not plan.strategy_info.fsdp or plan.nodes == 1:
        return None
    rows = {}
    for layout in ("node", "all"):
        option = resolve(dataclasses.replace(plan, shard_within=layout), gpu, a, node_ram_gib)
        mem = memory(option, gpu, a=a, node_ram_gib=node_ram_gib)
        speed = throughput(option, gpu, a)
        rows[layout] = {"step_s": speed["step_s"], "comm_s": speed["comm_s"], "tokens_per_s": speed["tokens_per_s"],
                        "gpu_mem_gib": mem["gpu_mem_gib"], "verdict": mem["verdict"], "micro_batch": option.micro_batch}
    picked = plan.shard_within if plan.shard_within != "auto" else resolve(plan, gpu, a, node_ram_gib).shard_within
    other = "all" if picked == "node" else "node"
    chosen, rival = rows[picked], rows[other]
    if plan.shard_within != "auto":
        reason = f"--shard-within {picked} as given"
    elif chosen["verdict"] == "does not fit":
        reason = f"neither fits; {picked} needs less memory ({chosen['gpu_mem_gib']:.1f} GiB per GPU)"
    elif rival["verdict"] == "does not fit":
        reason = (f"{other} does not fit ({rival['gpu_mem_gib']:.1f} GiB per GPU of {gpu.memory_gib:g}); "
                  f"{picked} needs {chosen['gpu_mem_gib']:.1f}")
    elif _PREFERENCE[rival["verdict"]] > _PREFERENCE[chosen["verdict"]]:
        reason = f"{other} is {rival['verdict']} ({rival['gpu_mem_gib']:.1f} GiB per GPU); {picked} fits"
    else:
        reason = (f"{picked} is faster: {chosen['step_s']:.3g} s per step against {rival['step_s']:.3g} s "
                  f"(communication {chosen['comm_s']:.3g} s against {rival['comm_s']:.3g} s)")
    return {"shard_within": picked, "reason": reason, "layouts": rows}


def memory_table(run: Plan | JobSpec, gpu: Accelerator, a: Assumptions = DEFAULT,
                 node_ram_gib: float | None = None) -> MemoryTable:
    """Every strategy's memory and verdict (each at the plan it would run: its own micro-batch under
    --micro-batch auto), and the fastest strategy that fits (None if none does)."""
    plan = as_plan(run)
    rows = []
    for strategy in STRATEGIES:
        variant = resolve(plan_for_strategy(plan, strategy), gpu, a, node_ram_gib)
        rows.append(MemoryRow(**memory(variant, gpu, a=a, node_ram_gib=node_ram_gib),
                              tokens_per_s=throughput(variant, gpu, a)["tokens_per_s"],
                              micro_batch=variant.micro_batch, accumulation=variant.accumulation))
    fitting = [r for r in rows if r.verdict == "fits"]
    best = max(fitting, key=lambda r: r.tokens_per_s, default=None)
    return MemoryTable(strategies=tuple(rows), recommended=best.strategy if best else None)


def grid_row(run: Plan | JobSpec, gpu: Accelerator, size: str, tokens: int | None = None, a: Assumptions = DEFAULT,
             node_ram_gib: float | None = None) -> GridRow:
    """One cell of the planning grid (sizes x strategies), at the plan it would run."""
    plan = resolve(run, gpu, a, node_ram_gib)
    h = hours(plan, gpu, tokens, a, node_ram_gib)
    return GridRow(size=size, strategy=plan.strategy, mode=plan.mode, hours_per_epoch=h.hours_per_epoch, mfu=h.mfu,
                   tokens_per_s=h.tokens_per_s, gpu_mem_gib=h.gpu_mem_gib, cpu_mem_gib=h.cpu_mem_gib,
                   verdict=h.verdict, micro_batch=plan.micro_batch)


def fit_check(run: Plan | JobSpec, gpu: Accelerator, a: Assumptions = DEFAULT,
              node_ram_gib: float | None = None) -> str | None:
    """None when the run fits GPU and CPU memory (or is tight); else one line saying why and naming
    the fastest strategy that fits, for submit's refusal."""
    plan = as_plan(run)
    mem = memory(plan, gpu, a=a, node_ram_gib=node_ram_gib)
    if mem["verdict"] != "does not fit":
        return None
    where = []
    if mem["gpu_verdict"] == "does not fit":
        accumulated = mem["gpu_parts_gib"]["accumulated_grads"]
        why = (f" ({accumulated:.1f} of them the unsharded fp32 gradient FSDP2 accumulates over {plan.accum} "
               f"micro-batches)") if accumulated else ""
        where.append(f"{mem['gpu_mem_gib']:.1f} GiB per GPU of {gpu.name}'s {gpu.memory_gib:g}{why}")
    if mem["cpu_verdict"] == "does not fit":
        where.append(f"{mem['cpu_mem_gib']:.0f} GiB of host RAM per node of {mem['node_ram_gib']:g}")
    table = memory_table(plan, gpu, a, node_ram_gib)
    fix = f"--strategy {table.recommended} would fit" if table.recommended else \
        "no strategy fits; add --nodes, use --mode lora or --activation-checkpointing"
    return f"--strategy {plan.strategy}: {plan.shape.name} {plan.mode} needs {' and '.join(where)}; {fix}"



def host_memory_gib(spec: JobSpec, a: Assumptions = DEFAULT) -> float:
    """GiB of RAM a run on one host's CPU needs (the local cluster): each worker process holds what a
    GPU of its own would (its share of the model states, its activations and loss), and the host adds
    the loading and the processes themselves (no CUDA state: CPU processes)."""
    procs = spec.planned_procs_per_node
    plan = Plan.from_spec(spec, gpus_per_node=procs, procs_per_node=None, fused_loss=False)
    host = Accelerator(name="cpu", peak_bf16_flops=1.0, memory_gib=float("inf"))
    mem = memory(plan, host, a=dataclasses.replace(a, framework_overhead_gib=0.0, host_process_gib=a.cpu_process_gib))
    return mem["gpu_mem_gib"] * plan.procs + mem["cpu_mem_gib"]


def hours_for_spec(spec: JobSpec, gpu: Accelerator | None = None, a: Assumptions = DEFAULT) -> float | None:
    """Predicted hours per epoch of a spec planned on GPUs that says how many tokens an epoch has."""
    if spec.tokens_per_epoch is None or not spec.plans_gpus:
        return None
    return hours(spec, gpu or GPUS[DEFAULT_GPU], a=a).hours_per_epoch

