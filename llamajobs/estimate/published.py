"""Published runs the model was never fitted to (held out): HF-Trainer + peft + DeepSpeed, FSDP2
(torchtitan) and Composer FSDP (llm-foundry) runs, one GPU to 128, micro-batch 1 to 18, sequence 256
to 8192. Each with its source and the exact figures; `compare_published()` puts each beside the
estimate, and tests/test_anchors.py runs each through the CLI (`estimate hours` / `estimate memory`).

Two kinds of figure: a time (s/step or tokens/s/GPU) and, where the source says, the peak memory per
GPU or that the run did not fit (the verdict must be right on both sides of the line).

"Stack" says what ran. Our worker is a plain transformers loop (SDPA attention, no fused kernels):
HF-stack runs are checks of the same kind of loop; torchtitan and llm-foundry are tuned stacks
(fused or flash kernels, selective recompute) that our worker does not match: their error is
reported, never hidden, but counted apart (role "tuned stack").
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llamajobs.catalog import GPUS, SIZES, Accelerator, Shape
from llamajobs.estimate.assumptions import DEFAULT, Assumptions
from llamajobs.estimate.memory import memory
from llamajobs.estimate.plan import Plan
from llamajobs.estimate.planning import resolve
from llamajobs.estimate.timing import throughput
from llamajobs.spec import JobSpec

_BASE = Plan.from_spec(JobSpec(cluster="slurm", kernels="none"))  # (none of them ran Liger)
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _shape(name: str, dim: int, layers: int, heads: int, ffn: int, vocab: int, kv: int | None = None) -> Shape:
    return Shape(name=name, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv or heads, ffn_dim=ffn,
                 vocab_size=vocab, max_seq_len=32768)


# Qwen-1 (huggingface.co/Qwen/Qwen-*/config.json): a LLaMA block (RMSNorm, rotary, SwiGLU of half the
# listed intermediate_size), untied 152k vocabulary.
QWEN = {
    "qwen-1.8b": _shape("qwen-1.8b", 2048, 24, 16, 5504, 151936),
    "qwen-7b": _shape("qwen-7b", 4096, 32, 32, 11008, 151936),
    "qwen-14b": _shape("qwen-14b", 5120, 40, 40, 13696, 152064),
    "qwen-72b": _shape("qwen-72b", 8192, 80, 64, 24576, 152064),
}
# MPT (llm-foundry yamls): d 4096/32 layers (7b), 5120/40 (13b), 8192/80 with GQA 8 (70b); MLP ratio 4
# (GELU), written as the SwiGLU of 2/3 the width with the same parameters; 50k vocabulary, tied.
MPT = {
    "mpt-7b": dataclasses.replace(_shape("mpt-7b", 4096, 32, 32, 10923, 50368), tie_embeddings=True),
    "mpt-13b": dataclasses.replace(_shape("mpt-13b", 5120, 40, 40, 13653, 50368), tie_embeddings=True),
    "mpt-70b": dataclasses.replace(_shape("mpt-70b", 8192, 80, 64, 21845, 50368, kv=8), tie_embeddings=True),
}
LLAMA3_70B = _shape("llama3-70b", 8192, 80, 64, 28672, 128256, kv=8)
LLAMA3_8B = dataclasses.replace(SIZES["llama3-8b"], max_seq_len=32768)
LLAMA2_13B = dataclasses.replace(SIZES["llama2-13b"], max_seq_len=32768)
LLAMA2_70B = dataclasses.replace(SIZES["llama2-70b"], max_seq_len=32768)
LLAMA31_405B = _shape("llama3.1-405b", 16384, 126, 128, 53248, 128256, kv=8)


@dataclass(frozen=True, kw_only=True, slots=True)
class Published:
    name: str
    source: str  # URL
    stack: str
    plan: Plan
    gpu: Accelerator
    gpu_mem_gib: float | None = None  # the card's memory when not the catalog's (H100 96GB)
    unit: str | None = None  # "s/step" or "tokens/s/GPU"; None: a memory-only anchor
    measured: float | None = None
    measured_mem_gib: float | None = None  # peak per GPU, where published
    verdict: str | None = None  # "fits" or "does not fit", where published
    verdict_of: str = "verdict"  # what the source tells: "verdict" (GPU and host) or "gpu_verdict" only
    nics_per_node: int | None = None  # where the source says (llm-foundry: 1600 Gbps = 8 x 200)
    role: str = "check"  # "check" | "tuned stack" | "fit" (sets a constant; named in assumptions.py)
    note: str = ""

    @property
    def assumptions(self) -> dict[str, str]:
        """The --assume flags this run's hardware needs (what the CLI takes)."""
        return {"nics_per_node": str(self.nics_per_node)} if self.nics_per_node else {}


