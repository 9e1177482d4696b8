"""Time: seconds per optimizer step of a plan, term by term; throughput, MFU and hours per epoch."""

from __future__ import annotations

import dataclasses

from llamajobs.catalog import (Accelerator, flops_per_token, objective_flops_per_token, recompute_flops_per_token,
                               reference_flops_per_token)
from llamajobs.estimate.assumptions import DEFAULT, Assumptions, gpu_facts
from llamajobs.estimate.memory import memory
from llamajobs.estimate.plan import Plan, as_plan
from llamajobs.estimate.results import PredictedHours, StepPlan
from llamajobs.spec import JobSpec


def compute_efficiency(plan: Plan, gpu: Accelerator, a: Assumptions = DEFAULT) -> float:
    """Share of the datasheet peak our loop's kernels reach while computing (no communication,
    no offload): the card's achievable matmul share times the loop's share of that at this width."""
    d = plan.shape.dim
    loop = a.loop_efficiency_max * d / (d + a.loop_efficiency_width)
    return gpu_facts(gpu, a).matmul_fraction * loop * (a.compile_speedup if plan.compile else 1.0)


def cpu_adam_params_per_s(plan: Plan, a: Assumptions = DEFAULT) -> float:
    """One node's CPU Adam: DeepSpeedCPUAdam for ds-* offload, torch's AdamW for fsdp-offload."""
    if plan.strategy_info.deepspeed:
        per_core, bytes_per_param = a.cpu_adam_ds_per_core, a.cpu_adam_ds_bytes
    else:
        per_core, bytes_per_param = a.cpu_adam_torch_per_core, a.cpu_adam_torch_bytes
    return min(plan.cpu_cores * per_core, a.node_mem_gbps * 1e9 / bytes_per_param)


def spent_flops_per_token(plan: Plan) -> float:
    """FLOPs executed per token (MFU counts model FLOPs, `flops_per_token`): recompute adds a forward,
    and causal attention kernels (SDPA's flash and memory-efficient backends) skip the masked half of
    the s x s scores that the 12·L·d·s convention counts."""
    s = plan.shape
    causal_skip = 6 * s.n_layers * s.dim * plan.seq_len
    spent = flops_per_token(s, plan.seq_len, plan.mode) - causal_skip
    if plan.recompute:
        spent += recompute_flops_per_token(s, plan.seq_len) - 2 * s.n_layers * s.dim * plan.seq_len
    if plan.objective == "dpo":  # the reference's forward (no gradients), its causal half skipped too
        spent += reference_flops_per_token(s, plan.seq_len) - 2 * s.n_layers * s.dim * plan.seq_len
    return spent


def ops_per_layer(plan: Plan) -> float:
    """Operators the host dispatches per decoder layer per micro-batch (forward and backward), counted
    on transformers' LlamaForCausalLM + peft with a TorchDispatchMode: 220 training every weight;
    180 + 34 per LoRA target with a frozen base; recompute runs the forward again (x1.55)."""
    mode = plan.mode_info
    ops = 180 + 34 * len(plan.lora_targets) if mode.adapters else 180 if mode.frozen_base else 220
    return ops * (1.55 if plan.recompute else 1.0)


def host_floor_s(plan: Plan, a: Assumptions = DEFAULT) -> float:
    """Seconds the host needs to issue one micro-batch: the GPU can go no faster (the floor that
    dominates at micro-batch 1 and short sequences)."""
    share = a.compile_op_share if plan.compile else 1.0
    return plan.shape.n_layers * ops_per_layer(plan) * a.host_us_per_op * 1e-6 * share


def interconnect_gbps(plan: Plan, gpu: Accelerator, a: Assumptions = DEFAULT) -> float:
    """NCCL bus bandwidth of the collectives, GB/s: the node's (NVLink/NVSwitch, or PCIe on `-pcie`
    boards) on one node; across nodes the slower of it and the node's NICs (one ring per NIC)."""
    inside = gpu_facts(gpu, a).nvlink_gbps
    return inside if plan.nodes == 1 else min(inside, a.network_gbps * a.nics_per_node)


