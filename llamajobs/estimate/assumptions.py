"""Every constant of the estimate, each with its source; override any of them (`--assume name=value`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from llamajobs.catalog import Accelerator

@dataclass(frozen=True, kw_only=True, slots=True)
class GpuFacts:
    matmul_fraction: float  # maximum achievable dense bf16 matmul FLOP/s over the datasheet peak
    hbm_gbps: float  # datasheet memory bandwidth, GB/s
    nvlink_gbps: float  # NCCL bus bandwidth of an all-gather/reduce-scatter over the node's 8 GPUs, GB/s


# Matmul fraction: stas00/ml-engineering, "Maximum Achievable Matmul FLOPS comparison table": A100 SXM
# 267.9 of 312 (85.9%), H100 SXM 792.1 of 989 (80.1%); H200: 790 of 989 measured on one H200 here
# (DESIGN.md). HBM: NVIDIA datasheets. NVLink: nccl-tests issues #149 and #178 measure a busbw of
# 200-208 GB/s on 8xA100 SXM (NVLink3, 300 GB/s per direction: 67%); the same 67% of NVLink4's 450,
# and of the A800's 200 GB/s per direction (133). PCIe boards (`--gpu ...-pcie`): every GPU moves its
# collective traffic over one PCIe x16 link (4.0: 25 GB/s per direction, 5.0: 50) and an 8-GPU ring
# crosses the CPU sockets' root ports; half the link is an assumption (no measurement found here):
# 12 GB/s for PCIe 4.0, 24 for 5.0. One fast ring inside the node is worth 10-20x PCIe.
GPU_FACTS: dict[str, GpuFacts] = {
    "a100-40g": GpuFacts(matmul_fraction=0.859, hbm_gbps=1555, nvlink_gbps=200),
    "a100-80g": GpuFacts(matmul_fraction=0.859, hbm_gbps=2039, nvlink_gbps=200),
    "h100": GpuFacts(matmul_fraction=0.801, hbm_gbps=3350, nvlink_gbps=300),
    "h200": GpuFacts(matmul_fraction=0.799, hbm_gbps=4800, nvlink_gbps=300),
    "a100-80g-pcie": GpuFacts(matmul_fraction=0.859, hbm_gbps=1935, nvlink_gbps=12),
    "a100-40g-pcie": GpuFacts(matmul_fraction=0.859, hbm_gbps=1555, nvlink_gbps=12),
    "h100-pcie": GpuFacts(matmul_fraction=0.801, hbm_gbps=2000, nvlink_gbps=24),
    "a800-80g": GpuFacts(matmul_fraction=0.859, hbm_gbps=2039, nvlink_gbps=133),
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
    # kv heads, TinyLlama has 4). Fitted in executed FLOPs (`timing.spent_flops_per_token`: causal
    # attention skips half its scores), which the time model divides by.
    loop_efficiency_max: float = 0.989
    loop_efficiency_width: float = 4214.0
    # torch.compile of each decoder layer: 19,167 / 14,351 tokens/s (DESIGN.md, H200, 7B LoRA).
    compile_speedup: float = 19167 / 14351
    # The per-micro-batch floor: the host dispatches every operator of the forward, the backward and
    # a recompute one by one (eager PyTorch), and the GPU cannot finish a micro-batch before the host
    # has issued it. Operators per decoder layer are counted on transformers' LlamaForCausalLM + peft
    # (TorchDispatchMode, forward + backward): 220 training every weight, 180 + 34 per LoRA target with
    # a frozen base, x1.55 with recompute (op_counts below). Seconds per operator: fitted on Qwen-1.8B
    # LoRA, seq 256, micro-batch 1 on one A100 (Qwen README: 1.0 s per 8 micro-batches = 125 ms for
    # 24 layers x 656 operators: 7.9 us); its 7B and 14B rows (150 and 200 ms per micro-batch) check it.
    host_us_per_op: float = 7.9
    # Compiled layers launch fused kernels: about a tenth of the operators (an assumption).
    compile_op_share: float = 0.1
    # ...and save fewer intermediates for the backward: our worker's compiled peaks on the H200
    # (bench/results/h200-2026-11-28.txt) put the activations at 0.70-0.76 of the eager ones for 7B
    # LoRA (micro-batch 8 and 32) and 0.69 for the 1.1B full fine-tune at micro-batch 64.
    compile_activation_share: float = 0.72
    # Share of the datasheet HBM bandwidth that copies and elementwise kernels reach (a memory copy
    # measures 90% of datasheet on recent cards; 85% leaves room for launch gaps).
    hbm_fraction: float = 0.85
    # --- communication ---
    # Network bandwidth between nodes, GB/s per NIC: a 200 Gb/s HDR InfiniBand (or RoCE) NIC at the 85%
    # that nccl-tests issue #119 measured across nodes (84.8 of 100 GB/s with 4 HDR NICs per node).
    network_gbps: float = 21.0
    # NICs per node that carry NCCL's rings (one ring per NIC): a DGX A100/H100 has 8 (`--assume
    # nics_per_node=8`), many clusters 1-4. The node's share is network_gbps x nics_per_node.
    nics_per_node: int = 1
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
    # CPU Adam, parameters per second per core, measured here (bench/cpu_adam.py, 20M fp32 parameters,
    # one thread, torch 2.13, DeepSpeed 0.19): torch.optim.AdamW for-loop 104 M/s, foreach 142 M/s,
    # fused=True 692 M/s (what the worker's fsdp-offload runs), DeepSpeedCPUAdam 978 M/s (ds-*-offload).
    cpu_adam_torch_per_core: float = 690e6
    cpu_adam_ds_per_core: float = 980e6
    # ...capped by the node's memory bandwidth (GB/s; a two-socket node's STREAM is 250-400 GB/s, shared
    # with the data loaders and the copies) over the bytes each fused kernel moves per parameter (read
    # p, g, m, v; write p, m, v: 28 B fp32; DeepSpeed also writes the 16-bit copy: 30 B).
    node_mem_gbps: float = 150.0
    cpu_adam_torch_bytes: float = 28.0
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
    # The same for a worker on the CPU (the local cluster): no CUDA state; 0.4 GiB max RSS of importing
    # torch and transformers measured here, with room for data loading.
    cpu_process_gib: float = 0.75
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




# The assumptions that mean something at 0 (no warm-up left out, all communication hidden, no overhead);
# every other one is a rate or a share that would divide by zero.
ZERO_ALLOWED = frozenset({"warmup_steps", "comm_exposed", "framework_overhead_gib", "host_process_gib",
                          "cpu_process_gib",
                          "loop_efficiency_width", "host_us_per_op", "compile_op_share"})


def with_overrides(values: Mapping[str, str], a: Assumptions = DEFAULT) -> Assumptions:
    """`--assume name=value` pairs applied to the assumptions; ValueError naming a bad one. Zero is
    refused too (a zero bandwidth or rate would divide by zero), as are NaN and infinity."""
    fields = {f.name: f for f in dataclasses.fields(Assumptions)}
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name not in fields:
            raise ValueError(f"--assume {name}: not an assumption; choose one of {', '.join(fields)}")
        try:
            changes[name] = int(value) if fields[name].type == "int" else float(value)
        except ValueError:
            raise ValueError(f"--assume {name}={value}: not a number") from None
        may_be_zero = name in ZERO_ALLOWED
        if not math.isfinite(changes[name]) or changes[name] < 0 or (changes[name] == 0 and not may_be_zero):
            raise ValueError(f"--assume {name}={value}: must be a finite number above 0"
                             + (" (or 0)" if may_be_zero else ""))
    return dataclasses.replace(a, **changes)
