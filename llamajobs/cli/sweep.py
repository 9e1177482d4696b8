"""Sweeps: submit a grid or random sample of runs as ordinary jobs, and compare them."""

from __future__ import annotations

from typing import Any

import click

from llamajobs import catalog, cluster, ops, sweep, views
from llamajobs.sweep import results, views as sweep_views
from llamajobs.cli.options import JOB_OPTIONS, TRAINING_OPTIONS, json_option, options, runs_dir_option, typed


@click.group(name="sweep")
def sweep_group() -> None:
    """A set of runs over axes of settings: each trial an ordinary job, recorded in sweep.json."""


@sweep_group.command(name="submit")
@click.argument("sweep_file", required=False, metavar="[SWEEP.yaml]", type=click.Path(dir_okay=False))
@options(TRAINING_OPTIONS + JOB_OPTIONS, without=frozenset({"seed"}))
@click.option("--axis", "axes", multiple=True, metavar="KEY=V1,V2,...",
              help="An axis: submit's flag or run-YAML key and its values (KEY=LOW..HIGH or KEY=log:LOW..HIGH: a "
                   "range for --samples). Repeat for a grid.")
@click.option("--samples", type=click.IntRange(min=1), default=None,
              help="Draw N trials at random (lists uniformly, ranges uniform or log-uniform) instead of the grid.")
@click.option("--seed", "sweep_seed", type=int, default=None,
              help="The seed of --samples' draws (default 0). The runs' own seed: --axis seed=... or the file's base.")
@click.option("--max-parallel", type=click.IntRange(min=1), default=None,
              help="At most K trials run at once (default: all).")
@click.option("--max-trials", type=click.IntRange(min=1), default=sweep.MAX_TRIALS, show_default=True,
              help="Refuse a larger sweep.")
@runs_dir_option
@click.option("--force", is_flag=True, help="Submit trials the estimate says do not fit.")
@click.option("--gpu", default=None, help=f"The GPU the estimate assumes: {', '.join(catalog.GPUS)} (default a100-80g).")
@click.option("--dry-run", is_flag=True, help="Check and estimate every trial; queue nothing.")
@json_option
def submit(sweep_file: str | None, axes: tuple[str, ...], samples: int | None, sweep_seed: int | None,
           max_parallel: int | None, max_trials: int, runs_dir: str | None, force: bool, gpu: str | None,
           dry_run: bool, as_json: bool, config_file: str | None, **values: Any) -> None:
    """Submit every trial of a sweep that has no job yet; the estimate first."""
    runs = ops.runs_dir(runs_dir, writable=not dry_run)
    flags = typed(values)
    found = sweep.definition(sweep_file, flags, axes, samples, sweep_seed, config_file)
    detected = None if "cluster" in found.base else cluster.detect()
    checked = sweep.plan(found, runs, gpu=gpu, force=force, dry_run=dry_run, max_parallel=max_parallel,
                         max_trials=max_trials, cluster_default=detected)
    for warning in checked.warnings:
        views.note(f"warning: {warning}")
    if dry_run:
        if as_json:
            views.print_json({"sweep": None, "trials": [{"trial": p.trial.trial, "job": None, **dict(p.trial.values)}
                                                     for p in checked.trials],
                              "estimate": checked.estimate.to_json()})
        else:
            sweep_views.sweep_estimate(checked.estimate)
            views.note(f"{len(checked.trials)} trials checked; nothing queued (--dry-run)")
        return
    if not as_json:
        sweep_views.sweep_estimate(checked.estimate)
    result = sweep.submit(checked, runs, max_parallel)
    views.print_json(result.to_json()) if as_json else sweep_views.sweep_submitted(result)


@sweep_group.command(name="status")
@click.argument("sweep_ref", metavar="S")
@click.option("--sort", default=None, help="Order the trials by this column (trial, job, an axis, state, step, "
                                           "loss, val_loss, accuracy, tokens_per_s, gpu_hours).")
@click.option("--pivot", default=None, metavar="ROW_AXIS,COL_AXIS", help="A table of two axes, rows by columns.")
@click.option("--metric", default="val_loss", show_default=True, help="The column --pivot shows in its cells.")
@runs_dir_option
@json_option
def status(sweep_ref: str, sort: str | None, pivot: str | None, metric: str, runs_dir: str | None,
           as_json: bool) -> None:
    """A row per trial: its axis values, state, step, loss, best validation loss, tokens/s, GPU-hours."""
    found = results.status(ops.runs_dir(runs_dir), sweep_ref, sort)
    table = results.pivot(found, pivot, metric) if pivot else None
    if as_json:
        views.print_json({**found.to_json(), **({"pivot": table.to_json()} if table else {})})
    elif table:
        sweep_views.sweep_pivot(found, table)
    else:
        sweep_views.sweep_table(found)


@sweep_group.command(name="cancel")
@click.argument("sweep_ref", metavar="S")
@runs_dir_option
def cancel(sweep_ref: str, runs_dir: str | None) -> None:
    """Cancel every trial of the sweep that is still queued or running."""
    found, cancelled = sweep.cancel(ops.runs_dir(runs_dir), sweep_ref)
    views.out.print(f"sweep {found.id}: " + (", ".join(f"trial {t.trial} (job {t.job})" for t in cancelled) + " cancelled"
                                             if cancelled else "no trial was queued or running"), highlight=False)
