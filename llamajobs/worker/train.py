"""The training loop, top to bottom: one process per GPU (or two on a CPU box) under torchrun (or
DeepSpeed's launcher); --strategy pp runs one process per node.

main() reads the spec, joins the process group, runs train() and leaves the group. train() is the
table of contents: tokenizer, data, model, parallelism, optimizer and schedule, resume, the loop
(with its checkpoints), the export of final/. Everything it calls is a small function here or in the
module named for its concern (model.py, parallel.py and zero.py for the strategies, checkpoint.py,
metrics.py, rng.py, llamajobs.data).
"""

from __future__ import annotations

import functools
import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import get_error_handler, record
from torch.optim.lr_scheduler import LambdaLR
from transformers import LlamaConfig, PreTrainedTokenizerBase

from llamajobs import events
from llamajobs.catalog import TINY_VOCAB, objective_flops_per_token
from llamajobs.data import SAMPLE_CORPUS, read_texts
from llamajobs.data.sampler import (IGNORE_INDEX, MicroBatch, WindowSampler, steps_per_epoch, tokenize_documents,
                                     total_steps)
from llamajobs.data import instruct, preference
from llamajobs.data.store import TokenStore, open_documents
from llamajobs.data.tokenizer import ensure_tokenizer, load_tokenizer
from llamajobs.rules import validate_objective_data, validate_packing
from llamajobs.spec import JobSpec
from llamajobs.worker import model as model_lib
from llamajobs.worker import dpo, kernels, packing, parallel, rng, sinks, validate, zero
from llamajobs.worker.checkpoint import Checkpointer, CheckpointWriteError, TrainState, find_resume_step
from llamajobs.worker.metrics import MetricsLogger, device_description
from llamajobs.worker.parallel import Dist, Strategy

MIN_LR_RATIO = 0.1  # the cosine decays to this fraction of the peak learning rate


@record  # torchrun then reports the failing rank's root-cause traceback, not just "exit code 1"
def main(argv: list[str] | None = None) -> int:
    run_dir = parse_run_dir(sys.argv[1:] if argv is None else argv)
    spec = JobSpec.load(run_dir / "spec.json")
    check_supported(spec)  # before joining the group: a refusal costs no rendezvous
    env = parallel.init_distributed(spec)
    try:
        train(run_dir, spec, env)
    except CheckpointWriteError as error:  # its message is the whole story: one line, no traceback
        get_error_handler().record_exception(error)  # torchrun's error file, which `status` shows
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        parallel.teardown()  # out here, where the model is no longer reachable
    return 0


def train(run_dir: Path, spec: JobSpec, env: Dist) -> None:
    """The run from start (or resume) to final/ or to a stop request. Every rank runs it."""
    seed_and_configure(spec.seed, env)
    tokenizer = build_tokenizer(spec, run_dir, env)
    sampler, steps_in_epoch = build_data(spec, tokenizer, env)
    total = total_steps(spec.max_steps, spec.epochs, steps_in_epoch)
    config = model_lib.model_config(spec)
    model_lib.check_vocab(config, tokenizer)
    resume_step = find_resume_step(run_dir, spec, env)  # None: this attempt starts at step 0
    strategy = build_strategy(spec, env)
    check_node(spec, env, strategy.devices_per_process)
    # Decided once, for the device this process trains on: the model is built with it, the log says it.
    chosen = kernels.choose(spec, env.device.type)
    # A full fine-tune's checkpoint holds every weight: resuming one needs no base weights read.
    model = strategy.build_model(config, load_weights=resume_step is None or spec.mode_info.frozen_base,
                                 chosen=chosen)
    optimizer, scheduler = build_optimizer(model, spec, strategy, total)
    model, optimizer = strategy.wrap(model, optimizer)  # DeepSpeed: its engine and ZeRO optimizer
    announce(spec, run_dir, env, model, strategy, chosen, steps_in_epoch=steps_in_epoch, total=total)
    checkpointer = Checkpointer(run_dir, spec, env, TrainState(model, optimizer, scheduler, sampler), strategy)
    start = checkpointer.resume(resume_step)  # 0 without a checkpoint
    metrics = build_metrics(run_dir, spec, env, strategy, total=total, steps_in_epoch=steps_in_epoch, start=start)
    validator = validate.build_validator(spec, env, strategy, total=total, pad_id=tokenizer.eos_token_id)
    objective = dpo.build(spec, strategy, config, chosen) if spec.objective == "dpo" else None  # None: SFT's token loss
    step, stopped = train_loop(model, optimizer, scheduler, sampler, metrics, checkpointer,
                               spec=spec, env=env, start=start, total=total, strategy=strategy, validator=validator,
                               objective=objective)
    checkpointer.wait()  # a periodic save still being written in the background is committed first
    metrics.close()  # the TensorBoard and wandb files are complete before the export (or the requeue)
    if not stopped:  # (stopped: the checkpoint of `step` is complete; the launcher requeues the job)
        finish(model, strategy, spec, config, tokenizer, run_dir, env, step)


