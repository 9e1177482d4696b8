"""Memory: bytes per GPU and per node's CPU of a plan, term by term, with verdicts."""

from __future__ import annotations

import math
from typing import Any

from llamajobs.catalog import Accelerator, Shape
from llamajobs.estimate.assumptions import DEFAULT, Assumptions
from llamajobs.estimate.plan import Plan, as_plan, plan_for_strategy
from llamajobs.spec import JobSpec

GIB = 2**30


def largest_module_params(shape: Shape) -> int:
    """DeepSpeed's "largest layer": the most parameters one module holds directly (for LLaMA the
    embedding or the head, V·d, else the MLP's d·f)."""
    kv = shape.n_kv_heads * shape.head_dim
    return max(shape.vocab_size * shape.dim, shape.dim * shape.ffn_dim, shape.dim * shape.dim, shape.dim * kv)


def gathered_bytes(shape: Shape) -> float:
    """The bf16 parameters a sharded strategy holds unsharded at once: FSDP2 gathers one decoder layer
    and prefetches the next, and keeps the root group (embedding, head, final norm) gathered through
    the step (its reshard_after_forward is False). ZeRO-3's prefetch holds about as much."""
    root = shape.embedding_params + shape.dim
    return 2 * (2 * shape.layer_params + root)


def model_state_bytes(plan: Plan, a: Assumptions = DEFAULT) -> dict[str, float]:
    """Parameters, gradients and optimizer states: bytes per GPU and per node's CPU, by strategy.

    Full fine-tuning with mixed-precision Adam keeps 16 bytes per parameter (fp32 master, fp32
    gradient, two fp32 moments) plus 16-bit copies for compute. ZeRO-2/3 with and without offload
    follow DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs; zero_init for
    ZeRO-3; ZeRO-2 as DeepSpeed 0.19 counts it, 2N + 18N/G, only the 16-bit parameters replicated,
    where older releases and DESIGN.md say 4N + 16N/G). Their CPU terms that are one fp32 model per
    rank (4N per GPU) are the cost of every rank loading the checkpoint, which our worker avoids (it
    loads once; see `loading_bytes`). FSDP2 full shard is ZeRO-3's layout: 16 bytes per parameter
    sharded, a layer gathered at a time.

    One fact of our worker: with gradient accumulation, FSDP2 skips the reduce-scatter on every
    micro-batch but the last, so each GPU accumulates an unsharded fp32 gradient of everything it
    trains (4 bytes per trained parameter) until the step.
    """
    s, n, g, gpn = plan.shape, plan.shape.params, plan.gpus, plan.gpus_per_node
    layer, largest = s.layer_params, largest_module_params(s)
    gathered = gathered_bytes(s)
    grad_working = 6 * layer  # one layer's bf16 gradient and its fp32 copy for the reduce-scatter
    full = not plan.mode_info.frozen_base
    t = plan.trainable_params
    accumulated = 4 * t if plan.accum > 1 and plan.strategy_info.fsdp else 0.0
    buf = a.host_buffer_factor
    if full:
        gpu, cpu = {
            "fsdp": (16 * n / g + gathered + grad_working, 0.0),
            "fsdp-offload": (gathered + grad_working, 16 * n / g * plan.procs * buf),
            "ds-zero2": (2 * n + 18 * n / g, 0.0),
            "ds-zero2-offload": (2 * n, 16 * n / g * plan.procs * buf),
            "ds-zero3": (4 * largest + 18 * n / g + gathered, 0.0),
            "ds-zero3-offload": (4 * largest + gathered, 18 * n / plan.nodes * buf),
            "pp": (16 * n / gpn, 0.0),
        }[plan.strategy]
    else:
        # A frozen base keeps 2 bytes per parameter, placed like the strategy's parameters; the
        # adapters (or prompts) get the full 16 bytes, replicated: they are small.
        gpu, cpu = {
            "fsdp": (2 * n / g + gathered, 0.0),
            "fsdp-offload": (gathered, 2 * n / g * plan.procs * buf),
            "ds-zero2": (2 * n, 0.0),
            "ds-zero2-offload": (2 * n, 0.0),
            "ds-zero3": (2 * n / g + gathered, 0.0),
            "ds-zero3-offload": (gathered, 2 * n / plan.nodes * buf),
            "pp": (2 * n / gpn, 0.0),
        }[plan.strategy]
        gpu += 16 * t
    return {"state_gpu": gpu, "accumulated_grads": accumulated, "state_cpu": cpu}


