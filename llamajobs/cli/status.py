"""Watching jobs: status (the table, one job's detail, --watch) and plot."""

from __future__ import annotations

from pathlib import Path

import click

from llamajobs import ops, views
from llamajobs.cli.options import job_argument, json_option, optional_job_argument, runs_dir_option


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
@job_argument
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@runs_dir_option
def plot(job_id: int, output: str, runs_dir: str | None) -> None:
    """Loss, tokens/s and MFU against step, as a PNG."""
    views.wrote(ops.plot_job(ops.runs_dir(runs_dir), job_id, Path(output)))