def parse_run_dir(args: list[str]) -> Path:
    # DeepSpeed's launcher adds --local_rank=N (LOCAL_RANK in the environment says the same).
    args = [a for a in args if not a.startswith(("--local_rank=", "--local-rank="))]
    if len(args) != 1:
        raise SystemExit("usage: python -m llamajobs.worker RUN_DIR   (under torchrun; RUN_DIR holds spec.json)")
    return Path(args[0]).resolve()


def check_supported(spec: JobSpec) -> None:
    """Refuse, with the setting to change, the files this run cannot start from (before any rank loads
    anything). Every rule on the spec's values is JobSpec validation's: spec.json passed it when read."""
    if spec.data:
        TokenStore(spec.data)  # reads meta.json only: a path that is not a complete store fails here
    model_lib.check_init_from(spec)


def seed_and_configure(seed: int, env: Dist) -> None:
    """Per-rank seeds (dropout masks must differ between ranks). Identical weights do not rely on
    this: rank 0 initialises them with `seed` and broadcasts; the sampler has its own generators."""
    rng.seed_all(seed, env.rank)
    if env.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for whatever fp32 matmuls remain


# --- builders ---


def build_tokenizer(spec: JobSpec, run_dir: Path, env: Dist) -> PreTrainedTokenizerBase:
    """The tokenizer the starting weights were trained with: --init-from's (a final/ holds one),
    --model-path's, or the bundled one: trained by rank 0 on the sample corpus into RUN_DIR/tokenizer
    (once per run; a requeued attempt reuses it), then loaded by every rank."""
    if spec.init_from and (Path(spec.init_from) / "tokenizer_config.json").is_file():
        return load_tokenizer(spec.init_from)
    if spec.model_path:
        return load_tokenizer(spec.model_path)
    path = run_dir / "tokenizer"
    if env.rank == 0:
        ensure_tokenizer(read_texts(SAMPLE_CORPUS), TINY_VOCAB, path)
    dist.barrier()
    return load_tokenizer(path)


def build_data(spec: JobSpec, tokenizer: PreTrainedTokenizerBase, env: Dist) -> tuple[WindowSampler, int]:
    """This rank's sampler and the number of steps in an epoch. A token store (--data) is memory
    mapped, after its tokenizer fingerprint is checked against ours; without one, the sample corpus
    is tokenised in memory (small: every rank does it). Instruction stores (with a loss mask) are
    packed into rows; preference stores (DPO) give pairs; pretraining stores give one random window
    per document per epoch."""
    spec.accum_steps(env.world_size)  # fail with the batch arithmetic spelled out (the node's world size)
    docs = open_documents(spec.data, tokenizer) if spec.data else tokenize_documents(read_texts(SAMPLE_CORPUS), tokenizer)
    shared = dict(seq_len=spec.seq_len, global_batch=spec.global_batch, micro_batch=spec.micro_batch,
                  rank=env.rank, world_size=env.world_size, seed=spec.seed, pad_id=tokenizer.eos_token_id)
    validate_objective_data(spec, preference.is_preference_store(docs))  # submit refused it already
    if preference.is_preference_store(docs):
        pairs = preference.PairSampler(docs, **shared)
        return pairs, preference.steps_per_epoch(pairs, spec.tokens_per_epoch)
    if getattr(docs, "has_loss_mask", False):
        validate_packing(spec, packed=True)  # submit refused it already; a hand-edited spec.json too
        packed = instruct.PackedSampler(docs, **shared)
        return packed, instruct.steps_per_epoch(packed, spec.tokens_per_epoch)
    sampler = WindowSampler(docs, **shared)
    return sampler, steps_per_epoch(len(docs), spec.global_batch, spec.seq_len, spec.tokens_per_epoch)