def activation_bytes(plan: Plan) -> float:
    """Tensors saved for the backward, per GPU. Measured here with saved-tensor hooks on transformers'
    LlamaForCausalLM in bf16 with SDPA attention (no s² term): per layer and token 24·d + 8·f bytes
    when the weights train; with a frozen base the inputs of frozen linears are not saved but LoRA's
    dropout and its mask are: 32·d + 6·f with q/v adapters (+4·d per further target). Recompute keeps
    each layer's input (2·d) and rebuilds one layer's set at a time during the backward."""
    shape, mode = plan.shape, plan.mode_info
    tokens = plan.micro_batch * plan.seq_len
    if mode.frozen_base:
        per_layer = (24 + 4 * len(plan.lora_targets if mode.adapters else ())) * shape.dim + 6 * shape.ffn_dim
    else:
        per_layer = 24 * shape.dim + 8 * shape.ffn_dim
    if plan.recompute:
        return tokens * (shape.n_layers * 2 * shape.dim + per_layer)
    return tokens * shape.n_layers * per_layer


def logits_bytes(shape: Shape, micro_batch: int, seq_len: int) -> float:
    """The loss's tensors at their peak (the start of the backward): bf16 logits, the fp32 log-softmax
    the worker's cross-entropy saves, and the two fp32 gradients the backward then makes; often the
    largest single tensors at seq 512."""
    return micro_batch * seq_len * shape.vocab_size * (2 + 4 + 4 + 4)


def loading_bytes(plan: Plan) -> float:
    """Host RAM of reading the starting weights: our worker reads them once per job (rank 0) and
    broadcasts, so one copy, not one per rank: the 16-bit checkpoint, or an fp32 random init."""
    return (2 if plan.weights_from_disk else 4) * plan.shape.params


def verdict(used: float, available: float, a: Assumptions = DEFAULT) -> str:
    share = used / available if available > 0 else math.inf
    return "fits" if share < a.fits_below else "tight" if share <= 1.0 else "does not fit"


_RANK = {"fits": 0, "tight": 1, "does not fit": 2}


def memory(run: Plan | JobSpec, gpu: Accelerator, strategy: str | None = None, a: Assumptions = DEFAULT,
           node_ram_gib: float | None = None) -> dict[str, Any]:
    """GPU bytes per device and CPU bytes per node, itemised, with verdicts (strategy overridable)."""
    plan = as_plan(run)
    if strategy:
        plan = plan_for_strategy(plan, strategy)
    s = plan.shape
    states = model_state_bytes(plan, a)
    acts = activation_bytes(plan)
    if plan.strategy_info.one_process_per_node:  # layers (and their activations) spread over the node's GPUs
        acts /= plan.gpus_per_node
    parts = {
        "model_states": states["state_gpu"],
        "accumulated_grads": states["accumulated_grads"],
        "activations": acts,
        "logits": logits_bytes(s, plan.micro_batch, plan.seq_len),
        "framework": a.framework_overhead_gib * GIB,
    }
    cpu_parts = {
        "offloaded_states": states["state_cpu"],
        "loading": loading_bytes(plan),
        "processes": a.host_process_gib * GIB * plan.procs,
    }
    gpu_bytes, cpu_bytes = sum(parts.values()), sum(cpu_parts.values())
    ram = node_ram_gib or a.node_ram_gib
    gpu_verdict = verdict(gpu_bytes, gpu.memory_gib * GIB, a)
    cpu_verdict = verdict(cpu_bytes, ram * GIB, a)
    worst = max(gpu_verdict, cpu_verdict, key=_RANK.__getitem__)
    return {"strategy": plan.strategy, "gpu_mem_gib": gpu_bytes / GIB, "cpu_mem_gib": cpu_bytes / GIB,
            "verdict": worst, "gpu_verdict": gpu_verdict, "cpu_verdict": cpu_verdict,
            "gpu": gpu.name, "gpu_capacity_gib": gpu.memory_gib, "node_ram_gib": ram,
            "gpu_parts_gib": {k: v / GIB for k, v in parts.items()},
            "cpu_parts_gib": {k: v / GIB for k, v in cpu_parts.items()}}

