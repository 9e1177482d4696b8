"""The published measurements the model is calibrated on or checked against (`ANCHORS`), and the GPU
bench's shapes: `compare_anchors()` recomputes the README's table of them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable

from llamajobs.catalog import GPUS, SIZES, Accelerator, Shape
from llamajobs.estimate.assumptions import DEFAULT, Assumptions
from llamajobs.estimate.memory import memory
from llamajobs.estimate.plan import Plan
from llamajobs.estimate.timing import compute_efficiency, hours, spent_flops_per_token, step_time, throughput
from llamajobs.spec import JobSpec

# Every anchor starts from the JobSpec's defaults on a SLURM cluster's GPUs and replaces what it
# measured (shapes and batches a JobSpec might refuse are fine in a Plan).
# (kernels none: none of them ran Liger.)
BASE = Plan.from_spec(JobSpec(cluster="slurm", kernels="none"))


def _plan(**changes: Any) -> Plan:
    return dataclasses.replace(BASE, **changes)


# --- the GPU bench's shapes: a prediction a one-GPU device run checks directly ---

# TinyLlama-1.1B (dim 2048, 22 layers, 32 heads, 4 kv heads, ffn 5632, vocab 32000): the 1.1B shape
# of DESIGN.md's H200 anchor. Not a catalog size; the bench needs only its shape.
TINYLLAMA = SIZES["tinyllama-1.1b"]
BENCH_CASES: dict[str, Plan] = {
    "7b-lora-seq512": _plan(shape=SIZES["7b"], mode="lora", nodes=1, gpus_per_node=1, seq_len=512,
                           global_batch=8, micro_batch=8),
    "1.1b-full-seq512": _plan(shape=TINYLLAMA, mode="full", nodes=1, gpus_per_node=1, seq_len=512,
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
        plan=_plan(shape=SIZES[size], strategy=strategy, seq_len=512, global_batch=batch, micro_batch=micro,
                  tokens_per_epoch=_SEED_TOKENS, weights_from_disk=True),
        gpu=_A100_80, measured=hours_, unit="hours/epoch", role="check",
        note=f"HF Trainer; micro-batch not published, {micro} assumed")


_FALCON_PLAN = _plan(shape=FALCON_7B, seq_len=4096, global_batch=8, micro_batch=1, recompute=True, cpus_per_node=8)


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
           _plan(shape=_MPT_7B, seq_len=512, global_batch=512, micro_batch=8, recompute=True), _A100_40, 3895),
    _tuned("MPT-7B shape full, fsdp, seq 2048", "llm-foundry benchmarks, 8xA100-80GB",
           _plan(shape=_MPT_7B, seq_len=2048, global_batch=256, micro_batch=8, recompute=True), _A100_80, 4641),
    _tuned("Llama-3 8B full, FSDP2, seq 8192", "torchtitan, 8xH100",
           _plan(shape=SIZES["llama3-8b"], seq_len=8192, global_batch=8, micro_batch=1, recompute=True), _H100, 5762),
)


def plain_loop_tokens_per_s(plan: Plan, gpu: Accelerator, a: Assumptions = DEFAULT) -> float:
    """A plain transformers loop on one GPU: compute only (no FSDP copies, no optimizer)."""
    return gpu.peak_bf16_flops * compute_efficiency(plan, gpu, a) / spent_flops_per_token(plan)


def fit_loop_efficiency(anchors: Iterable[Anchor] = ANCHORS, matmul_peak: float = 790e12) -> tuple[float, float]:
    """(loop_efficiency_max, loop_efficiency_width) that reproduce the two uncompiled plain-loop anchors."""
    (d1, e1), (d2, e2) = sorted(
        (x.plan.shape.dim, x.measured * spent_flops_per_token(x.plan) / matmul_peak)
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
        return hours(plan, gpu, a=a).hours_per_epoch
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

