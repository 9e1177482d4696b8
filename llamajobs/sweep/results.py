"""A sweep's results: a row per trial from the jobs' own status, the best trial, the pivot of two
axes, and the trials' curves overlaid."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamajobs import catalog, cluster, metrics, monitor, ops
from llamajobs.errors import Failure, SpecError
from llamajobs.sweep import Sweep, Trial, find, flag

# --- status ---

COLUMNS = ("trial", "job", "state", "step", "total_steps", "loss", "val_loss", "accuracy", "tokens_per_s",
           "gpu_hours")
LOWER_IS_BETTER = frozenset({"loss", "val_loss", "gpu_hours"})


@dataclass(frozen=True, kw_only=True, slots=True)
class TrialRow:
    trial: Trial
    state: str  # a job state, or NOT_SUBMITTED
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None  # the last logged
    val_loss: float | None = None  # the best (lowest) validation loss logged
    accuracy: float | None = None  # an eval's (not run by sweeps yet)
    tokens_per_s: float | None = None
    gpu_hours: float | None = None  # GPUs allocated x time trained; None on CPU
    error: str | None = None  # a failed trial's first error, or what is wrong with its run dir

    def to_json(self) -> dict[str, Any]:
        return {"trial": self.trial.trial, "job": self.trial.job, **dict(self.trial.values), "state": self.state,
                "step": self.step, "total_steps": self.total_steps, "loss": self.loss, "val_loss": self.val_loss,
                "accuracy": self.accuracy, "tokens_per_s": self.tokens_per_s, "gpu_hours": self.gpu_hours,
                "error": self.error}

    def get(self, column: str) -> Any:
        return self.to_json()[column]


@dataclass(frozen=True, kw_only=True, slots=True)
class Status:
    sweep: Sweep
    rows: tuple[TrialRow, ...]

    @property
    def best(self) -> int | None:
        """The trial with the lowest validation loss; without any, the lowest training loss."""
        for column in ("val_loss", "loss"):
            scored = [r for r in self.rows if r.get(column) is not None and math.isfinite(r.get(column))]
            if scored:
                return min(scored, key=lambda r: r.get(column)).trial.trial
        return None

    def to_json(self) -> dict[str, Any]:
        return {"sweep": self.sweep.id, "name": self.sweep.name, "axes": list(self.sweep.definition.axes),
                "trials": [r.to_json() for r in self.rows], "best": self.best}


def status(runs: Path, ref: str, sort: str | None = None) -> Status:
    """A row per trial, read through the same monitor rows as `status`; one trial's damage stays in its row."""
    sweep = find(runs, ref)
    ids = [t.job for t in sweep.trials if t.job is not None]
    found = ops.job_rows(runs, ids)
    rows = tuple(_trial_row(t, found.get(t.job) if t.job is not None else None) for t in sweep.trials)
    if sort is not None:
        columns = _columns(sweep)
        if sort.replace("-", "_") not in columns:
            raise SpecError(f"--sort {sort!r} is not a column; choose from {', '.join(columns)}")
        key = sort.replace("-", "_")
        rows = tuple(sorted(rows, key=lambda r: (r.get(key) is None, _sortable(r.get(key)))))
    return Status(sweep=sweep, rows=rows)


def _columns(sweep: Sweep) -> list[str]:
    return [*COLUMNS[:2], *sweep.definition.axes, *COLUMNS[2:]]


def _sortable(value: Any) -> Any:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def _trial_row(trial: Trial, row: monitor.Row | None) -> TrialRow:
    if trial.job is None:
        return TrialRow(trial=trial, state="NOT_SUBMITTED")
    if row is None:
        return TrialRow(trial=trial, state=cluster.UNKNOWN, error=f"job {trial.job} is no longer in the runs directory")
    # The whole of metrics.jsonl is read only for a run that validates (monitor reads its tail).
    best = _best_val_loss(Path(row.run_dir)) if row.val_loss is not None else None
    gpus = (row.nodes or 0) * (row.gpus_per_node or 0) if catalog.allocates_gpus(row.cluster) else 0
    gpu_hours = row.elapsed_s * gpus / 3600 if gpus and row.elapsed_s is not None else None
    return TrialRow(trial=trial, state=row.state, step=row.step, total_steps=row.total_steps, loss=row.loss,
                    val_loss=best if best is not None else row.val_loss, accuracy=row.accuracy,
                    tokens_per_s=row.tokens_per_s, gpu_hours=gpu_hours, error=row.error or row.problem)