def step_time(run: Plan | JobSpec, gpu: Accelerator, a: Assumptions = DEFAULT) -> dict[str, float]:
    """Seconds per optimizer step, itemised. All ranks work in lockstep, so one rank's time is the step's.

    compute   per micro-batch the larger of its tokens x FLOPs spent per token / (peak x compute
              efficiency) and the host's time to issue it (`host_floor_s`), times the micro-batches
    hbm       memory-bound copies of the strategy: FSDP2's all-gather copy-out (2 x 2N read+write per
              micro-batch), the fp32 accumulation of unsharded gradients (10 bytes per trained
              parameter per micro-batch), a GPU Adam step (28 bytes per local parameter)
    comm      collectives over NVLink, or the network between nodes (ring: each rank moves (G-1)/G of
              the gathered bytes): all-gathers of 2-byte parameters (fwd and bwd) per micro-batch for
              sharded parameters, the gradient reduce-scatter (fp32 in our FSDP2, 16-bit in DeepSpeed)
              per step, or per micro-batch for ZeRO-2
    pcie      FSDP2 offload's parameter copies (fp32 shard, fwd and bwd per micro-batch) and gradient copies
    offload   DeepSpeed offload traffic at its measured effective rate, not overlapped
    optimizer CPU Adam over the node's share of the trained parameters
    step = max(compute + hbm, comm, pcie) + comm_exposed x (comm + pcie) + offload + optimizer
    """
    plan = as_plan(run)
    s, facts = plan.shape, gpu_facts(gpu, a)
    info, full = plan.strategy_info, not plan.mode_info.frozen_base
    n = s.params
    t = plan.trainable_params
    g, m = plan.data_parallel, plan.accum
    tokens_per_rank = plan.micro_batch * plan.rows_per_example * plan.seq_len * m
    compute = tokens_per_rank * spent_flops_per_token(plan) / (gpu.peak_bf16_flops * compute_efficiency(plan, gpu, a))
    floor = m * host_floor_s(plan, a)
    hbm_bytes_per_s = facts.hbm_gbps * 1e9 * a.hbm_fraction
    ring = (g - 1) / g if g > 1 else 0.0
    busbw = interconnect_gbps(plan, gpu, a)
    # (fsdp in one process runs unsharded: the worker skips FSDP's copies when it has no one to shard with)
    sharded = info.zero_stage == 3 or (info.fsdp and (info.offload or g > 1))
    grad_bytes = 4 if info.fsdp else 2  # our FSDP2 reduces in fp32 (reduce_dtype)
    hbm = comm = pcie = offload = optimizer = 0.0
    if info.one_process_per_node:
        # One process per node walks the layers GPU after GPU: one GPU computes at a time.
        compute *= plan.gpus_per_node
        hbm = 28 * t / plan.gpus_per_node / hbm_bytes_per_s
    elif plan.hybrid:
        hbm, comm = hybrid_step(plan, gpu, a)
    else:
        if sharded:
            hbm += m * 8 * n  # all-gather copy-out, forward and backward
            comm += m * 2 * 2 * n * ring
        if info.zero_stage == 2:
            # gradients reduced every micro-batch; the updated parameters gathered after the step
            comm += m * grad_bytes * t * ring + (2 * n * ring if full else 0)
        elif info.fsdp and plan.sharded_accumulation:
            comm += m * grad_bytes * t * ring  # a reduce-scatter every micro-batch, into the shard
        else:
            comm += grad_bytes * t * ring  # one reduce-scatter per step
        if plan.unsharded_accumulation:
            hbm += m * 10 * t  # bf16 gradient added into the fp32 unsharded accumulator
        if not info.offload_optimizer:
            hbm += 28 * t / g  # fused GPU Adam over the local shard
        hbm /= hbm_bytes_per_s
        comm /= busbw * 1e9
    if not info.one_process_per_node:
        local = t / plan.shard_ranks  # trained parameters this rank updates
        if info.fsdp and info.offload:
            base_bytes = 4 if full else 2  # the worker keeps fp32 master shards (a LoRA base in bf16)
            # gradients down (every micro-batch under sharded accumulation) and the updated shard back up
            grad_copies = m if plan.sharded_accumulation else 1
            pcie = (m * 2 * base_bytes * n / plan.shard_ranks + grad_copies * 4 * local + 4 * local) / (a.pcie_gbps * 1e9)
        elif info.deepspeed and info.offload_optimizer and not info.offload_params:
            offload = (m * 4 * local + 2 * local) / (a.ds_offload_gbps * 1e9)
        elif info.deepspeed and info.offload_params:
            offload = (m * (2 * 2 * n / g + 4 * local)) / (a.ds_offload_gbps * 1e9)
        if info.offload_optimizer:
            optimizer = t / plan.nodes / cpu_adam_params_per_s(plan, a)
    compute = max(compute, floor)
    gpu_busy = compute + hbm
    step = max(gpu_busy, comm, pcie) + a.comm_exposed * (comm + pcie) + offload + optimizer
    return {"compute_s": compute, "host_floor_s": floor, "hbm_s": hbm, "comm_s": comm, "pcie_s": pcie, "offload_s": offload,
            "optimizer_s": optimizer, "step_s": step}


