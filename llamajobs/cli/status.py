"""Watching jobs: status (the table, one job's detail, --watch) and plot."""

from __future__ import annotations

from pathlib import Path

import click

from llamajobs import ops, views
from llamajobs.sweep import results
from llamajobs.cli.options import JOB_ID, json_option, optional_job_argument, runs_dir_option


@click.command()
@optional_job_argument
@click.option("--watch", is_flag=True, help="Refresh in place until interrupted.")
@click.option("--all", "show_all", is_flag=True, help="Include finished jobs older than a week.")
@runs_dir_option
@json_option
def status(job_id: int | None, watch: bool, show_all: bool, runs_dir: str | None, as_json: bool) -> None:
    """All jobs in one table, or one job in detail."""
    runs = ops.runs_dir(runs_dir)
    if as_json:
        rows = ops.status_rows(runs, job_id, show_all)
        views.print_json(rows[0].to_dict() if job_id is not None else {"jobs": [r.to_dict() for r in rows]})
    elif watch:
        views.watch(lambda: ops.status_rows(runs, job_id, show_all))
    elif job_id is not None:
        views.detail(ops.detail(runs, job_id))
    else:
        views.out.print(views.status_table(ops.status_rows(runs, show_all=show_all)))


@click.command()
@click.argument("job_ids", nargs=-1, type=JOB_ID, metavar="[JOB]...")
@click.option("--sweep", "sweep_ref", default=None, metavar="S", help="Every trial of sweep S, overlaid.")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@click.option("--x", "x", type=click.Choice(["step", "tokens"]), default="step", show_default=True,
              help="What the curves are drawn against.")
@runs_dir_option
def plot(job_ids: tuple[int, ...], sweep_ref: str | None, output: str, x: str, runs_dir: str | None) -> None:
    """One job: loss, tokens/s and MFU as a PNG. Several jobs, or a sweep: their loss curves overlaid."""
    runs = ops.runs_dir(runs_dir)
    if bool(job_ids) == bool(sweep_ref):
        raise click.UsageError("give JOB ids or --sweep S, one of the two")
    if sweep_ref:
        views.wrote(results.plot(runs, sweep_ref, Path(output), x))
    elif len(job_ids) == 1:
        views.wrote(ops.plot_job(runs, job_ids[0], Path(output), x))
    else:
        views.wrote(ops.plot_jobs(runs, list(job_ids), Path(output), x))