def _best_val_loss(run_dir: Path) -> float | None:
    """The lowest validation loss in the whole of metrics.jsonl (monitor's row has only the latest)."""
    try:
        found = [r.val_loss for r in metrics.read(run_dir, tail_bytes=None).rows
                 if r.val_loss is not None and math.isfinite(r.val_loss)]
    except OSError:  # the row already names the damage
        return None
    return min(found) if found else None


@dataclass(frozen=True, kw_only=True, slots=True)
class Pivot:
    """Rows one axis, columns another, each cell the metric of the best trial with those two values."""
    row_axis: str
    col_axis: str
    metric: str
    rows: tuple[Any, ...]
    columns: tuple[Any, ...]
    cells: tuple[tuple[float | None, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {"rows_axis": self.row_axis, "columns_axis": self.col_axis, "metric": self.metric,
                "rows": list(self.rows), "columns": list(self.columns), "cells": [list(c) for c in self.cells]}


def pivot(found: Status, axes: str, metric: str) -> Pivot:
    names = [a.strip() for a in axes.split(",")]
    known = list(found.sweep.definition.axes)
    if len(names) != 2:
        raise SpecError(f"--pivot {axes!r}: name two axes, ROW_AXIS,COL_AXIS, of {', '.join(flag(k) for k in known)}")
    row_axis, col_axis = (n.replace("-", "_") for n in names)
    for name in (row_axis, col_axis):
        if name not in known:
            raise SpecError(f"--pivot: {flag(name)!r} is not an axis of sweep {found.sweep.id}; "
                            f"its axes: {', '.join(flag(k) for k in known)}")
    numeric = [c for c in COLUMNS if c not in ("trial", "job", "state")]
    metric = metric.replace("-", "_")
    if metric not in numeric:
        raise SpecError(f"--metric {metric!r} is not a numeric column; choose from {', '.join(numeric)}")
    rows = tuple(dict.fromkeys(r.trial.values[row_axis] for r in found.rows))
    columns = tuple(dict.fromkeys(r.trial.values[col_axis] for r in found.rows))
    pick = min if metric in LOWER_IS_BETTER else max
    cells = []
    for rv in rows:
        line = []
        for cv in columns:
            values = [r.get(metric) for r in found.rows
                      if r.trial.values[row_axis] == rv and r.trial.values[col_axis] == cv and r.get(metric) is not None]
            line.append(pick(values) if values else None)
        cells.append(tuple(line))
    return Pivot(row_axis=row_axis, col_axis=col_axis, metric=metric, rows=rows, columns=columns, cells=tuple(cells))


# --- plot ---


def plot(runs: Path, ref: str, output: Path, x: str = "step") -> Path:
    """`plot --sweep S`: every submitted trial's loss curves overlaid, labelled by its axis values."""
    from llamajobs.plot import overlay

    sweep = find(runs, ref)
    return overlay(curves(runs, sweep), f"sweep {sweep.id} ({sweep.name})", output, x)


def curves(runs: Path, sweep: Sweep) -> list[tuple[str, list[metrics.MetricsRow]]]:
    """Each submitted trial's metrics, labelled by its axis values; a trial whose run dir cannot be
    read keeps its legend entry, saying why, and the others are drawn."""
    found = []
    for t in sweep.trials:
        if t.job is None:
            continue
        label = f"trial {t.trial}: {t.label()}"
        try:
            job, _ = ops.training_job(runs, t.job)
            found.append((label, ops.job_metrics(job)))
        except (Failure, SpecError) as e:
            found.append((f"{label} ({e})", []))
    if not found:
        raise Failure(f"sweep {sweep.id} has no submitted trial to plot")
    return found
