"""The worker's training step against a plain transformers(+peft) loop, same card, same shapes, one run.

    python bench/worker_step.py                 # one GPU: 7B-shape LoRA r8 q/v and a 1.1B-shape full
                                                # fine-tune, seq 512, eager and torch.compile
    python bench/worker_step.py --cpu           # the tiny shape on the CPU, eager: what CI smokes
    python bench/worker_step.py --fill          # also the worker at the micro-batch the estimator
                                                # picks to fill the card

The worker rows run the worker's own code: its strategy builds the model (fsdp; with one process it
runs unsharded under bf16 autocast), build_optimizer (fused AdamW on GPU), and train.train_step
(forward, chunked fp32 cross-entropy, backward, clip, step), on random weights and random tokens in
one single-process group. The plain rows are what a guide's script does: LlamaForCausalLM in bf16
(+ peft LoRA), model(input_ids, labels).loss.backward(), torch.optim.AdamW, optionally the whole model
under torch.compile. Each row builds its own model, warms up (compiles), then times `--steps` steps
`--repeats` times with CUDA events (perf_counter on the CPU); the median is reported. MFU is model
FLOPs (the estimator's count) over the catalog's peak for the card, which is named. On GPU one more
worker step runs under CUDA's sync debugging, to show that the step never makes the host wait. Runs with torch,
transformers and peft alone (no submitit, deepspeed or click). --json writes the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llamajobs import catalog, estimate  # noqa: E402
from llamajobs.catalog import GPUS  # noqa: E402
from llamajobs.spec import JobSpec  # noqa: E402
from llamajobs.worker import model as model_lib  # noqa: E402
from llamajobs.worker import kernels, parallel, train  # noqa: E402
from llamajobs.worker.metrics import catalog_gpu, device_peak  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    size: str
    mode: str
    seq_len: int
    micro_batch: int

    def spec(self, device: str, compile: bool, micro_batch: int | None = None, *, kernels: str = "none",
             fp8: bool = False, strategy: str = "fsdp") -> JobSpec:
        mb = micro_batch or self.micro_batch
        return JobSpec(size=self.size, mode=self.mode, seq_len=self.seq_len, micro_batch=mb, global_batch=mb,
                       compile=compile and catalog.STRATEGY[strategy].compiles, warmup_ratio=0.0, device=device,
                       lora_r=8, lora_alpha=16, lora_targets=("q_proj", "v_proj"), cluster="local", procs_per_node=1,
                       kernels=kernels, fp8=fp8, strategy=strategy)


GPU_CASES = (Case("7b lora r8 q/v", "7b", "lora", 512, 8), Case("1.1b full", "tinyllama-1.1b", "full", 512, 8))
CPU_CASES = (Case("tiny lora r8 q/v", "tiny", "lora", 128, 4), Case("tiny full", "tiny", "full", 128, 4))


@dataclass
class Row:
    case: str
    loop: str  # "plain", "worker" (plain modules), "worker+liger", "worker+liger+fp8"
    compiled: bool
    micro_batch: int
    tokens_per_s: float = math.nan
    mfu: float | None = None
    peak: str = ""
    mem_gib: float | None = None
    first_loss: float = math.nan  # of the first warm-up step: about ln(vocab) for random weights
    loss: float = math.nan
    host_sync: str = "-"  # worker rows on GPU: "none", or the first operation that made the host wait
    error: str = ""
    vs_plain: float | None = None
    vs_plain_compiled: float | None = None
    strategy: str = "fsdp"
    predicted_tokens_per_s: float | None = None  # the estimator's, for this row's plan on this card
    predicted_mem_gib: float | None = None


# --- the two loops, each as a step function over one fixed random micro-batch ---


def random_batch(spec: JobSpec, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, spec.shape.vocab_size, (spec.micro_batch, spec.seq_len + 1), generator=generator)
    return tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device)


def randomize(model: torch.nn.Module) -> None:
    """Random weights in place of a checkpoint (the worker's own init reads or builds the full model
    on the CPU first: minutes for 7B). Norm scales 1, matrices N(0, 0.02)."""
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            local.fill_(1.0) if local.ndim == 1 else local.normal_(0.0, 0.02)


def worker_step(spec: JobSpec, env: parallel.Dist, batches: int = 1) -> Callable[[], torch.Tensor]:
    strategy = train.build_strategy(spec, env)
    model = strategy.build_model(model_lib.model_config(spec), load_weights=False,
                                 chosen=kernels.choose(spec, env.device.type))
    randomize(model)
    optimizer, scheduler = train.build_optimizer(model, spec, strategy, total=10**6)  # ~ the plain loop's fixed lr
    model, optimizer = strategy.wrap(model, optimizer)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    pool = [[random_batch(spec, env.device, seed)] for seed in range(batches)]
    max_norm = spec.grad_clip if spec.grad_clip > 0 else math.inf
    steps = iter(range(10**9))

    def step() -> torch.Tensor:
        loss, _ = train.train_step(model, optimizer, scheduler, pool[next(steps) % len(pool)], strategy=strategy,
                                   params=params, max_norm=max_norm, world_size=1)
        return loss
    return step


def plain_step(spec: JobSpec, device: torch.device) -> Callable[[], torch.Tensor]:
    from transformers import LlamaConfig, LlamaForCausalLM

    if kernels.liger_patched(LlamaForCausalLM):
        raise RuntimeError("the plain loop after Liger patched transformers in this process: it would be Liger's")

    config = LlamaConfig(**spec.shape.hf_config(), attn_implementation="sdpa", use_cache=False)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    if spec.mode_info.adapters:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(
            r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
            target_modules=list(spec.lora_targets), task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)
    forward = torch.compile(model) if spec.compile else model
    inputs, _ = random_batch(spec, device)

    def step() -> torch.Tensor:
        loss = forward(input_ids=inputs, labels=inputs).loss  # (HF shifts the labels itself)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


# --- timing ---


def seconds_per_step(step: Callable[[], torch.Tensor], device: torch.device, *, warmup: int, steps: int,
                     repeats: int) -> tuple[float, float, float]:
    """(median seconds per step, the first loss, the last). Warm-up absorbs compilation and allocator growth."""
    first = float(step())
    for _ in range(warmup - 1):
        loss = step()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                loss = step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000 / steps)
        else:
            t0 = time.perf_counter()
            for _ in range(steps):
                loss = step()
            times.append((time.perf_counter() - t0) / steps)
    return statistics.median(times), first, float(loss)


def first_host_sync(step: Callable[[], torch.Tensor]) -> str:
    """Run one step with CUDA's sync debugging set to raise: "none", or the operation that synced."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
        return "none"
    except RuntimeError as error:
        # Where: the innermost frame outside torch itself, i.e. the code that asked for the sync.
        torch_dir = str(Path(torch.__file__).parent)
        frames = [f for f in traceback.extract_tb(error.__traceback__) if not f.filename.startswith(torch_dir)]
        where = frames[-1] if frames else None
        return f"{'/'.join(Path(where.filename).parts[-2:])}:{where.lineno} {where.name}" if where else str(error)[:60]
    finally:
        torch.cuda.set_sync_debug_mode(0)


