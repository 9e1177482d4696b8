"""The FLOPs, memory and time model behind `llamajobs estimate`. Pure functions, no I/O.

How to read it: a run is a `Plan` (shape, strategy, mode, batch, GPUs; `Plan.from_spec` builds one
from a JobSpec). `memory(plan, gpu)` adds up bytes per GPU and per node's CPU, term by term;
`step_time(plan, gpu)` adds up seconds per optimizer step, term by term; `hours(plan, gpu, tokens)`
turns that into hours per epoch. Every constant is a field of `Assumptions`, with its source beside
it; pass your own (`dataclasses.replace(DEFAULT, ...)`, or `--assume name=value` on the command
line) to change one. `ANCHORS` holds the published measurements the model is calibrated on or
checked against; `compare_anchors()` recomputes the README's table of them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from llamajobs.catalog import GPUS, SIZES, STRATEGIES, Accelerator, Shape

GIB = 2**30
FROZEN_BASE_MODES = frozenset({"lora", "prefix", "ptuning", "prompt"})
OFFLOAD_STRATEGIES = frozenset({"fsdp-offload", "ds-zero2-offload", "ds-zero3-offload"})
# The strategy each offload strategy removes the offload from (for "offload is never faster").
WITHOUT_OFFLOAD = {"fsdp-offload": "fsdp", "ds-zero2-offload": "ds-zero2", "ds-zero3-offload": "ds-zero3"}


# --- FLOPs ---


def flops_per_token(shape: Shape, seq_len: int, mode: str = "full") -> float:
    """Model FLOPs to train on one token: 6N + 12·L·d·s (N without embeddings; PaLM appendix B).

    A frozen base (LoRA and the prompt methods) skips the weight gradients: about 4N. The output
    head's matmul (2·d·V forward, twice that backward) is counted with N's rule; the input embedding
    (a lookup) is not. The worker's MFU uses this count (it reproduces DESIGN.md's 49.5% anchor).
    """
    weight_flops_per_param = 4 if mode in FROZEN_BASE_MODES else 6
    n = shape.non_embedding_params + shape.dim * shape.vocab_size  # the head multiplies every token
    attention = 12 * shape.n_layers * shape.dim * seq_len
    return weight_flops_per_param * n + attention


def recompute_flops_per_token(shape: Shape, seq_len: int) -> float:
    """What activation recompute adds (spent, never counted in MFU): one more forward of the decoder
    layers, 2N for the weights and 4·L·d·s for attention (the head is not recomputed)."""
    return 2 * shape.non_embedding_params + 4 * shape.n_layers * shape.dim * seq_len


# --- the run being estimated ---


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What the estimate needs to know about a run. JobSpec-free, so grids and the published
    anchors (whose shapes and batches a JobSpec would refuse) can build one directly."""

    shape: Shape
    strategy: str = "fsdp"
    mode: str = "full"
    nodes: int = 1
    gpus_per_node: int = 8
    procs_per_node: int | None = None  # default: one per GPU; pp: one per node
    seq_len: int = 512
    global_batch: int = 128
    micro_batch: int = 4
    recompute: bool = False
    compile: bool = False
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    num_virtual_tokens: int = 32
    cpus_per_node: int | None = None  # cores CPU Adam gets; default 4 per worker process (JobSpec's)
    weights_from_disk: bool = False  # --model-path: a 16-bit checkpoint is read, else fp32 random init
    tokens_per_epoch: int | None = None

    @classmethod
    def from_spec(cls, spec: Any, **changes: Any) -> Plan:
        """The plan of a JobSpec as it would run on a cluster's GPUs (one process per GPU)."""
        procs = spec.procs_per_node or (1 if spec.strategy == "pp" else spec.gpus_per_node)
        plan = cls(shape=spec.shape, strategy=spec.strategy, mode=spec.mode, nodes=spec.nodes,
                   gpus_per_node=spec.gpus_per_node, procs_per_node=procs, seq_len=spec.seq_len,
                   global_batch=spec.global_batch, micro_batch=spec.micro_batch,
                   recompute=spec.activation_checkpointing, compile=spec.compile, lora_r=spec.lora_r,
                   lora_targets=tuple(spec.lora_targets), num_virtual_tokens=spec.num_virtual_tokens,
                   cpus_per_node=spec.cpus_per_node or 4 * procs, weights_from_disk=bool(spec.model_path),
                   tokens_per_epoch=spec.tokens_per_epoch)
        return dataclasses.replace(plan, **changes)

    @property
    def procs(self) -> int:
        return self.procs_per_node or (1 if self.strategy == "pp" else self.gpus_per_node)

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def data_parallel(self) -> int:
        """Ranks that each take a share of the batch (pp: one process per node)."""
        return self.nodes * self.procs

    @property
    def accum(self) -> int:
        """Micro-batches per rank per optimizer step."""
        return max(1, math.ceil(self.global_batch / (self.micro_batch * self.data_parallel)))

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    @property
    def cpu_cores(self) -> int:
        return self.cpus_per_node or 4 * self.procs


def as_plan(run: Plan | Any) -> Plan:
    return run if isinstance(run, Plan) else Plan.from_spec(run)


# --- constants, each with its source; override any of them ---


