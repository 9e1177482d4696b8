"""Validation loss while training: the mean token loss over the store's eval split (`data prepare
--eval-fraction`), or its first --eval-batches micro-batches on each rank, every --eval-every-steps
optimizer steps and after the last one.

The eval split is cut into the same examples as training (packed rows for instruction data,
documents isolated; one window per document otherwise), in the store's own order, and dealt out
over the ranks; every rank runs the same number of forwards (FSDP and ZeRO-3 gather parameters in
each one), a rank with nothing left running a row of padding whose labels are all ignored. The sum
of token losses and the count of target tokens are all-reduced, so the loss is the mean over every
target token of the split, whatever the world size. The model is in eval mode (no dropout) and no
gradient is kept.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from llamajobs.data import instruct
from llamajobs.data.sampler import IGNORE_INDEX, BatchStream, WindowSampler
from llamajobs.data.store import TokenStore
from llamajobs.spec import JobSpec
from llamajobs.worker import packing
from llamajobs.worker.parallel import Dist, Strategy

@dataclass(frozen=True, slots=True)
class Validation:
    loss: float  # mean token cross-entropy over the eval split
    tokens: int  # target tokens it was taken over
    seconds: float  # wall time spent (left out of the step time of the metrics row)


def eval_stream(spec: JobSpec, store: TokenStore | None, pad_id: int) -> BatchStream | None:
    """The eval split's examples, as training cuts them; None when the store has no eval split."""
    held = store.eval_split() if store is not None else None
    if held is None or len(held) == 0 or held.meta.get("pairs"):  # (DPO's validation is not implemented yet)
        return None
    shared = dict(seq_len=spec.seq_len, global_batch=1, micro_batch=1, rank=0, world_size=1, seed=spec.seed,
                  pad_id=pad_id)
    if held.has_loss_mask:
        return instruct.PackedSampler(held, **shared)  # documents isolated (rules.validate_packing)
    return WindowSampler(held, **shared)


def examples_in(stream: BatchStream) -> int:
    if isinstance(stream, instruct.PackedSampler):
        return stream.rows_in_epoch(0)
    return stream.n_docs


def build_validator(spec: JobSpec, env: Dist, strategy: Strategy, *, total: int, pad_id: int) -> Validator:
    stream = eval_stream(spec, TokenStore(spec.data) if spec.data else None, pad_id)
    if stream is None and spec.eval_every_steps and env.rank == 0:
        print(f"note: --eval-every-steps {spec.eval_every_steps}: the data has no eval split (`data prepare "
              f"--eval-fraction`), so no validation loss", flush=True)
    return Validator(stream, every=spec.eval_every_steps, total=total, micro_batch=spec.micro_batch, env=env,
                     strategy=strategy, max_batches=spec.eval_batches)


class Validator:
    """Runs validation when due: `after_step(step)` returns a Validation, or None when not due."""

    def __init__(self, stream: BatchStream | None, *, every: int | None, total: int, micro_batch: int, env: Dist,
                 strategy: Strategy, max_batches: int | None = None) -> None:
        self.stream, self.every, self.total = stream, every, total
        self.micro_batch, self.env, self.strategy = micro_batch, env, strategy
        self.max_batches = max_batches  # --eval-batches: the same first examples every time, so the curve compares

    def due(self, step: int) -> bool:
        return self.stream is not None and (step == self.total or bool(self.every) and step % self.every == 0)

    def after_step(self, model: nn.Module, step: int) -> Validation | None:
        if not self.due(step):
            return None
        started = time.perf_counter()
        loss_sum, tokens = self.run(model)
        return Validation(loss_sum / max(tokens, 1), tokens, time.perf_counter() - started)

    def batches(self) -> int:
        """Micro-batches each rank runs: the whole split's, or --eval-batches when fewer."""
        per_round = self.micro_batch * self.env.world_size
        whole = math.ceil(examples_in(self.stream) / per_round)
        return whole if self.max_batches is None else min(whole, self.max_batches)

    def micro_batch_at(self, b: int) -> tuple[torch.Tensor, ...]:
        """This rank's b-th micro-batch: examples dealt out by rank, padding rows past the end."""
        n = examples_in(self.stream)
        first = (b * self.env.world_size + self.env.rank) * self.micro_batch
        rows = [self.stream.example(i) if i < n else self._padding() for i in range(first, first + self.micro_batch)]
        return tuple(torch.from_numpy(np.stack(column)) for column in zip(*rows))

    def _padding(self) -> tuple[np.ndarray, ...]:
        inputs, labels, *positions = self.stream.example(0)
        return (np.full_like(inputs, self.stream.pad_id), np.full_like(labels, IGNORE_INDEX),
                *(np.arange(len(inputs)) for _ in positions))

    @torch.no_grad()
    def run(self, model: nn.Module) -> tuple[float, int]:
        """(summed token loss, target tokens) over the split (or its first batches), all ranks together."""
        was_training = model.training
        model.eval()
        device = self.env.device
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        try:
            for b in range(self.batches()):
                inputs, labels, *positions = (t.to(device, non_blocking=True) for t in self.micro_batch_at(b))
                with self.strategy.autocast():
                    # The training loss's own forward (worker/kernels.py): fused where it is, chunked elsewhere.
                    loss = model(**packing.model_inputs(inputs, *positions), labels=labels).loss
                labels = labels.to(loss.device)
                totals += torch.stack([loss.double().to(device), (labels != IGNORE_INDEX).sum().double().to(device)])
        finally:
            model.train(was_training)
        dist.all_reduce(totals)
        return totals[0].item(), int(totals[1].item())
