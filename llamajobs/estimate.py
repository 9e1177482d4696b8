"""The FLOPs, memory and time model behind `llamajobs estimate`. Pure functions, no I/O."""

from __future__ import annotations

from llamajobs.catalog import Shape

FROZEN_BASE_MODES = frozenset({"lora", "prefix", "ptuning", "prompt"})


def flops_per_token(shape: Shape, seq_len: int, mode: str = "full") -> float:
    """Model FLOPs to train on one token: 6N + 12·L·d·s (N without embeddings; PaLM appendix B).

    A frozen base (LoRA and the prompt methods) skips the weight gradients: about 4N. The output
    head's matmul (2·d·V forward, twice that backward) is counted with N's rule.
    """
    weight_flops_per_param = 4 if mode in FROZEN_BASE_MODES else 6
    n = shape.non_embedding_params + shape.dim * shape.vocab_size  # the head multiplies every token
    attention = 12 * shape.n_layers * shape.dim * seq_len
    return weight_flops_per_param * n + attention


# --- memory (bytes) ---

GIB = 2**30
# CUDA context, NCCL buffers and allocator fragmentation; measured 1-2 GiB on A100/H100.
FRAMEWORK_OVERHEAD = 1.5 * GIB
# Verdicts: room for fragmentation spikes below 90% of the card.
FITS_BELOW = 0.90


def trainable_params(shape: Shape, mode: str, lora_r: int = 8, lora_targets: tuple[str, ...] = ("q_proj", "v_proj"),
                     num_virtual_tokens: int = 32) -> int:
    if mode == "full":
        return shape.params
    if mode == "lora":
        kv = shape.n_kv_heads * shape.head_dim
        dims = {"q_proj": (shape.dim, shape.dim), "k_proj": (shape.dim, kv), "v_proj": (shape.dim, kv),
                "o_proj": (shape.dim, shape.dim), "gate_proj": (shape.dim, shape.ffn_dim),
                "up_proj": (shape.dim, shape.ffn_dim), "down_proj": (shape.ffn_dim, shape.dim)}
        per_layer = sum(lora_r * sum(dims[t]) for t in lora_targets if t in dims)
        return shape.n_layers * per_layer
    # prefix tuning trains key/value prefixes in every layer; prompt/p-tuning only input embeddings
    per_token = 2 * shape.n_layers * shape.dim if mode == "prefix" else shape.dim
    return num_virtual_tokens * per_token


def model_state_bytes(shape: Shape, strategy: str, mode: str, trainable: int, gpus: int,
                      gpus_per_node: int) -> tuple[float, float]:
    """(per GPU, per node's CPU) for parameters, gradients and Adam states.

    Full fine-tuning follows DeepSpeed's own estimators (estimate_zero2/3_model_states_mem_needs);
    FSDP2 full shard is ZeRO-3's layout (fp32 master and Adam sharded, a layer gathered at a time).
    A frozen base (LoRA, prompt methods) keeps 2 bytes per parameter, sharded like the strategy's
    parameters, plus 16 bytes per trainable parameter.
    """
    n, g, layer = shape.params, gpus, shape.layer_params
    if mode != "full":
        base_gpu = {"fsdp": 2 * n / g, "fsdp-offload": 2 * 2 * layer, "ds-zero2": 2 * n, "ds-zero2-offload": 2 * n,
                    "ds-zero3": 2 * n / g + 2 * 2 * layer, "ds-zero3-offload": 2 * 2 * layer,
                    "pp": 2 * n / gpus_per_node}[strategy]
        base_cpu = {"fsdp-offload": 2 * n / g * gpus_per_node, "ds-zero3-offload": 2 * n / g * gpus_per_node}
        return base_gpu + 16 * trainable, base_cpu.get(strategy, 0.0)
    return {
        "fsdp": (16 * n / g + 2 * 2 * layer, 0.0),
        "fsdp-offload": (2 * 2 * layer, 16 * n / g * gpus_per_node * 1.5),
        "ds-zero2": (4 * n + 16 * n / g, 4 * n * gpus_per_node * 1.5),
        "ds-zero2-offload": (2 * n, n * max(4 * g, 16) * 1.5),
        "ds-zero3": (4 * layer + 18 * n / g, 4 * n * gpus_per_node * 1.5),
        "ds-zero3-offload": (4 * layer, n * 18 * gpus_per_node / g * 1.5),
        "pp": (16 * n / gpus_per_node, 0.0),
    }[strategy]


def activation_bytes(shape: Shape, micro_batch: int, seq_len: int, recompute: bool) -> float:
    """Activations kept for the backward, bf16 (Korthikanti et al. 2022: 34·s·b·h per layer with a
    fused attention kernel); recompute keeps each layer's input plus one layer's working set."""
    per_layer = 34 * seq_len * micro_batch * shape.dim
    if recompute:
        return shape.n_layers * 2 * seq_len * micro_batch * shape.dim + per_layer
    return shape.n_layers * per_layer


def logits_bytes(shape: Shape, micro_batch: int, seq_len: int) -> float:
    """bf16 logits, their fp32 upcast for the loss and its gradient: often the largest tensor at seq 512."""
    return micro_batch * seq_len * shape.vocab_size * (2 + 4 + 4)