def measure(row: Row, build: Callable[[], Callable[[], torch.Tensor]], spec: JobSpec, device: torch.device,
            args: argparse.Namespace) -> Row:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step = build()
        step_s, row.first_loss, row.loss = seconds_per_step(step, device, warmup=args.warmup, steps=args.steps,
                                            repeats=args.repeats)
        if device.type == "cuda" and row.loop.startswith("worker"):
            row.host_sync = first_host_sync(step)
        del step
    except torch.OutOfMemoryError:
        row.error = "out of memory"
        return row
    except Exception as error:  # a strategy that fails on this device: the row says so, the bench goes on
        traceback.print_exc()
        row.error = f"{type(error).__name__}: {str(error).splitlines()[0][:100] if str(error) else ''}"
        return row
    finally:
        gc.collect()
        if spec.compile:
            torch._dynamo.reset()
        if device.type == "cuda":
            row.mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.empty_cache()
    row.tokens_per_s = spec.micro_batch * spec.seq_len / step_s
    row.peak, peak_flops = device_peak(device)
    if peak_flops:
        row.mfu = estimate.flops_per_token(spec.shape, spec.seq_len, spec.mode) * row.tokens_per_s / peak_flops
    return row


def join_single_process_group(spec: JobSpec) -> parallel.Dist:
    """The worker's own process-group setup, for a world of one (no torchrun)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    return parallel.init_distributed(spec)


def fill_micro_batch(case: Case, device: torch.device, compile: bool) -> int | None:
    """The estimator's largest power-of-two micro-batch that fits this card (up to 64)."""
    gpu = catalog_gpu(device)
    if gpu is None:
        return None
    plan = estimate.Plan.from_spec(case.spec("cuda", compile, micro_batch=1), gpus_per_node=1, global_batch=64)
    return estimate.largest_fitting_micro_batch(plan, gpu)