def _p(shape: Shape, *, strategy: str = "fsdp", mode: str = "full", nodes: int = 1, gpus: int = 8, seq: int,
       micro: int, accum: int = 1, recompute: bool = False, targets: tuple[str, ...] = ("q_proj", "v_proj"),
       lora_r: int = 8) -> Plan:
    per_node = gpus
    return dataclasses.replace(_BASE, shape=shape, strategy=strategy, mode=mode, nodes=nodes, gpus_per_node=per_node,
                               procs_per_node=None, seq_len=seq, micro_batch=micro,
                               global_batch=micro * accum * nodes * per_node, recompute=recompute, lora_r=lora_r,
                               lora_targets=targets, weights_from_disk=True, tokens_per_epoch=None)


QWEN_URL = "https://github.com/QwenLM/Qwen/blob/main/README.md#profiling-of-memory-and-speed"
QWEN_STACK = "HF Trainer + peft, flash-attn 2, gradient checkpointing, A100-SXM4-80G"
TITAN_URL = "https://github.com/pytorch/torchtitan/blob/main/docs/performance.md"
FOUNDRY_URL = "https://github.com/mosaicml/llm-foundry/blob/main/scripts/train/benchmarking/README.md"
COOKBOOK_URL = "https://github.com/meta-llama/llama-cookbook/pull/122"
TORCHTUNE_URL = "https://github.com/meta-pytorch/torchtune/issues/863"
_A100_80, _A100_40, _H100 = GPUS["a100-80g"], GPUS["a100-40g"], GPUS["h100"]


def _qwen(size: str, seq: int, seconds: float, mem: float, **kw: Any) -> Published:
    strategy, gpus, nodes = kw.pop("strategy", "fsdp"), kw.pop("gpus", 1), kw.pop("nodes", 1)
    label = kw.pop("label", "")
    return Published(
        name=f"Qwen-{size.split('-')[1].upper()} LoRA r64 all linear, seq {seq}, {label or f'{nodes * gpus} GPU'}",
        source=QWEN_URL, stack=QWEN_STACK,
        plan=_p(QWEN[size], strategy=strategy, mode="lora", nodes=nodes, gpus=gpus, seq=seq, micro=1, accum=8,
                recompute=True, targets=ALL_LINEAR, lora_r=64),
        gpu=_A100_80, unit="s/step", measured=seconds, measured_mem_gib=mem / gpus / nodes if mem else None,
        verdict="fits", note=kw.pop("note", "micro-batch 1, 8 accumulated; memory as published (GB, all GPUs)"),
        **kw)