def memory(spec, gpu, strategy: str | None = None) -> dict:
    """GPU bytes per device and CPU bytes per node for a spec (strategy overridable for a table)."""
    shape = spec.shape
    strategy = strategy or spec.strategy
    gpus = spec.nodes * spec.gpus_per_node
    trainable = trainable_params(shape, spec.mode, spec.lora_r, spec.lora_targets, spec.num_virtual_tokens)
    state_gpu, state_cpu = model_state_bytes(shape, strategy, spec.mode, trainable, gpus, spec.gpus_per_node)
    gpu_bytes = (state_gpu + activation_bytes(shape, spec.micro_batch, spec.seq_len, spec.activation_checkpointing)
                 + logits_bytes(shape, spec.micro_batch, spec.seq_len) + FRAMEWORK_OVERHEAD)
    # The worker reads the checkpoint once per job (rank 0) and scatters it: one bf16 copy in host RAM.
    cpu_bytes = state_cpu + 2 * shape.params
    used = gpu_bytes / (gpu.memory_gib * GIB)
    verdict = "fits" if used < FITS_BELOW else "tight" if used <= 1.0 else "does not fit"
    return {"strategy": strategy, "gpu_mem_gib": gpu_bytes / GIB, "cpu_mem_gib": cpu_bytes / GIB, "verdict": verdict}


# --- time ---

# Share of peak our worker reaches without offload: the seed's HF-Trainer FSDP runs reached about a
# third of peak; a plain loop measured 39% (7B LoRA, H200, datasheet peak). First version; the
# estimator issue calibrates it on bench/worker_step.py measurements.
BASE_EFFICIENCY = 0.35
# Slowdown of offload, from Falcon-7B on 8xA100-40GB (DeepSpeed issue 3901), s/step: ZeRO-3 2.86,
# parameter offload 6.05, optimizer+parameter offload 13.70.
OFFLOAD_FACTOR = {
    "fsdp-offload": 2.86 / 13.70, "ds-zero3-offload": 2.86 / 13.70, "ds-zero2-offload": 2.86 / 6.05,
}
# Crossing nodes: gradient reduction leaves NVLink for the network.
MULTI_NODE_FACTOR = 0.85


def efficiency(strategy: str, nodes: int, gpus_per_node: int) -> float:
    eff = BASE_EFFICIENCY * OFFLOAD_FACTOR.get(strategy, 1.0)
    if strategy == "pp":  # one GPU of the node works at a time
        eff /= gpus_per_node
    return eff * (MULTI_NODE_FACTOR if nodes > 1 else 1.0)


def hours(spec, gpu, tokens: int | None = None) -> dict:
    """Predicted hours per epoch, throughput and memory for a spec on a catalog GPU."""
    shape = spec.shape
    gpus = spec.nodes * spec.gpus_per_node
    model_flops = flops_per_token(shape, spec.seq_len, spec.mode)
    # Recompute repeats the forward: 2N more per token, spent but not counted in MFU.
    spent_flops = model_flops + (2 * shape.non_embedding_params if spec.activation_checkpointing else 0)
    eff = efficiency(spec.strategy, spec.nodes, spec.gpus_per_node)
    tokens_per_s = gpus * gpu.peak_bf16_flops * eff / spent_flops
    tokens = tokens or spec.tokens_per_epoch
    mem = memory(spec, gpu)
    return {
        "hours_per_epoch": tokens / tokens_per_s / 3600 if tokens else None,
        "tokens_per_epoch": tokens,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / gpus,
        "mfu": model_flops * tokens_per_s / gpus / gpu.peak_bf16_flops,
        "peak": gpu.name,
        "gpu_mem_gib": mem["gpu_mem_gib"],
        "cpu_mem_gib": mem["cpu_mem_gib"],
        "fits": mem["verdict"] != "does not fit",
        "source": "predicted",
    }


def memory_table(spec, gpu) -> dict:
    from llamajobs.catalog import STRATEGIES

    rows = [memory(spec, gpu, s) for s in STRATEGIES]
    fitting = [r["strategy"] for r in rows if r["verdict"] == "fits"]
    fastest = max(fitting, key=lambda s: efficiency(s, spec.nodes, spec.gpus_per_node), default=None)
    return {"strategies": rows, "recommended": fastest}


def hours_for_spec(spec) -> float | None:
    """What submit prints: hours per epoch on the cluster's GPU type when the spec says how many tokens."""
    from llamajobs.catalog import GPUS

    if spec.tokens_per_epoch is None or spec.cluster != "slurm":
        return None
    return hours(spec, GPUS["a100-80g"])["hours_per_epoch"]


def hours_from_metrics(spec, metrics: list[dict], tokens: int | None = None) -> dict | None:
    """Hours per epoch from a run's measured throughput (warm-up step left out)."""
    steady = [m for m in metrics if m.get("step", 0) > 1 and m.get("tokens_per_s")] or \
        [m for m in metrics if m.get("tokens_per_s")]
    if not steady:
        return None
    recent = steady[-20:]
    tokens_per_s = sorted(m["tokens_per_s"] for m in recent)[len(recent) // 2]
    last = metrics[-1]
    if tokens is None and last.get("epoch"):
        tokens = int(round(last["tokens"] / last["epoch"]))
    tokens = tokens or spec.tokens_per_epoch
    per_gpu = sorted(m["tokens_per_s_per_gpu"] for m in recent)[len(recent) // 2]
    return {
        "hours_per_epoch": tokens / tokens_per_s / 3600 if tokens else None,
        "tokens_per_epoch": tokens,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": per_gpu,
        "mfu": last.get("mfu"),
        "peak": last.get("peak"),
        "gpu_mem_gib": last.get("mem_gib"),
        "source": "measured",
    }
