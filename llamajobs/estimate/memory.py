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

    One fact of our worker: with gradient accumulation and unsharded accumulation (the JobSpec's
    choice), FSDP2 skips the reduce-scatter on every micro-batch but the last, so each GPU
    accumulates an unsharded fp32 gradient of everything it trains (4 bytes per trained parameter)
    until the step; sharded accumulation reduce-scatters every micro-batch into the sharded gradient
    that the 16 bytes already count.
    """
    s, n, g, gpn = plan.shape, plan.shape.params, plan.gpus, plan.gpus_per_node
    # FSDP's shard group: every GPU, or under --shard-within node a node's (HSDP: each node holds a
    # whole replica, so a GPU holds nodes times the full shard's state)
    fs = plan.procs if plan.hybrid else g
    layer, largest = s.layer_params, largest_module_params(s)
    gathered = gathered_bytes(s)
    grad_working = 6 * layer  # one layer's bf16 gradient and its fp32 copy for the reduce-scatter
    full = not plan.mode_info.frozen_base
    t = plan.trainable_params
    accumulated = 4 * t if plan.unsharded_accumulation else 0.0
    buf = a.host_buffer_factor
    if full:
        gpu, cpu = {
            "fsdp": (16 * n / fs + gathered + grad_working, 0.0),
            "fsdp-offload": (gathered + grad_working, 16 * n / fs * plan.procs * buf),
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
            "fsdp": (2 * n / fs + gathered, 0.0),
            "fsdp-offload": (gathered, 2 * n / fs * plan.procs * buf),
            "ds-zero2": (2 * n, 0.0),
            "ds-zero2-offload": (2 * n, 0.0),
            "ds-zero3": (2 * n / g + gathered, 0.0),
            "ds-zero3-offload": (gathered, 2 * n / plan.nodes * buf),
            "pp": (2 * n / gpn, 0.0),
        }[plan.strategy]
        gpu += 16 * t
    if plan.objective == "dpo" and full:
        # DPO's frozen reference copy, fp32 like the policy's weights and sharded like them (fsdp only)
        reference = 4 * n / g
        gpu, cpu = (gpu, cpu + reference * plan.procs * buf) if plan.strategy_info.offload else (gpu + reference, cpu)
    return {"state_gpu": gpu, "accumulated_grads": accumulated, "state_cpu": cpu}


def activation_bytes(plan: Plan, a: Assumptions = DEFAULT) -> float:
    """Tensors saved for the backward, per GPU, by transformers' LlamaForCausalLM in bf16 with SDPA
    attention (no s² term), per layer and token. Training every weight: 24·d + 8·f bytes, measured here
    with saved-tensor hooks. A frozen base saves no input of a frozen linear, but LoRA's dropout output
    and mask: (16 + 4 per target)·d + 5·f, set by our worker's peak on one H200 (bench/results/
    h200-2026-11-28.txt, 7B LoRA q/v micro-batch 8: 32.8 GiB allocated; the hooks' 32·d + 6·f counted
    storage that two ops save twice). Recompute keeps each layer's input (2·d) and rebuilds one layer's
    set at a time during the backward. `--compile` saves fewer (`compile_activation_share`)."""
    shape, mode = plan.shape, plan.mode_info
    # (DPO: both rows of each pair; the reference's forward runs without gradients and saves nothing)
    tokens = plan.micro_batch * plan.rows_per_example * plan.seq_len * (a.compile_activation_share if plan.compile else 1.0)
    if mode.frozen_base:
        per_layer = (16 + 4 * len(plan.lora_targets if mode.adapters else ())) * shape.dim + 5 * shape.ffn_dim
    else:
        per_layer = 24 * shape.dim + 8 * shape.ffn_dim
    if plan.recompute:
        return tokens * (shape.n_layers * 2 * shape.dim + per_layer)
    return tokens * shape.n_layers * per_layer


# Rows of logits the worker's loss upcasts at a time (llamajobs/worker/kernels.py LOSS_CHUNK_TOKENS; a
# test keeps the two equal: the estimator never imports torch).
LOSS_CHUNK_TOKENS = 2048


def logits_bytes(shape: Shape, micro_batch: int, seq_len: int) -> float:
    """The loss's tensors at their peak, as our worker computes it (train.token_loss_sum): the bf16
    logits and, in the backward, their bf16 gradient (4 bytes a logit), plus one chunk of rows at a
    time in fp32: its upcast, the log-softmax it saves and its gradient (12 bytes a logit)."""
    tokens = micro_batch * seq_len
    return tokens * shape.vocab_size * 4 + min(tokens, LOSS_CHUNK_TOKENS) * shape.vocab_size * 12


def fused_loss_bytes(shape: Shape, micro_batch: int, seq_len: int) -> float:
    """Liger's fused linear cross-entropy at its peak (liger_kernel/ops/fused_linear_cross_entropy.py):
    no logits tensor; from the forward it keeps the gradient of the hidden states (bf16, tokens x dim)
    and of the head (fp32, vocab x dim), and computes the logits in chunks of about tokens x dim /
    vocab rows (fp32 logits and their gradient: 8 bytes a logit, so ~8 bytes per token and dim)."""
    tokens = micro_batch * seq_len
    return tokens * shape.dim * (2 + 8) + shape.vocab_size * shape.dim * 4


def gradient_bytes(plan: Plan) -> float:
    """The fp32 gradients that the backward allocates as it goes (absent at its start, where the
    activations peak): a full fine-tune's, where they live on the GPU; DeepSpeed keeps its gradient
    partitions allocated, and LoRA's are small."""
    info = plan.strategy_info
    if plan.mode_info.frozen_base or info.deepspeed or info.offload:
        return 0.0
    if plan.accum > 1 and (plan.sharded_accumulation or plan.runs_unsharded):
        return 0.0  # the earlier micro-batches' gradients are there already
    shards = plan.gpus_per_node if info.one_process_per_node else plan.procs if plan.hybrid else plan.gpus
    return 4 * plan.shape.params / shards