PUBLISHED: tuple[Published, ...] = (
    # --- HF stack: one GPU, micro-batch 1 (the per-micro-batch floor), sequence 256 to 8192 ---
    _qwen("qwen-1.8b", 256, 1.0, 6.7, role="fit", note="sets host_us_per_op: 8 micro-batches of 256 tokens"),
    _qwen("qwen-1.8b", 4096, 3.3, 16.2),
    _qwen("qwen-7b", 256, 1.2, 20.1),
    _qwen("qwen-7b", 2048, 5.2, 23.8),
    _qwen("qwen-7b", 8192, 21.3, 36.6),
    _qwen("qwen-14b", 1024, 4.4, 35.3),
    _qwen("qwen-14b", 8192, 36.0, 55.2),
    # --- HF stack + DeepSpeed: ZeRO-3 over 4 GPUs; ZeRO-2 over two nodes ---
    _qwen("qwen-72b", 2048, 45.7, 228.8, strategy="ds-zero3", gpus=4, label="ds-zero3, 4 GPUs"),
    _qwen("qwen-7b", 2048, 9.25, 95.1, strategy="ds-zero2", gpus=2, nodes=2, label="ds-zero2, 2 nodes x 2 GPUs",
          note="two servers of two A100s; their network is not published (one 200 Gb/s NIC, the default, assumed)"),
    Published(name="Qwen-72B LoRA r64 all linear without ZeRO-3, 4 GPUs", source=QWEN_URL, stack=QWEN_STACK,
              plan=_p(QWEN["qwen-72b"], strategy="ds-zero2", mode="lora", gpus=4, seq=256, micro=1, accum=8,
                      recompute=True, targets=ALL_LINEAR, lora_r=64),
              gpu=_A100_80, verdict="does not fit", note="\"OOM occurs on 4 A100-SXM4-80G GPUs ... without ZeRO 3\""),
    # --- torchtitan: FSDP2, 64 A100-80GB (8 nodes) and 8 H100 (96 GB) ---
    Published(name="Llama-3 8B full, FSDP2, 64 A100s, seq 8192, local batch 1", source=TITAN_URL,
              stack="torchtitan FSDP2, selective layer recompute (full assumed)",
              plan=_p(LLAMA3_8B, nodes=8, seq=8192, micro=1, recompute=True), gpu=_A100_80, unit="tokens/s/GPU",
              measured=2904, verdict="fits", nics_per_node=8, role="tuned stack",
              note="8 x 200 Gb/s NICs per node assumed (not published)"),
    Published(name="Llama-3 70B full, FSDP2, 64 A100s, seq 8192, local batch 1", source=TITAN_URL,
              stack="torchtitan FSDP2, full recompute", plan=_p(LLAMA3_70B, nodes=8, seq=8192, micro=1, recompute=True),
              gpu=_A100_80, unit="tokens/s/GPU", measured=331, verdict="fits", nics_per_node=8, role="tuned stack",
              note="8 x 200 Gb/s NICs per node assumed (not published)"),
    Published(name="Llama-2 13B full, FSDP2, 64 A100s, seq 4096, local batch 2, no recompute", source=TITAN_URL,
              stack="torchtitan FSDP2", plan=_p(LLAMA2_13B, nodes=8, seq=4096, micro=2), gpu=_A100_80,
              unit="tokens/s/GPU", measured=2162, verdict="fits", nics_per_node=8, role="tuned stack",
              note="8 x 200 Gb/s NICs per node assumed (not published)"),
    Published(name="Llama-2 70B full, FSDP2, 64 A100s, seq 4096, local batch 2, no recompute", source=TITAN_URL,
              stack="torchtitan FSDP2", plan=_p(LLAMA2_70B, nodes=8, seq=4096, micro=2), gpu=_A100_80,
              verdict="does not fit", nics_per_node=8,
              note="OOM with selective recompute at local batch 2 (footnote 1); without recompute it holds more"),
    Published(name="Llama-3.1 8B full, FSDP2, 8 H100 96GB, seq 8192, local batch 2", source=TITAN_URL,
              stack="torchtitan FSDP2, selective recompute (full assumed)",
              plan=_p(LLAMA3_8B, seq=8192, micro=2, recompute=True), gpu=_H100, gpu_mem_gib=96, unit="tokens/s/GPU",
              measured=5762, measured_mem_gib=82.4, verdict="fits", role="tuned stack"),
    Published(name="Llama-3.1 405B full, FSDP2 alone, 128 H100 96GB, seq 8192, local batch 2", source=TITAN_URL,
              stack="torchtitan FSDP2, full recompute",
              plan=_p(LLAMA31_405B, nodes=16, seq=8192, micro=2, recompute=True), gpu=_H100, gpu_mem_gib=96,
              verdict="does not fit", nics_per_node=8, note="\"We do see OOM for 1D parallelism (FSDP2)\""),
    # --- llm-foundry: Composer FSDP, flash attention; 8 x 200 Gb/s RoCE per node ---
    Published(name="MPT-7B full, 64 A100-40GB, seq 2048, micro-batch 18", source=FOUNDRY_URL,
              stack="llm-foundry FSDP, flash attention, recompute",
              plan=_p(MPT["mpt-7b"], nodes=8, seq=2048, micro=18, recompute=True), gpu=_A100_40, unit="tokens/s/GPU",
              measured=3665, verdict="fits", nics_per_node=8, role="tuned stack"),
    Published(name="MPT-13B full, 128 A100-40GB, seq 2048, micro-batch 16", source=FOUNDRY_URL,
              stack="llm-foundry FSDP, flash attention, recompute",
              plan=_p(MPT["mpt-13b"], nodes=16, seq=2048, micro=16, recompute=True), gpu=_A100_40,
              unit="tokens/s/GPU", measured=1972, verdict="fits", nics_per_node=8, role="tuned stack"),
    Published(name="MPT-70B full, 64 A100-80GB, seq 2048, micro-batch 8 x 4", source=FOUNDRY_URL,
              stack="llm-foundry FSDP, flash attention, recompute",
              plan=_p(MPT["mpt-70b"], nodes=8, seq=2048, micro=8, accum=4, recompute=True), gpu=_A100_80,
              unit="tokens/s/GPU", measured=410, verdict="fits", nics_per_node=8, role="tuned stack"),
    Published(name="MPT-13B full, 64 H100, seq 2048, micro-batch 2, no recompute", source=FOUNDRY_URL,
              stack="llm-foundry FSDP, flash attention", plan=_p(MPT["mpt-13b"], nodes=8, seq=2048, micro=2),
              gpu=_H100, unit="tokens/s/GPU", measured=4800, verdict="fits", nics_per_node=8, role="tuned stack"),
    # --- FSDP with and without CPU offload, 70B on one node: the GPU side (host RAM not published) ---
    Published(name="Llama-2 70B full, FSDP, 7 A100-80GB, no offload", source=COOKBOOK_URL,
              stack="llama-recipes FSDP, recompute", plan=dataclasses.replace(
                  _p(LLAMA2_70B, gpus=7, seq=4096, micro=4, recompute=True)), gpu=_A100_80,
              verdict="does not fit", verdict_of="gpu_verdict",
              note="\"it runs OOM on 7x A100 GPUs\"; batch 4 and seq 4096 (llama-recipes defaults) assumed"),
    Published(name="Llama-2 70B full, FSDP CPU offload, 7 A100-80GB", source=COOKBOOK_URL,
              stack="llama-recipes FSDP, recompute", plan=_p(LLAMA2_70B, strategy="fsdp-offload", gpus=7, seq=4096,
                                                             micro=4, recompute=True),
              gpu=_A100_80, verdict="fits", verdict_of="gpu_verdict",
              note="\"With --fsdp_cpu_offload ... the training job can run fine\"; GPU side only"),
    Published(name="Llama-2 70B full, FSDP CPU offload, 8 A100-40GB", source=TORCHTUNE_URL,
              stack="FSDP, recompute", plan=_p(LLAMA2_70B, strategy="fsdp-offload", seq=4096, micro=1, recompute=True),
              gpu=_A100_40, verdict="fits", verdict_of="gpu_verdict",
              note="\"fit full finetunes of 70B ... even 8x 40G A100s with CPU offloading\"; micro-batch 1 assumed"),
    # --- DeepSpeed ZeRO-3, HF LLaMA, seq 512 (ColossalAI issue 4311's baseline) ---
    Published(name="LLaMA-7B full, ds-zero3, 8 A800-80GB, seq 512, micro-batch 8", 
              source="https://github.com/hpcaitech/ColossalAI/issues/4311",
              stack="HF LLaMA + DeepSpeed ZeRO-3", plan=_p(SIZES["7b"], strategy="ds-zero3", seq=512, micro=8),
              gpu=GPUS["a800-80g"] if "a800-80g" in GPUS else _A100_80, unit="tokens/s/GPU", measured=64.1 * 512 / 8,
              verdict="fits", note="64.1 samples/s over 8 GPUs; no recompute assumed"),
)