def hybrid_step(plan: Plan, gpu: Accelerator, a: Assumptions = DEFAULT) -> tuple[float, float]:
    """HBM and communication seconds per step of FSDP2 over a 2-D mesh (--shard-within node): the
    per-micro-batch all-gathers and the gradient reduce-scatter stay inside the node (over its P ranks,
    NVLink), and once per step (every micro-batch under sharded accumulation) each rank all-reduces its
    gradient shard with its peers on the other R nodes: a node sends its P shards' 2(R-1)/R share of the
    fp32 gradient through its NICs. The two are added (conservative: FSDP2 runs the all-reduce after
    each layer's reduce-scatter, partly behind the backward)."""
    n, t, m = plan.shape.params, plan.trainable_params, plan.accum
    p, r = plan.procs, plan.nodes
    grad_bytes = 4  # our FSDP2 reduces in fp32 (reduce_dtype)
    reductions = m if plan.sharded_accumulation else 1
    inside = (p - 1) / p if p > 1 else 0.0
    intra = (m * 2 * 2 * n + reductions * grad_bytes * t) * inside / (gpu_facts(gpu, a).nvlink_gbps * 1e9)
    inter = reductions * grad_bytes * t * 2 * (r - 1) / r / (a.network_gbps * a.nics_per_node * 1e9)
    hbm = m * 8 * n  # all-gather copy-out, forward and backward
    if plan.unsharded_accumulation:
        hbm += m * 10 * t
    if not plan.strategy_info.offload_optimizer:
        hbm += 28 * t / p  # fused GPU Adam over the local shard: a node's share, not the job's
    return hbm / (gpu_facts(gpu, a).hbm_gbps * 1e9 * a.hbm_fraction), intra + inter


def throughput(run: Plan | JobSpec, gpu: Accelerator, a: Assumptions = DEFAULT) -> dict[str, float]:
    plan = as_plan(run)
    times = step_time(plan, gpu, a)
    tokens_per_s = plan.tokens_per_step / times["step_s"]
    per_gpu = tokens_per_s / plan.gpus
    mfu = objective_flops_per_token(plan.shape, plan.seq_len, plan.mode, plan.objective) * per_gpu / gpu.peak_bf16_flops
    return {"tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": per_gpu, "mfu": mfu, **times}


def hours(run: Plan | JobSpec, gpu: Accelerator, tokens: int | None = None, a: Assumptions = DEFAULT,
          node_ram_gib: float | None = None) -> PredictedHours:
    """Predicted hours per epoch, throughput, MFU (model FLOPs over the datasheet peak) and memory."""
    plan = as_plan(run)
    speed = throughput(plan, gpu, a)
    mem = memory(plan, gpu, a=a, node_ram_gib=node_ram_gib)
    tokens = tokens or plan.tokens_per_epoch
    return PredictedHours(
        hours_per_epoch=tokens / speed["tokens_per_s"] / 3600 if tokens else None,
        tokens_per_epoch=tokens,
        tokens_per_s=speed["tokens_per_s"],
        tokens_per_s_per_gpu=speed["tokens_per_s_per_gpu"],
        mfu=speed["mfu"],
        peak=gpu.name,
        peak_tflops=gpu.peak_bf16_flops / 1e12,
        gpu_mem_gib=mem["gpu_mem_gib"],
        cpu_mem_gib=mem["cpu_mem_gib"],
        fits=mem["verdict"] != "does not fit",
        verdict=mem["verdict"],
        step_s=speed["step_s"],
        steps_per_epoch=tokens / plan.tokens_per_step if tokens else None,
        accumulation=plan.accum,
        plan=StepPlan(micro_batch=plan.micro_batch, micro_batch_auto=plan.micro_batch_auto,
                      micro_batches_per_step=plan.accum, gradient_accumulation=plan.accumulation),
        time_parts_s={k: speed[k] for k in ("compute_s", "host_floor_s", "hbm_s", "comm_s", "pcie_s", "offload_s",
                                            "optimizer_s")},
        expected_error=expected_error_text(plan.strategy),
        largest_fitting_micro_batch=largest_fitting_micro_batch(plan, gpu, a, node_ram_gib),
    )


def largest_fitting_micro_batch(run: Plan | JobSpec, gpu: Accelerator, a: Assumptions = DEFAULT,
                                node_ram_gib: float | None = None) -> int | None:
    """The largest power-of-two micro-batch that divides a rank's share of the global batch and
    "fits". Offload pays per micro-batch (DeepSpeed moves parameters and gradients every one), so
    for offload this is the setting that matters most. Not monotone under FSDP2: at one micro-batch
    per step the accumulated fp32 gradient disappears."""
    plan = as_plan(run)
    per_rank = max(1, plan.global_batch // plan.data_parallel)
    best, m = None, 1
    while m <= per_rank:
        variant = dataclasses.replace(plan, micro_batch=m)
        if per_rank % m == 0 and memory(variant, gpu, a=a, node_ram_gib=node_ram_gib)["verdict"] == "fits":
            best = m
        m *= 2
    return best





# The expected error of `estimate hours` by strategy: the largest error of its "check" anchors (the
# seed's and the held-out published runs), rounded up (tests/test_estimate.py keeps every check inside
# it; README "How estimates are made" has the table). Strategies no published measurement checks say so.
EXPECTED_ERROR: dict[str, float] = {
    "fsdp": 0.40, "ds-zero3": 0.40, "ds-zero2-offload": 0.25, "ds-zero3-offload": 0.55,
    "ds-zero2": 0.45, "fsdp-offload": 1.0, "pp": 1.0,
}
UNCHECKED = frozenset({"fsdp-offload", "pp"})


def expected_error_text(strategy: str) -> str:
    bound = f"±{EXPECTED_ERROR[strategy]:.0%}"
    return bound + (" (no published measurement checks it)" if strategy in UNCHECKED else "")