def check_node(spec: JobSpec, env: Dist, devices_per_process: int) -> None:
    """What only the node can tell, refused with the setting to change: the processes the launch
    started and the devices each drives (validation planned them from the login node)."""
    if spec.strategy_info.one_process_per_node:
        if env.local_world_size > 1:
            raise ValueError(f"--strategy {spec.strategy} runs one process per node (it drives all the node's "
                             f"GPUs), not {env.local_world_size}; leave --procs-per-node out")
        if spec.mode_info.layer_prefix and devices_per_process > 1:
            raise NotImplementedError(f"--mode {spec.mode} with --strategy {spec.strategy} on {devices_per_process} "
                                      "GPUs: the prefix's keys and values would have to follow each layer to its "
                                      "GPU; use --strategy fsdp (or one GPU)")
    # The real world size can differ from the planned one (procs per node are counted on the node).
    spec.accum_steps(env.world_size)
    if spec.fp8:
        kernels.check_fp8_device(env.device)


# The Strategy class of each engine the catalog's StrategyInfo names (zero.py imports DeepSpeed only
# when one of its hooks runs).
ENGINES: dict[str, type[Strategy]] = {"fsdp": parallel.Fsdp, "deepspeed": zero.Zero, "pp": parallel.LayerSplit}


def build_strategy(spec: JobSpec, env: Dist | None) -> Strategy:
    return ENGINES[spec.strategy_info.engine](spec, env)


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup over `warmup`
    steps, then a cosine from 1 at the first step after warmup to MIN_LR_RATIO at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    return MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, spec: JobSpec, strategy: Strategy,
                    total: int) -> tuple[torch.optim.Optimizer, LambdaLR]:
    """The strategy's AdamW over the trainable parameters only (LoRA: the adapters). No weight decay
    on vectors (norm scales): decaying them towards 0 only hurts."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    ndim = [len(getattr(p, "ds_shape", p.shape)) for p in trainable]  # (ZeRO-3 partitions look 1-D)
    groups = [{"params": [p for p, n in zip(trainable, ndim) if n >= 2], "weight_decay": spec.weight_decay},
              {"params": [p for p, n in zip(trainable, ndim) if n < 2], "weight_decay": 0.0}]
    optimizer = strategy.build_optimizer([g for g in groups if g["params"]])
    warmup = math.ceil(spec.warmup_ratio * total)
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, warmup=warmup, total=total))
    return optimizer, scheduler


def build_metrics(run_dir: Path, spec: JobSpec, env: Dist, strategy: Strategy, *, total: int, steps_in_epoch: int,
                  start: int) -> MetricsLogger:
    metrics = MetricsLogger(
        run_dir, enabled=env.rank == 0, total_steps=total, steps_per_epoch=steps_in_epoch,
        tokens_per_step=spec.global_batch * spec.rows_per_example * spec.seq_len,
        flops_per_token=objective_flops_per_token(spec.shape, spec.seq_len, spec.mode, spec.objective),
        # Per GPU: pp's one process drives all of its node's GPUs.
        world_size=env.world_size * strategy.devices_per_process, device=env.device,
        sinks=sinks.open_sinks(run_dir, spec, start=start) if env.rank == 0 else ())
    metrics.discard_after(start)  # an earlier attempt's steps past its last checkpoint are redone now
    return metrics


def announce(spec: JobSpec, run_dir: Path, env: Dist, model: nn.Module, strategy: Strategy, chosen: kernels.Kernels,
             *, steps_in_epoch: int, total: int) -> None:
    """The token budget up front (like nanoGPT), and the "started" event."""
    if env.rank != 0:
        return
    tokens_per_step = spec.global_batch * spec.rows_per_example * spec.seq_len
    accum = spec.accum_steps(env.world_size)
    # DTensor numel is the global size; a ZeRO-3 partition's is not (ds_numel is).
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    n_params, n_trainable = sum(n for n, _ in sizes), sum(n for n, trainable in sizes if trainable)
    print(f"model: {spec.shape.name} {spec.mode}, {n_params:,} parameters, {n_trainable:,} trainable; "
          f"{spec.strategy} over {env.world_size} processes on {device_description(env.device)}", flush=True)
    if details := strategy.describe(run_dir):
        print(details, flush=True)
    if switches := spec.debug.describe():
        print(switches, flush=True)
    print(chosen.describe(), flush=True)
    if spec.objective == "dpo":
        reference = "the base with the adapters disabled" if spec.mode_info.adapters else "a frozen copy of the start"
        print(f"objective: dpo, loss {spec.loss}, beta {spec.beta}; each example a pair (chosen and rejected "
              f"answers, 2 rows), the reference {reference}", flush=True)
    print(f"tokens per step: {tokens_per_step:,} = global batch {spec.global_batch}"
          f"{' pairs x 2' if spec.rows_per_example == 2 else ''} x seq len {spec.seq_len} "
          f"({accum} micro-batches of {spec.micro_batch} on each of {env.world_size} ranks)", flush=True)
    print(f"steps: {total:,} = {total / steps_in_epoch:.2f} epochs of {steps_in_epoch:,} steps "
          f"({steps_in_epoch * tokens_per_step:,} tokens per epoch, {total * tokens_per_step:,} in all)", flush=True)
    events.record(run_dir, "started", world_size=env.world_size, hosts=sorted(set(env.hosts)),
                  device=device_description(env.device))


# --- the loop ---


def to_device(micro_batches: list[MicroBatch], device: torch.device) -> list[MicroBatch]:
    if device.type != "cuda":
        return micro_batches
    # Pinned memory makes the copies asynchronous: no host sync inside the step.
    return [tuple(t.pin_memory().to(device, non_blocking=True) for t in batch) for batch in micro_batches]


def forward_backward(model: nn.Module, micro_batches: list[MicroBatch], world_size: int,
                     strategy: Strategy) -> torch.Tensor:
    """Accumulate into .grad the gradient of the global batch's mean token loss; return this rank's
    share of that mean (detached; the sum of the shares over ranks is the mean).

    Each micro-batch's loss is its summed token cross-entropy over the number of label tokens in the
    whole global batch (all ranks, counted before the forwards with one all-reduce), so ranks and
    micro-batches with more real (unpadded) tokens weigh more, exactly as in one pass over the
    global batch. FSDP and DeepSpeed average gradients over ranks; the world_size factor turns that
    into a sum. (The strategy's backward is the engine's under DeepSpeed, told not to divide again.)
    """
    n_tokens = torch.stack([(labels != IGNORE_INDEX).sum() for _, labels, *_ in micro_batches]).sum()
    dist.all_reduce(n_tokens)
    scale = world_size / n_tokens.clamp(min=1)
    share = torch.zeros((), device=n_tokens.device)
    for i, (inputs, labels, *positions) in enumerate(micro_batches):
        strategy.set_gradient_sync(model, i == len(micro_batches) - 1)
        with strategy.autocast():
            # The summed token loss, from the model's loss forward (worker/kernels.py); packed rows
            # carry each document's positions, and a mask that keeps documents apart (packing.py).
            loss_sum = model(**packing.model_inputs(inputs, *positions), labels=labels).loss
        strategy.backward(model, loss_sum * scale.to(loss_sum.device))
        share += loss_sum.detach().to(share.device) * (scale / world_size)
    return share


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR,
               micro_batches: list[MicroBatch], *, strategy: Strategy, params: list[nn.Parameter], max_norm: float,
               world_size: int, objective: dpo.Dpo | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches: (loss share, gradient norm), both still on
    the device: nothing here waits for the GPU (bench/worker_step.py times exactly this). With a DPO
    objective the share is a vector of its statistics (dpo.STATS, the loss first)."""
    if objective is not None:
        loss = objective.forward_backward(model, micro_batches, world_size, strategy)
    else:
        loss = forward_backward(model, micro_batches, world_size, strategy)
    grad_norm = strategy.step(model, optimizer, params, max_norm)  # clip, update, zero the gradients
    scheduler.step()
    return loss, grad_norm