def _with_gpu(p: Published) -> Accelerator:
    return dataclasses.replace(p.gpu, memory_gib=p.gpu_mem_gib) if p.gpu_mem_gib else p.gpu


def published_assumptions(p: Published, a: Assumptions = DEFAULT) -> Assumptions:
    return dataclasses.replace(a, nics_per_node=p.nics_per_node) if p.nics_per_node else a


def predict_published(p: Published, a: Assumptions = DEFAULT) -> dict[str, Any]:
    """What `estimate hours` / `estimate memory` say for the run: its time in the anchor's unit, the
    memory per GPU and the verdict."""
    a, gpu = published_assumptions(p, a), _with_gpu(p)
    plan = resolve(p.plan, gpu, a)  # the published micro-batch; FSDP's accumulation as the estimator picks it
    speed, mem = throughput(plan, gpu, a), memory(plan, gpu, a=a)
    time = None
    if p.unit == "s/step":
        time = speed["step_s"]
    elif p.unit == "tokens/s/GPU":
        time = speed["tokens_per_s_per_gpu"]
    return {"time": time, "gpu_mem_gib": mem["gpu_mem_gib"], "verdict": mem[p.verdict_of]}


def compare_published(a: Assumptions = DEFAULT) -> list[dict[str, Any]]:
    """Every published run beside the estimate. Time error: predicted/measured - 1 in the anchor's unit
    (s/step: positive is too slow; tokens/s: positive is too fast). A verdict is right when a run that
    ran is not refused ("fits" or "tight") and a run that did not fit is "does not fit"."""
    rows = []
    for p in PUBLISHED:
        got = predict_published(p, a)
        error = got["time"] / p.measured - 1 if p.measured and got["time"] else None
        slow = error if p.unit == "s/step" else (1 / (1 + error) - 1 if error is not None else None)
        right = None
        if p.verdict:
            right = (got["verdict"] == "does not fit") == (p.verdict == "does not fit")
        rows.append({"anchor": p.name, "source": p.source, "stack": p.stack, "strategy": p.plan.strategy,
                     "unit": p.unit, "measured": p.measured, "predicted": got["time"], "error": error,
                     "too_slow_by": slow, "role": p.role, "measured_mem_gib": p.measured_mem_gib,
                     "predicted_mem_gib": got["gpu_mem_gib"], "verdict": p.verdict,
                     "predicted_verdict": got["verdict"], "verdict_right": right, "note": p.note})
    return rows


def published_markdown(a: Assumptions = DEFAULT) -> str:
    """The README's table of held-out published runs (regenerate it after changing the model)."""
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:,.0f}" if x >= 100 else f"{x:.3g}"

    lines = ["| run | source | measured | predicted | error | memory per GPU: published / predicted, verdict | role |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in compare_published(a):
        time = f"{fmt(r['measured'])} {r['unit']}" if r["unit"] else "-"
        err = f"{r['error']:+.0%}" if r["error"] is not None else "-"
        mem = f"{fmt(r['measured_mem_gib'])} / {fmt(r['predicted_mem_gib'])} GiB"
        if r["verdict"]:
            mem += f", {r['verdict']}: {r['predicted_verdict']}" + ("" if r["verdict_right"] else " (wrong)")
        lines.append(f"| {r['anchor']} | [{r['source'].split('/')[3]}]({r['source']}) | {time} | {fmt(r['predicted'])} "
                     f"| {err} | {mem} | {r['role']}{': ' + r['note'] if r['note'] else ''} |")
    return "\n".join(lines) + "\n"