def fp8_card(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= kernels.FP8_CAPABILITY


def worker_loops(case: Case, device: torch.device, compile: bool) -> list[tuple[str, JobSpec]]:
    """The worker's variants of a case: the plain modules; on CUDA, Liger's kernels (the default
    there); for a compiled full fine-tune on a card with float8 matmuls, FP8 as well."""
    loops = [("worker", case.spec(device.type, compile, kernels="none"))]
    if device.type == "cuda":
        loops.append(("worker+liger", case.spec(device.type, compile, kernels="liger")))
        if compile and case.mode == "full" and fp8_card(device):
            loops.append(("worker+liger+fp8", case.spec(device.type, compile, kernels="liger", fp8=True)))
    return loops


def run(args: argparse.Namespace, env: parallel.Dist, cases: list[Case]) -> list[Row]:
    """The plain loop and the worker's variants of each case, eager and compiled, in the table's order.
    Liger patches transformers' modeling module for the whole process (kernels.apply), so every row
    with transformers' own modules is measured before the first Liger row."""
    device = env.device
    compiles = (True,) if args.compiled_only else (False, True) if args.compile else (False,)
    jobs: list[tuple[Row, JobSpec, Callable[[], Callable[[], torch.Tensor]]]] = []
    for case in cases:
        for compile in compiles:
            spec = case.spec(device.type, compile)
            jobs.append((Row(case.name, "plain", compile, spec.micro_batch), spec, partial(plain_step, spec, device)))
            for loop, spec in worker_loops(case, device, compile):
                jobs.append((Row(case.name, loop, compile, spec.micro_batch), spec, partial(worker_step, spec, env)))
        if args.fill and device.type == "cuda":
            micro = fill_micro_batch(case, device, compiles[-1])
            if micro and micro != case.micro_batch:
                spec = case.spec(device.type, compiles[-1], micro, kernels="liger")
                jobs.append((Row(case.name, "worker+liger", compiles[-1], micro), spec,
                             partial(worker_step, spec, env)))
    for row, spec, build in sorted(jobs, key=lambda job: "liger" in job[0].loop):
        print(format_row(measure(row, build, spec, device, args)), flush=True)
    return with_ratios([row for row, _, _ in jobs])


def run_strategies(args: argparse.Namespace, env: parallel.Dist, cases: list[Case]) -> list[Row]:
    """Every strategy on this one device, eager, with the estimator's prediction of the same plan beside."""
    rows = []
    gpu = catalog_gpu(env.device) if env.device.type == "cuda" else None
    for case in cases:
        for strategy in catalog.STRATEGIES:
            spec = case.spec(env.device.type, False, kernels="liger", strategy=strategy)
            row = Row(case.name, "worker+liger", False, spec.micro_batch, strategy=strategy)
            if gpu is not None:
                plan = estimate.Plan.from_spec(spec, gpus_per_node=1)
                row.predicted_tokens_per_s = estimate.throughput(plan, gpu)["tokens_per_s"]
                row.predicted_mem_gib = estimate.memory(plan, gpu)["gpu_mem_gib"]
            rows.append(measure(row, lambda: worker_step(spec, env), spec, env.device, args))
            print(format_strategy_row(rows[-1]), flush=True)
    return rows


def largest_micro_batches(args: argparse.Namespace, env: parallel.Dist, cases: list[Case]) -> list[str]:
    """The largest power-of-two micro-batch that trains, with the plain modules and with Liger's fused
    loss (the logits never exist), eager: what the fused loss buys in memory. Plain first (Liger
    patches the process)."""
    lines = []
    for loop, kernel in (("worker", "none"), ("worker+liger", "liger")):
        for case in cases:
            largest, micro = None, case.micro_batch
            while micro <= args.max_micro_batch:
                spec = case.spec(env.device.type, False, micro, kernels=kernel)
                row = measure(Row(case.name, loop, False, micro), lambda: worker_step(spec, env), spec, env.device,
                              argparse.Namespace(warmup=1, steps=1, repeats=1))
                if row.error:
                    break
                largest, micro = micro, micro * 2
            lines.append(f"largest micro-batch: {case.name:<18} {loop:<13} {largest} (tried powers of two "
                         f"from {case.micro_batch} up to {args.max_micro_batch})")
            print(lines[-1], flush=True)
    return lines


# FP8 against bf16: the mean loss of the last FP8_WINDOW steps may differ by this much (relative).
FP8_WINDOW, FP8_TOLERANCE = 20, 0.02


def fp8_against_bf16(args: argparse.Namespace, env: parallel.Dist, case: Case) -> list[str]:
    """`args.fp8_steps` compiled steps of the full fine-tune over 16 fixed random batches (the loss
    falls as the model memorises them), bf16 and FP8 from the same initial weights."""
    curves = {}
    for loop, fp8 in (("bf16", False), ("fp8", True)):
        spec = case.spec(env.device.type, True, kernels="liger", fp8=fp8)
        torch.manual_seed(0)
        step = worker_step(spec, env, batches=16)
        curves[loop] = [float(step()) for _ in range(args.fp8_steps)]
        del step
        gc.collect()
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    tail = {loop: statistics.mean(c[-FP8_WINDOW:]) for loop, c in curves.items()}
    gap = abs(tail["fp8"] - tail["bf16"]) / tail["bf16"]
    verdict = "within" if gap <= FP8_TOLERANCE else "OUTSIDE"
    lines = [f"fp8 vs bf16, {case.name}, {args.fp8_steps} steps: first loss {curves['bf16'][0]:.3f} / "
             f"{curves['fp8'][0]:.3f}, mean of the last {FP8_WINDOW} {tail['bf16']:.4f} / {tail['fp8']:.4f}, "
             f"gap {gap:.2%}: {verdict} the {FP8_TOLERANCE:.0%} tolerance",
             "fp8 curve (every 20th step, bf16/fp8): " + " ".join(
                 f"{i}:{curves['bf16'][i]:.2f}/{curves['fp8'][i]:.2f}" for i in range(0, args.fp8_steps, 20))]
    for line in lines:
        print(line, flush=True)
    return lines


def with_ratios(rows: list[Row]) -> list[Row]:
    """Each worker row over the plain loop of its case, eager and compiled (tokens/s against tokens/s)."""
    plain = {(r.case, r.compiled): r.tokens_per_s for r in rows if r.loop == "plain" and not r.error}
    for r in rows:
        if r.loop.startswith("worker") and not r.error:
            if (r.case, False) in plain:
                r.vs_plain = r.tokens_per_s / plain[(r.case, False)]
            if (r.case, True) in plain:
                r.vs_plain_compiled = r.tokens_per_s / plain[(r.case, True)]
    return rows


HEADER = (f"{'case':<18} {'loop':<16} {'compile':<7} {'mb':>3} {'tokens/s':>10} {'MFU':>6} {'peak':<12} "
          f"{'mem GiB':>7} {'loss':>6} {'/plain':>7} {'/plain+c':>8}  host sync")


def format_row(r: Row) -> str:
    def ratio(x: float | None) -> str:
        return f"{x:.2f}x" if x is not None else "-"
    if r.error:
        return f"{r.case:<18} {r.loop:<16} {str(r.compiled):<7} {r.micro_batch:>3} {r.error}"
    mfu = f"{r.mfu:.1%}" if r.mfu is not None else "-"
    mem = f"{r.mem_gib:.1f}" if r.mem_gib is not None else "-"
    return (f"{r.case:<18} {r.loop:<16} {str(r.compiled):<7} {r.micro_batch:>3} {r.tokens_per_s:>10,.0f} {mfu:>6} "
            f"{r.peak:<12} {mem:>7} {r.loss:>6.2f} {ratio(r.vs_plain):>7} {ratio(r.vs_plain_compiled):>8}  {r.host_sync}")


STRATEGY_HEADER = (f"{'case':<18} {'strategy':<17} {'mb':>3} {'tokens/s':>10} {'predicted':>10} {'MFU':>6} "
                   f"{'mem GiB':>7} {'predicted':>9}")


def format_strategy_row(r: Row) -> str:
    if r.error:
        return f"{r.case:<18} {r.strategy:<17} {r.micro_batch:>3} {r.error}"
    def num(x: float | None, fmt: str) -> str:
        width = int("".join(c for c in fmt.split(",")[0].split(".")[0] if c.isdigit()) or 0)
        return format(x, fmt) if x is not None else "-".rjust(width)
    return (f"{r.case:<18} {r.strategy:<17} {r.micro_batch:>3} {r.tokens_per_s:>10,.0f} "
            f"{num(r.predicted_tokens_per_s, '>10,.0f')} {num(r.mfu, '>6.1%')} {num(r.mem_gib, '>7.1f')} "
            f"{num(r.predicted_mem_gib, '>9.1f')}")


def predictions_text(device: torch.device) -> list[str]:
    """What the estimator predicts for the worker on this card, for the GPU cases."""
    if device.type != "cuda":
        return []
    gpu = catalog_gpu(device) or GPUS["h100"]
    lines = []
    for compile in (False, True):
        for name, p in estimate.bench_predictions(gpu, compile=compile).items():
            lines.append(f"estimate ({gpu.name}, {name}, mb {p['micro_batch']}, compile {compile}): "
                         f"{p['tokens_per_s']:,.0f} tokens/s, MFU {p['mfu']:.1%}, {p['gpu_mem_gib']:.1f} GiB")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="The tiny shape on the CPU (the CI smoke).")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="Also the torch.compile rows (default: on GPU yes, on the CPU no).")
    parser.add_argument("--compiled-only", action="store_true",
                        help="Only the torch.compile rows (the targets are against the compiled plain loop).")
    parser.add_argument("--fill", action="store_true", help="Also the worker at the estimator's micro-batch.")
    parser.add_argument("--loops", action=argparse.BooleanOptionalAction, default=True,
                        help="The plain loop against the worker's variants (default: yes).")
    parser.add_argument("--strategies", action="store_true", help="Also every strategy on this one device, with "
                                                                  "the estimator's predictions beside.")
    parser.add_argument("--max-micro-batch", type=int, default=0,
                        help="Also the largest power-of-two micro-batch that trains, up to this, plain and fused loss.")
    parser.add_argument("--fp8-steps", type=int, default=0, help="Also FP8 against bf16 over this many steps "
                                                                 "(the full fine-tune case, compiled; float8 cards).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 3 GPU, 1 CPU).")
    parser.add_argument("--steps", type=int, default=None, help="Steps per timed repeat (default 5 GPU, 2 CPU).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats; the median is reported.")
    parser.add_argument("--only", default=None, help="Only the cases whose name starts with this (e.g. 7b, 1.1b).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: pass --cpu for the small CPU shape")
    args.compile = (not args.cpu) if args.compile is None else args.compile
    args.warmup = args.warmup if args.warmup is not None else (1 if args.cpu else 3)
    args.steps = args.steps or (2 if args.cpu else 5)
    cases = [c for c in (CPU_CASES if args.cpu else GPU_CASES) if not args.only or c.name.startswith(args.only)]
    env = join_single_process_group(cases[0].spec("cpu" if args.cpu else "cuda", compile=False))
    device = env.device
    print("host sync: whether one worker step, after warm-up, makes the host wait for the GPU (none: it never does)")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}; "
          f"median of {args.repeats} x {args.steps} steps after {args.warmup} warm-up", flush=True)
    rows, strategy_rows, extra = [], [], []
    try:
        if args.loops:
            print(HEADER, flush=True)
            rows = run(args, env, cases)
        if args.strategies:
            print(STRATEGY_HEADER, flush=True)
            strategy_rows = run_strategies(args, env, cases)
        if args.max_micro_batch:
            extra += largest_micro_batches(args, env, cases)
        full = [c for c in cases if c.mode == "full"]
        if args.fp8_steps and full and fp8_card(device):
            extra += fp8_against_bf16(args, env, full[0])
    finally:
        parallel.teardown()
    if rows:
        print("\n" + HEADER)
        for r in rows:
            print(format_row(r))
    if strategy_rows:
        print("\n" + STRATEGY_HEADER)
        for r in strategy_rows:
            print(format_strategy_row(r))
    for line in extra + predictions_text(device):
        print(line)
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in rows + strategy_rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