def autocast_weight_bytes(plan: Plan) -> float:
    """fsdp in one process runs the fp32 model under bf16 autocast, which keeps a bf16 copy of every
    weight that the forward used until the backward uses it (without recompute); sharded FSDP
    all-gathers bf16 layers instead (`gathered_bytes`)."""
    return 2.0 * plan.shape.params if plan.runs_unsharded and not plan.mode_info.frozen_base and not plan.recompute else 0.0


def loading_bytes(plan: Plan) -> float:
    """Host RAM of reading the starting weights: our worker reads them once per job (rank 0) and
    broadcasts, so one copy, not one per rank: the 16-bit checkpoint, or an fp32 random init."""
    return (2 if plan.weights_from_disk else 4) * plan.shape.params


def staging_bytes(plan: Plan) -> float:
    """Host RAM per node of an asynchronous checkpoint: DCP's async_save copies what each rank saves
    (fp32 weights and Adam's two moments of what it trains: 12 bytes a parameter, its shard) into
    host memory and writes it from there. A frozen base is not saved; DeepSpeed and the offload
    strategies save synchronously (JobSpec.async_checkpoints)."""
    if not plan.async_checkpoints or plan.strategy_info.deepspeed or plan.strategy_info.offload:
        return 0.0
    if plan.strategy_info.one_process_per_node or plan.runs_unsharded:
        return 12.0 * plan.trainable_params  # one process holds (and saves) all of it
    return 12.0 * plan.trainable_params / plan.shard_ranks * plan.procs


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
    acts = activation_bytes(plan, a)
    if plan.strategy_info.one_process_per_node:  # layers (and their activations) spread over the node's GPUs
        acts /= plan.gpus_per_node
    # Two peaks: the start of the backward (activations and the loss, not yet the gradients the
    # backward allocates) and its end (every gradient, the activations gone); the larger one counts.
    grads = gradient_bytes(plan)
    loss = (fused_loss_bytes if plan.fused_loss else logits_bytes)(s, plan.micro_batch * plan.rows_per_example,
                                                                   plan.seq_len)
    at_start = acts + loss + autocast_weight_bytes(plan) - grads
    parts = {
        "model_states": states["state_gpu"] - grads + (grads if at_start < 0 else 0.0),
        "accumulated_grads": states["accumulated_grads"],
        "activations": acts if at_start >= 0 else 0.0,
        "logits": loss if at_start >= 0 else 0.0,
        "autocast_weights": autocast_weight_bytes(plan) if at_start >= 0 else 0.0,
        "framework": a.framework_overhead_gib * GIB,
    }
    cpu_parts = {
        "offloaded_states": states["state_cpu"],
        "loading": loading_bytes(plan),
        "checkpoint_staging": staging_bytes(plan),
        "processes": a.host_process_gib * GIB * plan.procs,
    }
    gpu_bytes = sum(parts.values())
    # Loading is over (its buffers freed) before the first checkpoint: the larger of the two counts.
    cpu_bytes = (cpu_parts["offloaded_states"] + max(cpu_parts["loading"], cpu_parts["checkpoint_staging"])
                 + cpu_parts["processes"])
    ram = node_ram_gib or a.node_ram_gib
    gpu_verdict = verdict(gpu_bytes, gpu.memory_gib * GIB, a)
    cpu_verdict = verdict(cpu_bytes, ram * GIB, a)
    worst = max(gpu_verdict, cpu_verdict, key=_RANK.__getitem__)
    return {"strategy": plan.strategy, "gpu_mem_gib": gpu_bytes / GIB, "cpu_mem_gib": cpu_bytes / GIB,
            "verdict": worst, "gpu_verdict": gpu_verdict, "cpu_verdict": cpu_verdict,
            "gpu": gpu.name, "gpu_capacity_gib": gpu.memory_gib, "node_ram_gib": ram,
            "gpu_parts_gib": {k: v / GIB for k, v in parts.items()},
            "cpu_parts_gib": {k: v / GIB for k, v in cpu_parts.items()}}

