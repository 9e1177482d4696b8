"""Jobs: submit, presets, render, cancel, requeue, logs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from llamajobs import catalog, cluster, ops, views
from llamajobs.cli.options import (JOB_OPTIONS, TRAINING_OPTIONS, job_argument, json_option, options,
                                   runs_dir_option, typed, within)
from llamajobs.presets import listing
from llamajobs.values import parse_count


@click.command()
@options(TRAINING_OPTIONS + JOB_OPTIONS)
@runs_dir_option
@click.option("--force", is_flag=True, help="Submit even when the estimate says it does not fit.")
@click.option("--gpu", default=None, help=f"The GPU type the estimate assumes: {', '.join(catalog.GPUS)} "
                                          f"(default: site.yaml's gpu, else a100-80g, said so in the output).")
@click.option("--dry-run", is_flag=True, help="Render into a temporary directory and print the batch script.")
@click.option("--wait", is_flag=True, help="Block until the job ends; exit non-zero unless it COMPLETED.")
@json_option
def submit(runs_dir: str | None, force: bool, gpu: str | None, dry_run: bool, wait: bool, as_json: bool,
           config_file: str | None, **values: Any) -> None:
    """Render a run and submit it (SLURM, or the local cluster)."""
    runs = ops.runs_dir(runs_dir, writable=not dry_run)
    flags = typed(values)
    detected = None if "cluster" in flags else cluster.detect()
    spec, profile = ops.build_spec(flags, config_file, cluster_default=detected)
    spec = ops.checked_spec(spec, runs)
    ops.check_partition(spec, profile)
    # (detected and its node is this host: no SLURM controller answered)
    fit = ops.fit_check(spec, gpu or profile.gpu, force, dry_run,
                        no_controller=detected is not None and catalog.CLUSTER[detected].host_is_node)
    spec = fit.spec or spec  # as it will run on that GPU: --micro-batch auto resolved
    if fit.accelerator is not None:
        views.chosen_plan(spec)
    for warning in (fit.warning, ops.preemption_warning(spec)):
        if warning:
            views.err.print(f"warning: {warning}", markup=False)
    if dry_run:
        done = ops.dry_run(spec, profile)
        click.echo(done.script)
        views.err.print(f"rendered into {done.folder}; nothing queued, nothing registered", markup=False)
        if done.verdict is not None:
            views.err.print(f"sbatch --test-only: {done.verdict}", markup=False)
        return
    result = ops.submit_job(spec, profile, runs, fit)
    if not wait:
        views.print_json(result.to_json()) if as_json else views.submitted(result, fit.note)
        return
    if not as_json:
        views.submitted(result, fit.note)
    state = ops.wait(result.job, views.step_line)
    views.print_json({**result.to_json(), "state": state}) if as_json else views.out.print(
        f"job {result.job.id} ended {state}")
    ops.fail_unless_completed(result.job, state)


@click.command()
@options(TRAINING_OPTIONS + JOB_OPTIONS)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory to write into.")
def render(out_dir: str, config_file: str | None, **values: Any) -> None:
    """Write spec.json, launch.sh and job.sbatch without a cluster."""
    import llamajobs.render

    flags = typed(values)
    spec, profile = ops.build_spec(flags, config_file, cluster_default="slurm")
    # What submit decides (--micro-batch auto, --shard-within auto), decided the same way: a script
    # submitted by hand runs what `submit` would have.
    spec = ops.plan_for_gpu(spec, ops.accelerator(flags.get("gpu") or ops.site_gpu()))
    for path in llamajobs.render.render(spec, profile, out_dir):
        views.out.print(str(path), markup=False, highlight=False)


@click.command()
@click.option("--gpu", type=click.Choice(list(catalog.GPUS)), default=None,
              help="The GPU type the estimates assume (default: site.yaml's gpu, else a100-80g).")
@click.option("--tokens", default=None, help="Tokens per epoch for every preset, e.g. 800M (default: the preset's "
                                             "tokens_per_epoch, else 2.5B, the seed's corpus).")
@json_option
def presets(gpu: str | None, tokens: str | None, as_json: bool) -> None:
    """The presets shipped with llamajobs, each with its estimate; run one with `submit --config NAME`."""
    accel = ops.accelerator(gpu or ops.site_gpu())
    rows = listing.estimates(accel, parse_count(tokens, "--tokens") if tokens else None)
    if as_json:
        views.print_json({"gpu": accel.name, "presets": [r.to_json() for r in rows]})
    else:
        views.presets(rows, accel)


@click.command()
@job_argument
@runs_dir_option
def cancel(job_id: int, runs_dir: str | None) -> None:
    """Cancel a job."""
    ops.cancel(ops.runs_dir(runs_dir), job_id)
    views.out.print(f"job {job_id} cancelled")


@click.command()
@job_argument
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0), default=900, show_default=True,
              help="Seconds to wait for the checkpoint before giving up.")
@runs_dir_option
def requeue(job_id: int, timeout_s: float, runs_dir: str | None) -> None:
    """Checkpoint now and requeue, as preemption does; the run resumes from that checkpoint."""
    latest = ops.requeue(ops.runs_dir(runs_dir), job_id, timeout_s)
    views.out.print(f"job {job_id} checkpointed ({latest}) and requeued")


@click.command()
@job_argument
@click.option("--rank", type=within("rank"), default=None,
              help="A worker's global rank (default: the node launcher's log).")
@click.option("--follow", "-f", is_flag=True)
@click.option("--stderr", "use_stderr", is_flag=True)
@runs_dir_option
def logs(job_id: int, rank: int | None, follow: bool, use_stderr: bool, runs_dir: str | None) -> None:
    """Print a job's log: the node launcher's (submitit), or one worker rank's."""
    path = ops.log_file(ops.runs_dir(runs_dir), job_id, rank, use_stderr)
    for text in ops.read_log(Path(path), follow):
        sys.stdout.write(text)
        sys.stdout.flush()