def train_loop(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: LambdaLR, sampler: WindowSampler,
               metrics: MetricsLogger, checkpointer: Checkpointer, *, spec: JobSpec, env: Dist, start: int,
               total: int, strategy: Strategy, validator: validate.Validator | None,
               objective: dpo.Dpo | None = None) -> tuple[int, bool]:
    """Optimizer steps start+1..total, one global batch each, a checkpoint whenever due; returns the
    last step and whether a stop request ended the loop there (its checkpoint saved)."""
    params = [p for p in model.parameters() if p.requires_grad]
    max_norm = spec.grad_clip if spec.grad_clip > 0 else math.inf
    crash_step, oom_step = spec.debug.fault_at("crash"), spec.debug.fault_at("oom")  # (tests: spec.json's debug)
    model.train()
    metrics.start_clock(start)
    data_wait = 0.0  # host seconds spent getting batches since the last log
    step = start
    for step in range(start + 1, total + 1):
        if step == crash_step:
            raise RuntimeError(f"injected fault at step {step}")
        if step == oom_step:
            raise torch.OutOfMemoryError(f"CUDA out of memory: injected fault at step {step}")
        lr = scheduler.get_last_lr()[0]
        # Host-side clock only: the copies are queued, never waited for (no device sync in the step).
        fetching = time.perf_counter()
        micro_batches = to_device(next(sampler), env.device)
        data_wait += time.perf_counter() - fetching
        loss, grad_norm = train_step(model, optimizer, scheduler, micro_batches,
                                     strategy=strategy, params=params, max_norm=max_norm, world_size=env.world_size,
                                     objective=objective)
        validation = validator.after_step(model, step) if validator else None  # every N steps and the last
        if step % spec.log_every_steps == 0 or step == total or validation:
            dist.all_reduce(loss)  # the shares -> the global batch's mean token (or pair) loss
            stats = dict(zip(dpo.STATS, loss.tolist())) if objective is not None else None
            metrics.log(step, loss.flatten()[0].item(), lr, grad_norm.item(), data_wait_s=data_wait,
                        checkpoint_total_s=checkpointer.seconds_saving, validation=validation, preference=stats)
            data_wait = 0.0
        if checkpointer.after_step(step):  # at the optimizer-step boundary: a saved checkpoint, if due
            return step, True
    return step, False


# --- the end ---


def finish(model: nn.Module, strategy: Strategy, spec: JobSpec, config: LlamaConfig,
           tokenizer: PreTrainedTokenizerBase, run_dir: Path, env: Dist, step: int) -> None:
    """final/ in HF format (bf16 on GPU, fp32 on the CPU), then the "finished" event."""
    export_dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
    final = model_lib.export_final(strategy.unwrap(model), spec, config, tokenizer, run_dir, env.rank, export_dtype,
                                   step, gather=functools.partial(strategy.gather, model))
    if env.rank == 0:
        events.record(run_dir, "finished", step=step)
        print(f"finished at step {step}; wrote {final}", flush=True)
