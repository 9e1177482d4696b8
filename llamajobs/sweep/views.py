"""The sweep's views: the estimate before submitting, what was submitted, the trials' table and pivot."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from llamajobs.views import fmt, hours, out, percent


def sweep_estimate(estimate: Any) -> None:
    """Each trial's predicted hours and memory verdict, and the sweep's GPU-hours and wall-clock."""
    if estimate.gpu is None:  # every trial on the local cluster's CPU: the estimator models GPUs
        notes = sorted({t.note for t in estimate.trials})
        out.print(f"estimate: {len(estimate.trials)} trials, {'; '.join(notes)}", markup=False, highlight=False)
        return
    table = Table(box=None, header_style="bold", title="estimate, before anything is queued", title_justify="left")
    for col in ("trial", "axes", "h/epoch", "hours", "GPUs", "GPU-h", "GiB/GPU", "memory", "note"):
        table.add_column(col)
    for t in estimate.trials:
        table.add_row(str(t.trial), escape(t.label), hours(t.hours_per_epoch), hours(t.hours), str(t.gpus or "-"),
                      hours(t.gpu_hours), fmt(t.gpu_mem_gib, ".1f"), t.verdict or "-", escape(t.note))
    out.print(table)
    gpu = f" on {estimate.gpu}{estimate.gpu_note}" if estimate.gpu else ""
    out.print(f"{len(estimate.trials)} trials{gpu}: {hours(estimate.gpu_hours)} GPU-hours in all, "
              f"{hours(estimate.wall_hours)} hours of wall-clock at {estimate.max_parallel} in parallel",
              markup=False, highlight=False)


def sweep_submitted(result: Any) -> None:
    s = result.sweep
    out.print(f"sweep {s.id} ({escape(s.name)}): {len(result.submitted)} trials submitted, "
              f"{len(s.trials) - len(result.submitted)} already had a job; {escape(str(s.dir / 'sweep.json'))}")
    for t in s.trials:
        new = " (new)" if t.trial in result.submitted else ""
        out.print(f"  trial {t.trial}: job {t.job}{new}  {escape(t.label())}", highlight=False)


def _axis_text(value: Any) -> str:
    return ",".join(value) if isinstance(value, tuple) else f"{value:g}" if isinstance(value, float) else str(value)


def sweep_table(found: Any) -> None:
    axes = list(found.sweep.definition.axes)
    best = found.best
    table = Table(box=None, header_style="bold", title=f"sweep {found.sweep.id} ({escape(found.sweep.name)})",
                  title_justify="left")
    for col in ("trial", "job", *[a.replace("_", "-") for a in axes], "state", "step", "loss", "best val",
                "accuracy", "tok/s", "GPU-h"):
        table.add_column(col)
    for r in found.rows:
        mark = " *" if r.trial.trial == best else ""
        table.add_row(f"{r.trial.trial}{mark}", fmt(r.trial.job), *[escape(_axis_text(r.trial.values[a])) for a in axes],
                      escape(r.state + (f": {r.error}" if r.error else "")),
                      f"{fmt(r.step)}/{fmt(r.total_steps)}", fmt(r.loss, ".4f"), fmt(r.val_loss, ".4f"),
                      percent(r.accuracy), fmt(r.tokens_per_s, ",.0f"), fmt(r.gpu_hours, ".2f"))
    out.print(table)
    if best is not None:
        by = "validation loss" if any(r.val_loss is not None for r in found.rows) else "training loss (no validation)"
        out.print(f"* best trial: {best}, lowest {by}", markup=False, highlight=False)


def sweep_pivot(found: Any, pivot: Any) -> None:
    table = Table(box=None, header_style="bold", title=f"sweep {found.sweep.id}: {pivot.metric}, "
                  f"{pivot.row_axis.replace('_', '-')} by {pivot.col_axis.replace('_', '-')}", title_justify="left")
    table.add_column(f"{pivot.row_axis.replace('_', '-')} \\ {pivot.col_axis.replace('_', '-')}")
    for c in pivot.columns:
        table.add_column(escape(_axis_text(c)))
    digits = "" if pivot.metric in ("step",) else ",.0f" if pivot.metric == "tokens_per_s" else ".4f"
    for value, cells in zip(pivot.rows, pivot.cells):
        table.add_row(escape(_axis_text(value)), *[fmt(c, digits) for c in cells])
    out.print(table)