@dataclass(frozen=True, kw_only=True, slots=True)
class GpuFacts:
    matmul_fraction: float  # maximum achievable dense bf16 matmul FLOP/s over the datasheet peak
    hbm_gbps: float  # datasheet memory bandwidth, GB/s
    nvlink_gbps: float  # NCCL bus bandwidth of an all-gather/reduce-scatter over the node's 8 GPUs, GB/s


# Matmul fraction: stas00/ml-engineering, "Maximum Achievable Matmul FLOPS comparison table": A100 SXM
# 267.9 of 312 (85.9%), H100 SXM 792.1 of 989 (80.1%); H200: 790 of 989 measured on one H200 here
# (DESIGN.md). HBM: NVIDIA datasheets. NVLink: nccl-tests issues #149 and #178 measure a busbw of
# 200-208 GB/s on 8xA100 SXM (NVLink3, 300 GB/s per direction: 67%); the same 67% of NVLink4's 450.
GPU_FACTS: dict[str, GpuFacts] = {
    "a100-40g": GpuFacts(matmul_fraction=0.859, hbm_gbps=1555, nvlink_gbps=200),
    "a100-80g": GpuFacts(matmul_fraction=0.859, hbm_gbps=2039, nvlink_gbps=200),
    "h100": GpuFacts(matmul_fraction=0.801, hbm_gbps=3350, nvlink_gbps=300),
    "h200": GpuFacts(matmul_fraction=0.799, hbm_gbps=4800, nvlink_gbps=300),
}
OTHER_GPU = GpuFacts(matmul_fraction=0.80, hbm_gbps=2000, nvlink_gbps=200)  # --peak-tflops cards: guesses


@dataclass(frozen=True, kw_only=True, slots=True)
class Assumptions:
    """Every constant of the model. None for a per-GPU fact means: GPU_FACTS for the card."""

    # --- compute ---
    matmul_fraction: float | None = None
    hbm_gbps: float | None = None
    nvlink_gbps: float | None = None
    # The share of the achievable matmul rate a plain transformers loop reaches, e_max·d/(d + d0):
    # per-token elementwise work (norms, rotary, SiLU, softmax, casts) grows with d, matmuls with d².
    # Fitted exactly (`fit_loop_efficiency`) to DESIGN.md's two H200 plain-loop anchors as shares of
    # the 790 TFLOP/s measured there: LLaMA-7B LoRA seq 512, 14,351 tokens/s = 49.5% (d 4096), and
    # the TinyLlama 1.1B shape full, 40,265 tokens/s = 33.0% (d 2048; DESIGN.md's 38.0% counts 32
    # kv heads, TinyLlama has 4).
    loop_efficiency_max: float = 0.983
    loop_efficiency_width: float = 4048.0
    # torch.compile of each decoder layer: 19,167 / 14,351 tokens/s (DESIGN.md, H200, 7B LoRA).
    compile_speedup: float = 19167 / 14351
    # Share of the datasheet HBM bandwidth that copies and elementwise kernels reach (a memory copy
    # measures 90% of datasheet on recent cards; 85% leaves room for launch gaps).
    hbm_fraction: float = 0.85
    # --- communication ---
    # Network bandwidth per node between nodes, GB/s: one 200 Gb/s HDR InfiniBand NIC at the 85% that
    # nccl-tests issue #119 measured across nodes (84.8 of 100 GB/s with 4 HDR NICs per node).
    network_gbps: float = 21.0
    # Share of communication never hidden behind compute (the first all-gather of a step, the last
    # reduce-scatter, the prefetch that waits): an assumption, not a measurement.
    comm_exposed: float = 0.10
    # --- offload ---
    # Pinned bulk copies per GPU, GB/s: PCIe 4.0 x16 moves ~25 GB/s one way; 8-GPU nodes put two GPUs
    # (and a NIC) behind each switch uplink, so about half when all copy at once. FSDP2's offload.
    pcie_gbps: float = 12.0
    # DeepSpeed's offload traffic (ZeRO-3 parameter fetches, gradient partitions to the CPU, updated
    # parameters back) runs far below PCIe: calibrated on DeepSpeed issue 3901 (Falcon-7B, 8xA100-40GB,
    # seq 4096): ZeRO-3 2.86 s/step -> with parameter offload 6.05 s, i.e. 3.19 s for two fetches of a
    # 2-byte parameter partition (2 x 2 x 6.92e9/8 = 3.46 GB): 1.08 GB/s, not overlapped.
    ds_offload_gbps: float = 1.08
    # CPU Adam, parameters per second per core (measured here, Xeon Sapphire Rapids, 50M fp32 params):
    # torch.optim.AdamW's default CPU path (the worker's under fsdp-offload) 104 M/s; DeepSpeedCPUAdam
    # (OMP_NUM_THREADS=1) 226 M/s, two threads 532-805 M/s: 250 M/s per core.
    cpu_adam_torch_per_core: float = 100e6
    cpu_adam_ds_per_core: float = 250e6
    # ...capped by the node's memory bandwidth (GB/s; a two-socket node's STREAM is 250-400 GB/s, shared
    # with the data loaders and the copies) over the bytes each implementation moves per parameter:
    # torch's per-op passes read and write ~80 B (weight decay, lerp, mul+addcmul, sqrt, div, add,
    # addcdiv over fp32), DeepSpeed's fused kernel ~30 B (read p, g, m, v; write p, m, v, 16-bit p).
    node_mem_gbps: float = 150.0
    cpu_adam_torch_bytes: float = 80.0
    cpu_adam_ds_bytes: float = 30.0
    # --- memory ---
    # Host allocations of offloaded state get DeepSpeed's estimators' additional_buffer_factor (the
    # pinned caching allocator also rounds blocks up to powers of two).
    host_buffer_factor: float = 1.5
    # CUDA context, cuBLAS workspaces, NCCL buffers, allocator slack: 1-2 GiB measured on A100/H100.
    framework_overhead_gib: float = 1.5
    # Host RSS of one worker process besides the model (Python, torch, CUDA and NCCL host state, data
    # loading): 0.33 GiB for torch+transformers on the CPU alone (measured here); CUDA adds the rest.
    host_process_gib: float = 3.0
    # Host RAM per node when the spec does not say (--mem-per-node 0 is "all"): DGX A100 320GB has
    # 1 TiB, the 640GB model 2 TiB; --cpu-mem-gib overrides.
    node_ram_gib: float = 1024.0
    # Verdicts: "fits" below this share of the memory, "tight" up to all of it.
    fits_below: float = 0.90
    # --- measured throughput ---
    # Optimizer steps of each attempt left out of measured throughput (nanoGPT waits for 5).
    warmup_steps: int = 5


