"""Measured throughput: hours per epoch and the time remaining of a running or finished job, from its
metrics rows (the worker's MetricsRow) and events."""

from __future__ import annotations

import math
from typing import Any, Iterable

from llamajobs.estimate.assumptions import DEFAULT, Assumptions
from llamajobs.estimate.results import MeasuredHours
from llamajobs.metrics import MetricsRow


def _checkpoint_pauses(events: Iterable[Any]) -> dict[int, float]:
    """Seconds spent saving, by step, from the "checkpointed" events (lines that are not such an event
    with a numeric step and seconds are no pause)."""
    pauses = {}
    for e in events:
        if isinstance(e, dict) and e.get("event") == "checkpointed":
            step, seconds = e.get("step"), e.get("seconds") or 0
            if isinstance(step, int) and isinstance(seconds, (int, float)) and not isinstance(seconds, bool):
                try:
                    pauses[step] = float(seconds)
                except OverflowError:  # an integer beyond float's range: no pause anyone measured
                    continue
    return pauses


def hours_from_metrics(metrics: list[MetricsRow], events: Iterable[Any] = (), tokens: int | None = None,
                       tokens_per_epoch: int | None = None, a: Assumptions = DEFAULT) -> MeasuredHours | None:
    """Hours per epoch and the time remaining from a run's metrics rows (`llamajobs.metrics.read`) and
    events.

    Each row's step_time_s averages the wall time since the previous row, so a checkpoint written in
    between is inside it: the "checkpointed" events' seconds are taken out of the interval that holds
    their step. The first `warmup_steps` steps of every attempt (a resumed attempt restarts its
    elapsed_s) are left out. Throughput = steady tokens / steady seconds.
    """
    rows = [m for m in metrics if m.step and m.step_time_s > 0]
    if not rows:
        return None
    pauses = _checkpoint_pauses(events)
    intervals = []  # (first step, steps, seconds without checkpoint pauses, in warm-up)
    prev_step, prev_elapsed, attempt_start = 0, None, 0
    for row in rows:
        step = row.step
        if prev_elapsed is not None and (row.elapsed_s < prev_elapsed or step <= prev_step):
            attempt_start = step - max(1, round(row.elapsed_s / max(row.step_time_s, 1e-9)))  # a new attempt
            prev_step = max(attempt_start, 0)
        steps = max(1, step - prev_step)
        paused = sum(sec for s, sec in pauses.items() if prev_step <= s < step)
        seconds = max(row.step_time_s * steps - paused, 1e-9)
        warm = prev_step - attempt_start < a.warmup_steps
        intervals.append((prev_step, steps, seconds, warm))
        prev_step, prev_elapsed = step, row.elapsed_s
    steady = [i for i in intervals if not i[3]] or intervals[1:] or intervals
    last = rows[-1]
    tokens_per_step = last.tokens / last.step if last.tokens else None
    step_s = sum(i[2] for i in steady) / sum(i[1] for i in steady)
    tokens_per_s = tokens_per_step / step_s if tokens_per_step else last.tokens_per_s
    per_gpu_share = last.tokens_per_s_per_gpu / last.tokens_per_s if last.tokens_per_s else None
    flops_over_peak = last.mfu / last.tokens_per_s_per_gpu if last.mfu and last.tokens_per_s_per_gpu else None
    per_gpu = tokens_per_s * per_gpu_share if per_gpu_share else None
    if tokens is None and last.epoch and math.isfinite(per_epoch := last.tokens / last.epoch):
        tokens = int(round(per_epoch))
    tokens = tokens or tokens_per_epoch
    total = last.total_steps
    remaining_steps = max(0, total - last.step) if total else None
    checkpoint_s = sum(pauses.values())
    elapsed_steady = sum(i[2] for i in intervals)
    # Checkpoints to come: as often per computed second as so far.
    ckpt_rate = checkpoint_s / elapsed_steady if elapsed_steady else 0.0
    remaining_s = remaining_steps * step_s * (1 + ckpt_rate) if remaining_steps is not None else None
    return MeasuredHours(
        hours_per_epoch=tokens / tokens_per_s / 3600 if tokens and tokens_per_s else None,
        tokens_per_epoch=tokens,
        tokens_per_s=tokens_per_s,
        tokens_per_s_per_gpu=per_gpu,
        mfu=per_gpu * flops_over_peak if per_gpu and flops_over_peak else last.mfu,
        peak=last.peak,
        gpu_mem_gib=max(m.mem_gib for m in rows) or None,
        step_s=step_s,
        steady_steps=sum(i[1] for i in steady),
        step=last.step,
        total_steps=total,
        remaining_s=remaining_s,
        remaining_hours=remaining_s / 3600 if remaining_s is not None else None,
        checkpoint_s=checkpoint_s,
    )