DEFAULT = Assumptions()


def gpu_facts(gpu: Accelerator, a: Assumptions = DEFAULT) -> GpuFacts:
    base = GPU_FACTS.get(gpu.name, OTHER_GPU)
    return GpuFacts(matmul_fraction=a.matmul_fraction or base.matmul_fraction,
                    hbm_gbps=a.hbm_gbps or base.hbm_gbps, nvlink_gbps=a.nvlink_gbps or base.nvlink_gbps)


def with_overrides(values: Mapping[str, str], a: Assumptions = DEFAULT) -> Assumptions:
    """`--assume name=value` pairs applied to the assumptions; ValueError naming a bad one."""
    fields = {f.name: f for f in dataclasses.fields(Assumptions)}
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name not in fields:
            raise ValueError(f"--assume {name}: not an assumption; choose one of {', '.join(fields)}")
        try:
            changes[name] = int(value) if fields[name].type == "int" else float(value)
        except ValueError:
            raise ValueError(f"--assume {name}={value}: not a number") from None
        if changes[name] < 0:
            raise ValueError(f"--assume {name}={value}: must be 0 or more")
    return dataclasses.replace(a, **changes)


# --- memory (bytes) ---


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
    full = plan.mode == "full"
    t = n if full else trainable_params(s, plan.mode, plan.lora_r, plan.lora_targets, plan.num_virtual_tokens)
    accumulated = 4 * t if plan.accum > 1 and plan.strategy in ("fsdp", "fsdp-offload") else 0.0
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


def activation_bytes(shape: Shape, micro_batch: int, seq_len: int, recompute: bool, mode: str = "full",
                     lora_targets: tuple[str, ...] = ("q_proj", "v_proj")) -> float:
    """Tensors saved for the backward, per GPU. Measured here with saved-tensor hooks on transformers'
    LlamaForCausalLM in bf16 with SDPA attention (no s² term): per layer and token 24·d + 8·f bytes
    when the weights train; with a frozen base the inputs of frozen linears are not saved but LoRA's
    dropout and its mask are: 32·d + 6·f with q/v adapters (+4·d per further target). Recompute keeps
    each layer's input (2·d) and rebuilds one layer's set at a time during the backward."""
    tokens = micro_batch * seq_len
    if mode in FROZEN_BASE_MODES:
        per_layer = (24 + 4 * len(lora_targets if mode == "lora" else ())) * shape.dim + 6 * shape.ffn_dim
    else:
        per_layer = 24 * shape.dim + 8 * shape.ffn_dim
    if recompute:
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


def memory(run: Plan | Any, gpu: Accelerator, strategy: str | None = None, a: Assumptions = DEFAULT,
           node_ram_gib: float | None = None) -> dict[str, Any]:
    """GPU bytes per device and CPU bytes per node, itemised, with verdicts (strategy overridable)."""
    plan = as_plan(run)
    if strategy:
        plan = plan_for_strategy(plan, strategy)
    s = plan.shape
    states = model_state_bytes(plan, a)
    acts = activation_bytes(s, plan.micro_batch, plan.seq_len, plan.recompute, plan.mode, plan.lora_targets)
    if plan.strategy == "pp":  # layers (and their activations) spread over the node's GPUs
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


# --- time (seconds per optimizer step) ---


def compute_efficiency(plan: Plan, gpu: Accelerator, a: Assumptions = DEFAULT) -> float:
    """Share of the datasheet peak our loop's kernels reach while computing (no communication,
    no offload): the card's achievable matmul share times the loop's share of that at this width."""
    d = plan.shape.dim
    loop = a.loop_efficiency_max * d / (d + a.loop_efficiency_width)
    return gpu_facts(gpu, a).matmul_fraction * loop * (a.compile_speedup if plan.compile else 1.0)


def cpu_adam_params_per_s(plan: Plan, a: Assumptions = DEFAULT) -> float:
    """One node's CPU Adam: DeepSpeedCPUAdam for ds-* offload, torch's AdamW for fsdp-offload."""
    if plan.strategy.startswith("ds-"):
        per_core, bytes_per_param = a.cpu_adam_ds_per_core, a.cpu_adam_ds_bytes
    else:
        per_core, bytes_per_param = a.cpu_adam_torch_per_core, a.cpu_adam_torch_bytes
    return min(plan.cpu_cores * per_core, a.node_mem_gbps * 1e9 / bytes_per_param)


def step_time(run: Plan | Any, gpu: Accelerator, a: Assumptions = DEFAULT) -> dict[str, float]:
    """Seconds per optimizer step, itemised. All ranks work in lockstep, so one rank's time is the step's.

    compute   tokens of the rank x FLOPs spent per token / (peak x compute efficiency)
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
    strategy, full = plan.strategy, plan.mode == "full"
    n = s.params
    t = n if full else trainable_params(s, plan.mode, plan.lora_r, plan.lora_targets, plan.num_virtual_tokens)
    g, m = plan.data_parallel, plan.accum
    tokens_per_rank = plan.micro_batch * plan.seq_len * m
    spent = flops_per_token(s, plan.seq_len, plan.mode) + (
        recompute_flops_per_token(s, plan.seq_len) if plan.recompute else 0.0)
    compute = tokens_per_rank * spent / (gpu.peak_bf16_flops * compute_efficiency(plan, gpu, a))
    hbm_bytes_per_s = facts.hbm_gbps * 1e9 * a.hbm_fraction
    ring = (g - 1) / g if g > 1 else 0.0
    busbw = facts.nvlink_gbps if plan.nodes == 1 else min(facts.nvlink_gbps, a.network_gbps)
    # (fsdp in one process runs unsharded: the worker skips FSDP's copies when it has no one to shard with)
    sharded = strategy in ("fsdp-offload", "ds-zero3", "ds-zero3-offload") or (strategy == "fsdp" and g > 1)
    grad_bytes = 4 if strategy.startswith("fsdp") else 2  # our FSDP2 reduces in fp32 (reduce_dtype)
    hbm = comm = pcie = offload = optimizer = 0.0
    if strategy == "pp":
        # One process per node walks the layers GPU after GPU: one GPU computes at a time.
        compute *= plan.gpus_per_node
        hbm = 28 * t / plan.gpus_per_node / hbm_bytes_per_s
    else:
        if sharded:
            hbm += m * 8 * n  # all-gather copy-out, forward and backward
            comm += m * 2 * 2 * n * ring
        if strategy == "ds-zero2" or strategy == "ds-zero2-offload":
            # gradients reduced every micro-batch; the updated parameters gathered after the step
            comm += m * grad_bytes * t * ring + (2 * n * ring if full else 0)
        else:
            comm += grad_bytes * t * ring  # one reduce-scatter per step
        if strategy in ("fsdp", "fsdp-offload") and m > 1:
            hbm += m * 10 * t  # bf16 gradient added into the fp32 unsharded accumulator
        if strategy not in OFFLOAD_STRATEGIES:
            hbm += 28 * t / g  # fused GPU Adam over the local shard
        hbm /= hbm_bytes_per_s
        comm /= busbw * 1e9
        local = t / g  # trained parameters this rank updates
        if strategy == "fsdp-offload":
            base_bytes = 4 if full else 2  # the worker keeps fp32 master shards (a LoRA base in bf16)
            pcie = (m * 2 * base_bytes * n / g + 4 * local + 4 * local) / (a.pcie_gbps * 1e9)
        elif strategy == "ds-zero2-offload":
            offload = (m * 4 * local + 2 * local) / (a.ds_offload_gbps * 1e9)
        elif strategy == "ds-zero3-offload":
            offload = (m * (2 * 2 * n / g + 4 * local)) / (a.ds_offload_gbps * 1e9)
        if strategy in OFFLOAD_STRATEGIES:
            optimizer = t / plan.nodes / cpu_adam_params_per_s(plan, a)
    gpu_busy = compute + hbm
    step = max(gpu_busy, comm, pcie) + a.comm_exposed * (comm + pcie) + offload + optimizer
    return {"compute_s": compute, "hbm_s": hbm, "comm_s": comm, "pcie_s": pcie, "offload_s": offload,
            "optimizer_s": optimizer, "step_s": step}


def throughput(run: Plan | Any, gpu: Accelerator, a: Assumptions = DEFAULT) -> dict[str, float]:
    plan = as_plan(run)
    times = step_time(plan, gpu, a)
    tokens_per_s = plan.tokens_per_step / times["step_s"]
    per_gpu = tokens_per_s / plan.gpus
    mfu = flops_per_token(plan.shape, plan.seq_len, plan.mode) * per_gpu / gpu.peak_bf16_flops
    return {"tokens_per_s": tokens_per_s, "tokens_per_s_per_gpu": per_gpu, "mfu": mfu, **times}


def hours(run: Plan | Any, gpu: Accelerator, tokens: int | None = None, a: Assumptions = DEFAULT,
          node_ram_gib: float | None = None) -> dict[str, Any]:
    """Predicted hours per epoch, throughput, MFU (model FLOPs over the datasheet peak) and memory."""
    plan = as_plan(run)
    speed = throughput(plan, gpu, a)
    mem = memory(plan, gpu, a=a, node_ram_gib=node_ram_gib)
    tokens = tokens or plan.tokens_per_epoch
    return {
        "hours_per_epoch": tokens / speed["tokens_per_s"] / 3600 if tokens else None,
        "tokens_per_epoch": tokens,
        "tokens_per_s": speed["tokens_per_s"],
        "tokens_per_s_per_gpu": speed["tokens_per_s_per_gpu"],
        "mfu": speed["mfu"],
        "peak": gpu.name,
        "peak_tflops": gpu.peak_bf16_flops / 1e12,
        "gpu_mem_gib": mem["gpu_mem_gib"],
        "cpu_mem_gib": mem["cpu_mem_gib"],
        "fits": mem["verdict"] != "does not fit",
        "verdict": mem["verdict"],
        "step_s": speed["step_s"],
        "steps_per_epoch": tokens / plan.tokens_per_step if tokens else None,
        "accumulation": plan.accum,
        "time_parts_s": {k: speed[k] for k in ("compute_s", "hbm_s", "comm_s", "pcie_s", "offload_s", "optimizer_s")},
        "expected_error": expected_error_text(plan.strategy),
        "largest_fitting_micro_batch": largest_fitting_micro_batch(plan, gpu, a, node_ram_gib),
        "source": "predicted",
    }


def largest_fitting_micro_batch(run: Plan | Any, gpu: Accelerator, a: Assumptions = DEFAULT,
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


def memory_table(run: Plan | Any, gpu: Accelerator, a: Assumptions = DEFAULT,
                 node_ram_gib: float | None = None) -> dict[str, Any]:
    """Every strategy's memory and verdict, and the fastest strategy that fits (None if none does)."""
    plan = as_plan(run)
    rows = []
    for strategy in STRATEGIES:
        variant = plan_for_strategy(plan, strategy)
        row = memory(variant, gpu, a=a, node_ram_gib=node_ram_gib)
        row["tokens_per_s"] = throughput(variant, gpu, a)["tokens_per_s"]
        rows.append(row)
    fitting = [r for r in rows if r["verdict"] == "fits"]
    best = max(fitting, key=lambda r: r["tokens_per_s"], default=None)
    return {"strategies": rows, "recommended": best["strategy"] if best else None}


def plan_for_strategy(plan: Plan, strategy: str) -> Plan:
    """The same run under another strategy (pp runs one process per node)."""
    procs = None if strategy == "pp" or plan.strategy == "pp" else plan.procs_per_node
    return dataclasses.replace(plan, strategy=strategy, procs_per_node=procs)


def grid_row(run: Plan | Any, gpu: Accelerator, size: str, tokens: int | None = None, a: Assumptions = DEFAULT,
             node_ram_gib: float | None = None) -> dict[str, Any]:
    """One cell of the planning grid (sizes x strategies)."""
    plan = as_plan(run)
    h = hours(plan, gpu, tokens, a, node_ram_gib)
    return {"size": size, "strategy": plan.strategy, "mode": plan.mode, "hours_per_epoch": h["hours_per_epoch"],
            "mfu": h["mfu"], "tokens_per_s": h["tokens_per_s"], "gpu_mem_gib": h["gpu_mem_gib"],
            "cpu_mem_gib": h["cpu_mem_gib"], "verdict": h["verdict"]}


def fit_check(run: Plan | Any, gpu: Accelerator, a: Assumptions = DEFAULT,
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
    fix = f"--strategy {table['recommended']} would fit" if table["recommended"] else \
        "no strategy fits; add --nodes, use --mode lora or --activation-checkpointing"
    return f"--strategy {plan.strategy}: {plan.shape.name} {plan.mode} needs {' and '.join(where)}; {fix}"


# --- measured throughput (a running or finished job) ---


def hours_from_metrics(metrics: list[dict], events: Iterable[dict] = (), tokens: int | None = None,
                       tokens_per_epoch: int | None = None, a: Assumptions = DEFAULT) -> dict[str, Any] | None:
    """Hours per epoch and the time remaining from a run's metrics.jsonl rows and events.

    Each row's step_time_s averages the wall time since the previous row, so a checkpoint written in
    between is inside it: the "checkpointed" events' seconds are taken out of the interval that holds
    their step. The first `warmup_steps` steps of every attempt (a resumed attempt restarts its
    elapsed_s) are left out. Throughput = steady tokens / steady seconds.
    """
    rows = [m for m in metrics if m.get("step") and m.get("step_time_s")]
    if not rows:
        return None
    pauses = {int(e["step"]): float(e.get("seconds") or 0) for e in events
              if e.get("event") == "checkpointed" and e.get("step") is not None}
    intervals = []  # (first step, steps, seconds without checkpoint pauses, in warm-up)
    prev_step, prev_elapsed, attempt_start = 0, None, 0
    for row in rows:
        step = int(row["step"])
        if prev_elapsed is not None and (row.get("elapsed_s", 0) < prev_elapsed or step <= prev_step):
            attempt_start = step - max(1, round(row["elapsed_s"] / row["step_time_s"]))  # a new attempt
            prev_step = max(attempt_start, 0)
        steps = max(1, step - prev_step)
        paused = sum(sec for s, sec in pauses.items() if prev_step <= s < step)
        seconds = max(row["step_time_s"] * steps - paused, 1e-9)
        warm = prev_step - attempt_start < a.warmup_steps
        intervals.append((prev_step, steps, seconds, warm))
        prev_step, prev_elapsed = step, row.get("elapsed_s", 0)
    steady = [i for i in intervals if not i[3]] or intervals[1:] or intervals
    last = rows[-1]
    tokens_per_step = last["tokens"] / last["step"] if last.get("tokens") else None
    step_s = sum(i[2] for i in steady) / sum(i[1] for i in steady)
    tokens_per_s = tokens_per_step / step_s if tokens_per_step else last["tokens_per_s"]
    per_gpu_share = last["tokens_per_s_per_gpu"] / last["tokens_per_s"] if last.get("tokens_per_s") else None
    flops_over_peak = last["mfu"] / last["tokens_per_s_per_gpu"] if last.get("mfu") and last.get(
        "tokens_per_s_per_gpu") else None
    per_gpu = tokens_per_s * per_gpu_share if per_gpu_share else None
    if tokens is None and last.get("epoch"):
        tokens = int(round(last["tokens"] / last["epoch"]))
    tokens = tokens or tokens_per_epoch
    total = last.get("total_steps")
    remaining_steps = max(0, total - int(last["step"])) if total else None
    checkpoint_s = sum(pauses.values())
    elapsed_steady = sum(i[2] for i in intervals)
    # Checkpoints to come: as often per computed second as so far.
    ckpt_rate = checkpoint_s / elapsed_steady if elapsed_steady else 0.0
    remaining_s = remaining_steps * step_s * (1 + ckpt_rate) if remaining_steps is not None else None
    return {
        "hours_per_epoch": tokens / tokens_per_s / 3600 if tokens else None,
        "tokens_per_epoch": tokens,
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": per_gpu,
        "mfu": per_gpu * flops_over_peak if per_gpu and flops_over_peak else last.get("mfu"),
        "peak": last.get("peak"),
        "gpu_mem_gib": max((m.get("mem_gib") or 0) for m in rows) or None,
        "cpu_mem_gib": None,
        "fits": True,
        "step_s": step_s,
        "steady_steps": sum(i[1] for i in steady),
        "step": int(last["step"]),
        "total_steps": total,
        "remaining_s": remaining_s,
        "remaining_hours": remaining_s / 3600 if remaining_s is not None else None,
        "checkpoint_s": checkpoint_s,
        "source": "measured",
    }


# --- what submit prints ---

DEFAULT_GPU = "a100-80g"


def hours_for_spec(spec: Any, gpu: Accelerator | None = None, a: Assumptions = DEFAULT) -> float | None:
    """Predicted hours per epoch of a SLURM spec that says how many tokens an epoch has."""
    if spec.tokens_per_epoch is None or spec.cluster != "slurm":
        return None
    return hours(spec, gpu or GPUS[DEFAULT_GPU], a=a)["hours_per_epoch"]


# --- the GPU bench's shapes: a prediction a one-GPU device run checks directly ---

# TinyLlama-1.1B (dim 2048, 22 layers, 32 heads, 4 kv heads, ffn 5632, vocab 32000): the 1.1B shape
# of DESIGN.md's H200 anchor. Not a catalog size; the bench needs only its shape.
TINYLLAMA = SIZES["tinyllama-1.1b"]
BENCH_CASES: dict[str, Plan] = {
    "7b-lora-seq512": Plan(shape=SIZES["7b"], mode="lora", nodes=1, gpus_per_node=1, seq_len=512,
                           global_batch=8, micro_batch=8),
    "1.1b-full-seq512": Plan(shape=TINYLLAMA, mode="full", nodes=1, gpus_per_node=1, seq_len=512,
                             global_batch=8, micro_batch=8),
}


def bench_predictions(gpu: Accelerator, micro_batch: int | None = None, compile: bool = False,
                      a: Assumptions = DEFAULT) -> dict[str, dict[str, Any]]:
    """What `estimate hours --gpu X --nodes 1 --gpus-per-node 1` predicts for the bench's shapes
    (fsdp, one GPU, no accumulation), for a bench to print beside its measurements."""
    out = {}
    for name, plan in BENCH_CASES.items():
        if micro_batch:
            plan = dataclasses.replace(plan, micro_batch=micro_batch, global_batch=micro_batch)
        plan = dataclasses.replace(plan, compile=compile)
        speed, mem = throughput(plan, gpu, a), memory(plan, gpu, a=a)
        out[name] = {"tokens_per_s": speed["tokens_per_s"], "mfu": speed["mfu"], "peak": gpu.name,
                     "step_s": speed["step_s"], "gpu_mem_gib": mem["gpu_mem_gib"], "verdict": mem["verdict"],
                     "micro_batch": plan.micro_batch, "seq_len": plan.seq_len, "mode": plan.mode}
    return out


# --- published anchors: calibration and checks ---

# Falcon-7B (DeepSpeed issue 3901) as a LLaMA-shaped stand-in with its width, depth, vocabulary,
# multi-query attention and parameter count (6.9B: its 4x GELU MLP = a SwiGLU of 2/3 the width).
FALCON_7B = Shape(name="falcon-7b-like", dim=4544, n_layers=32, n_heads=71, n_kv_heads=1, ffn_dim=12117,
                  vocab_size=65024, max_seq_len=4096, tie_embeddings=True)
_A100_40, _A100_80, _H100 = GPUS["a100-40g"], GPUS["a100-80g"], GPUS["h100"]
_SEED_TOKENS = 2_500_000_000


@dataclass(frozen=True, kw_only=True, slots=True)
class Anchor:
    name: str
    source: str
    plan: Plan
    gpu: Accelerator
    measured: float
    unit: str  # "hours/epoch", "s/step", "tokens/s/GPU", "tokens/s"
    role: str  # "fit": sets a constant; "check": the estimate's error; "tuned stack": headroom, not error
    kind: str = "worker"  # "plain loop": compute only; "param offload": ZeRO-3 with only parameters offloaded
    note: str = ""


def _seed(size: str, strategy: str, batch: int, hours_: float, micro: int) -> Anchor:
    return Anchor(
        name=f"LLaMA-{size.upper()} full, {strategy}, batch {batch}, seq 512, 2.5B tokens",
        source="the seed's table (chaoyi-wu/Finetune_LLAMA README), 8xA100",
        plan=Plan(shape=SIZES[size], strategy=strategy, seq_len=512, global_batch=batch, micro_batch=micro,
                  tokens_per_epoch=_SEED_TOKENS, weights_from_disk=True),
        gpu=_A100_80, measured=hours_, unit="hours/epoch", role="check",
        note=f"HF Trainer; micro-batch not published, {micro} assumed")


_FALCON_PLAN = Plan(shape=FALCON_7B, seq_len=4096, global_batch=8, micro_batch=1, recompute=True, cpus_per_node=8)


def _falcon(strategy: str, seconds: float, role: str = "check", kind: str = "worker", label: str = "",
            note: str = "") -> Anchor:
    return Anchor(
        name=f"Falcon-7B full, {label or strategy}, seq 4096", source="DeepSpeed issue 3901, 8xA100-40GB",
        plan=dataclasses.replace(_FALCON_PLAN, strategy=strategy), gpu=_A100_40, measured=seconds,
        unit="s/step", role=role, kind=kind,
        note=note or "micro-batch 1, no accumulation, recompute, 1 CPU thread per rank assumed")


def _tuned(name: str, source: str, plan: Plan, gpu: Accelerator, measured: float) -> Anchor:
    return Anchor(name=name, source=source, plan=plan, gpu=gpu, measured=measured, unit="tokens/s/GPU",
                  role="tuned stack", note="fused kernels our worker lacks; batch and recompute assumed")


_MPT_7B = dataclasses.replace(SIZES["7b"], name="mpt-7b-like", vocab_size=50432)
ANCHORS: tuple[Anchor, ...] = (
    Anchor(name="LLaMA-7B shape LoRA r8 q/v, seq 512, one GPU", source="DESIGN.md, H200 plain loop",
           plan=BENCH_CASES["7b-lora-seq512"], gpu=GPUS["h200"], measured=14351, unit="tokens/s", role="fit",
           kind="plain loop", note="sets loop_efficiency_*"),
    Anchor(name="same, torch.compile", source="DESIGN.md, H200 plain loop",
           plan=dataclasses.replace(BENCH_CASES["7b-lora-seq512"], compile=True), gpu=GPUS["h200"],
           measured=19167, unit="tokens/s", role="fit", kind="plain loop", note="sets compile_speedup"),
    Anchor(name="TinyLlama 1.1B shape full, seq 512, one GPU", source="DESIGN.md, H200 plain loop",
           plan=BENCH_CASES["1.1b-full-seq512"], gpu=GPUS["h200"], measured=40265, unit="tokens/s", role="fit",
           kind="plain loop", note="sets loop_efficiency_*"),
    *(Anchor(name=f"{label}, our worker{', --compile' if compile else ''}", source="bench/worker_step.py, H200, 2026-11-28",
             plan=dataclasses.replace(BENCH_CASES[case], compile=compile), gpu=GPUS["h200"], measured=measured,
             unit="tokens/s", role="check", note="fsdp in one process (unsharded), micro-batch 8")
      for label, case, compile, measured in (
          ("LLaMA-7B shape LoRA r8 q/v, seq 512", "7b-lora-seq512", False, 14401),
          ("LLaMA-7B shape LoRA r8 q/v, seq 512", "7b-lora-seq512", True, 20482),
          ("TinyLlama 1.1B shape full, seq 512", "1.1b-full-seq512", False, 40567),
          ("TinyLlama 1.1B shape full, seq 512", "1.1b-full-seq512", True, 60470))),
    _seed("7b", "fsdp", 384, 35, 4),
    _seed("7b", "fsdp", 128, 36, 4),
    _seed("7b", "ds-zero2-offload", 384, 90, 16),
    _seed("7b", "ds-zero3-offload", 768, 100, 16),
    _seed("7b", "ds-zero3-offload", 128, 100, 16),
    _seed("13b", "ds-zero3-offload", 384, 122, 16),
    _falcon("fsdp", 2.93),
    _falcon("ds-zero3", 2.86),
    _falcon("ds-zero3", 6.05, role="fit", kind="param offload", label="ds-zero3 + parameter offload",
            note="sets ds_offload_gbps from the 3.19 s this adds to ZeRO-3; the rest is ZeRO-3's error"),
    _falcon("ds-zero3-offload", 13.70),
    _falcon("ds-zero2-offload", 9.60),
    _tuned("MPT-7B shape full, fsdp, seq 512", "llm-foundry benchmarks, 8xA100-40GB",
           Plan(shape=_MPT_7B, seq_len=512, global_batch=512, micro_batch=8, recompute=True), _A100_40, 3895),
    _tuned("MPT-7B shape full, fsdp, seq 2048", "llm-foundry benchmarks, 8xA100-80GB",
           Plan(shape=_MPT_7B, seq_len=2048, global_batch=256, micro_batch=8, recompute=True), _A100_80, 4641),
    _tuned("Llama-3 8B full, FSDP2, seq 8192", "torchtitan, 8xH100",
           Plan(shape=SIZES["llama3-8b"], seq_len=8192, global_batch=8, micro_batch=1, recompute=True), _H100, 5762),
)


def plain_loop_tokens_per_s(plan: Plan, gpu: Accelerator, a: Assumptions = DEFAULT) -> float:
    """A plain transformers loop on one GPU: compute only (no FSDP copies, no optimizer)."""
    return gpu.peak_bf16_flops * compute_efficiency(plan, gpu, a) / flops_per_token(plan.shape, plan.seq_len, plan.mode)


def fit_loop_efficiency(anchors: Iterable[Anchor] = ANCHORS, matmul_peak: float = 790e12) -> tuple[float, float]:
    """(loop_efficiency_max, loop_efficiency_width) that reproduce the two uncompiled plain-loop anchors."""
    (d1, e1), (d2, e2) = sorted(
        (x.plan.shape.dim, x.measured * flops_per_token(x.plan.shape, x.plan.seq_len, x.plan.mode) / matmul_peak)
        for x in anchors if x.kind == "plain loop" and not x.plan.compile)
    width = (e2 - e1) / (e1 / d1 - e2 / d2)
    return e2 * (d2 + width) / d2, width


def predict_anchor(anchor: Anchor, a: Assumptions = DEFAULT) -> float:
    plan, gpu = anchor.plan, anchor.gpu
    if anchor.kind == "plain loop":
        return plain_loop_tokens_per_s(plan, gpu, a)
    if anchor.kind == "param offload":  # ZeRO-3's step plus two fetches of the parameter partition
        fetch = plan.accum * 2 * 2 * plan.shape.params / plan.data_parallel / (a.ds_offload_gbps * 1e9)
        return step_time(plan, gpu, a)["step_s"] + fetch
    if anchor.unit == "hours/epoch":
        return hours(plan, gpu, a=a)["hours_per_epoch"]
    if anchor.unit == "s/step":
        return step_time(plan, gpu, a)["step_s"]
    speed = throughput(plan, gpu, a)
    return speed["tokens_per_s_per_gpu"] if anchor.unit == "tokens/s/GPU" else speed["tokens_per_s"]


def compare_anchors(a: Assumptions = DEFAULT) -> list[dict[str, Any]]:
    """Every anchor: measured, predicted, and the error (predicted/measured - 1, in the anchor's unit:
    for hours and s/step positive means the estimate is too slow; for tokens/s, too fast)."""
    rows = []
    for anchor in ANCHORS:
        predicted = predict_anchor(anchor, a)
        rows.append({"anchor": anchor.name, "source": anchor.source, "gpu": anchor.gpu.name,
                     "strategy": anchor.plan.strategy, "unit": anchor.unit, "measured": anchor.measured,
                     "predicted": predicted, "error": predicted / anchor.measured - 1, "role": anchor.role,
                     "note": anchor.note})
    return rows


def anchors_markdown(a: Assumptions = DEFAULT) -> str:
    """The README's anchor table (regenerate it with this after changing the model)."""
    def fmt(x: float) -> str:
        return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"

    lines = ["| anchor | source | measured | predicted | error | role |", "| --- | --- | --- | --- | --- | --- |"]
    for r in compare_anchors(a):
        lines.append(f"| {r['anchor']} | {r['source']} | {fmt(r['measured'])} {r['unit']} | {fmt(r['predicted'])} | "
                     f"{r['error']:+.0%} | {r['role']}{': ' + r['note'] if r['note'] else ''} |")
    return "\n".join(lines) + "\n"


# The expected error of `estimate hours` by strategy: the largest error of its "check" anchors,
# rounded up (tests/test_estimate.py keeps every check inside it; README "How estimates are made" has
# the table). Strategies no published measurement checks say so.
EXPECTED_ERROR: dict[str, float] = {
    "fsdp": 0.35, "ds-zero3": 0.35, "ds-zero2-offload": 0.25, "ds-zero3-offload": 0.55,
    "ds-zero2": 0.35, "fsdp-offload": 1.0, "pp": 1.0,
}
UNCHECKED = frozenset({"ds-zero2", "fsdp-offload", "pp"})


def expected_error_text(strategy: str) -> str:
    bound = f"±{EXPECTED_ERROR[strategy]:.0%}"
    return bound + (" (no published measurement checks it)" if strategy in UNCHECKED else "")
