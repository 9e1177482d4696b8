"""The `llamajobs` command: parse flags, build a JobSpec, call one function, print with rich.

torch and transformers are imported only by the commands that need them, so `--help`, `render`,
`estimate` and `status` start fast.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import click
from click.core import ParameterSource
from rich.console import Console
from rich.table import Table

from llamajobs import catalog, site as site_mod
from llamajobs.errors import Failure, SpecError

# Paths must stay whole for copy and paste; piped output gets room for the status table.
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


# --- shared options (defined once; every default lives in the JobSpec, so none is given here) ---

def _opt(*names: str, **kw: Any) -> Callable:
    return click.option(*names, default=None, **kw)


TRAINING_OPTIONS = [
    _opt("--size", help=f"Model size: {', '.join(catalog.SIZES)}. Ignored with --model-path."),
    _opt("--strategy", help=f"One of {', '.join(catalog.STRATEGIES)}."),
    _opt("--mode", help=f"One of {', '.join(catalog.MODES)}."),
    _opt("--lora-r", type=int), _opt("--lora-alpha", type=int), _opt("--lora-dropout", type=float),
    _opt("--lora-targets", help="Comma list of module names, e.g. q_proj,v_proj."),
    _opt("--model-path", help="HF-format LLaMA weights; the shape is read from its config.json."),
    _opt("--init-from", help="Start from another run's final/ (JOB id or DIR)."),
    _opt("--data", help="A token store from `llamajobs data prepare`; default: the bundled sample corpus."),
    _opt("--epochs", type=float), _opt("--max-steps", type=int),
    _opt("--tokens-per-epoch", help="Tokens in one epoch, e.g. 2.5B."),
    _opt("--seq-len", type=int), _opt("--global-batch", type=int), _opt("--micro-batch", type=int),
    _opt("--lr", type=float), _opt("--warmup-ratio", type=float), _opt("--weight-decay", type=float),
    _opt("--activation-checkpointing/--no-activation-checkpointing"),
    _opt("--compile/--no-compile"), _opt("--seed", type=int),
    _opt("--nodes", type=int), _opt("--gpus-per-node", type=int),
    _opt("--procs-per-node", type=int, help="Worker processes per node (default: one per GPU, 2 without GPUs)."),
    _opt("--cpus-per-node", type=int, help="CPUs of each node's task (default: 4 per worker process)."),
    _opt("--mem-per-node", help="SLURM --mem of each node (default 0: all of it)."),
]
JOB_OPTIONS = [
    _opt("--checkpoint-every-steps", type=int), _opt("--checkpoint-every-minutes", type=float),
    _opt("--resume/--no-resume", help="Resume from the run's latest checkpoint (default: yes)."),
    _opt("--merge/--no-merge", help="LoRA: also write a merged full model into final/merged."),
    _opt("--log-every-steps", type=int),
    _opt("--keep-checkpoints", type=int), _opt("--max-requeues", type=int),
    _opt("--cluster", help="slurm, local or debug (default: slurm when `scontrol ping` answers)."),
    _opt("--device", help="auto, cuda or cpu; decided on the compute node."),
    _opt("--partition"), _opt("--account"), _opt("--qos"),
    _opt("--time", help="SLURM time limit, HH:MM:SS or D-HH:MM:SS."),
    _opt("--constraint"), _opt("--exclusive/--no-exclusive"), _opt("--exclude"),
    _opt("--mail-user"), _opt("--mail-type"),
    _opt("--after", help="Start only after these jobs completed (comma list)."),
    _opt("--launcher", help="torchrun or deepspeed."), _opt("--name"), _opt("--wandb"),
    _opt("--hold/--no-hold"),
    _opt("--config", "config_file", type=click.Path(dir_okay=False), help="A run YAML with the same keys as the flags."),
]


def options(opts: list[Callable]) -> Callable:
    def decorate(f: Callable) -> Callable:
        for option in reversed(opts):
            f = option(f)
        return f
    return decorate


def explicit_flags(ctx: click.Context, values: dict[str, Any]) -> dict[str, Any]:
    """Only the flags the user typed: click defaults must not shadow the profile or the run YAML."""
    typed = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    return {k: v for k, v in values.items() if ctx.get_parameter_source(k) in typed and v is not None}


def build_spec(ctx: click.Context, values: dict[str, Any], cluster_default: str | None = None):
    from llamajobs import spec as spec_mod

    site, site_defaults = site_mod.load()
    config_file = values.pop("config_file", None)
    config = site_mod.read_yaml(Path(config_file), "--config") if config_file else {}
    flags = explicit_flags(ctx, values)
    if cluster_default and "cluster" not in flags and "cluster" not in config and "cluster" not in site_defaults:
        flags["cluster"] = cluster_default
    return spec_mod.build(flags, config, site_defaults), site


def runs_dir_option(f: Callable) -> Callable:
    return click.option("--runs-dir", envvar="LLAMAJOBS_RUNS", default=None,
                        help="Run directories (default $LLAMAJOBS_HOME/runs); on a cluster they must be "
                             "on the shared filesystem.")(f)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")(f)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _runs(runs_dir: str | None) -> Path:
    site, _ = site_mod.load()
    return site_mod.runs_dir(site, runs_dir)


# --- commands ---

@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="llamajobs")
def cli() -> None:
    """Fine-tune LLaMA-family models on SLURM clusters: render, submit, watch, estimate.

    Run directories (the truth about every job) live under $LLAMAJOBS_HOME/runs unless --runs-dir or
    $LLAMAJOBS_RUNS says otherwise; on a cluster they must be on the shared filesystem. The site
    profile is $LLAMAJOBS_HOME/site.yaml (default ~/.llamajobs).
    """


@cli.command()
@options(TRAINING_OPTIONS + JOB_OPTIONS)
@runs_dir_option
@click.option("--force", is_flag=True, help="Submit even when the estimate says it does not fit.")
@click.option("--dry-run", is_flag=True, help="Render into a temporary directory and print the batch script.")
@click.option("--wait", is_flag=True, help="Block until the job ends; exit non-zero unless it COMPLETED.")
@json_option
@click.pass_context
def submit(ctx: click.Context, runs_dir: str | None, force: bool, dry_run: bool, wait: bool, as_json: bool,
           **values: Any) -> None:
    """Render a run and submit it (SLURM, or the local cluster)."""
    from llamajobs import estimate, monitor, submit as submit_mod

    cluster = None if values.get("cluster") else submit_mod.detect_cluster()
    spec, site = build_spec(ctx, values, cluster_default=cluster)
    if spec.init_from is not None:
        raise SpecError(f"--init-from {spec.init_from}: not supported yet; pass the run's final/ as --model-path")
    if spec.data is not None:
        raise SpecError(f"--data {spec.data}: token stores are not supported yet; omit --data to train on the bundled sample")
    if spec.strategy not in ("fsdp", "fsdp-offload") or spec.mode not in ("full", "lora"):
        raise SpecError(f"--strategy {spec.strategy} --mode {spec.mode}: the worker runs fsdp/fsdp-offload "
                        f"with full or lora so far")
    if dry_run:
        folder, verdict = submit_mod.dry_run(spec, site)
        click.echo((folder / "job.sbatch").read_text())
        err.print(f"rendered into {folder}; nothing queued, nothing registered")
        if verdict is not None:
            err.print(f"sbatch --test-only: {verdict}")
        return
    predicted = estimate.hours_for_spec(spec)
    done = submit_mod.submit(spec, site, _runs(runs_dir))
    job = done.job
    result = {"id": job.id, "cluster_job_id": job.cluster_job_id, "run_dir": str(job.run_dir),
              "predicted_hours_per_epoch": predicted}
    if as_json and not wait:
        print_json(result)
    elif not as_json:
        out.print(f"job [bold]{job.id}[/] ({job.cluster} job {job.cluster_job_id}) submitted; run dir {job.run_dir}")
        if predicted is not None:
            out.print(f"predicted hours per epoch: {predicted:.3g}")
    if wait:
        state = wait_for(job)
        result["state"] = state
        if as_json:
            print_json(result)
        else:
            out.print(f"job {job.id} ended {state}")
        if state != "COMPLETED":
            log = monitor.traceback_log(job)
            raise Failure(f"job {job.id} ended {state}" + (f"; traceback in {log}" if log else ""))


def wait_for(job, poll_s: float = 1.0) -> str:
    """Poll until the job ends, reporting each new logged step on stderr (stdout stays for --json)."""
    from llamajobs import monitor

    shown = None
    while True:
        r = monitor.row(job)
        if r.step is not None and r.step != shown:
            shown = r.step
            err.print(f"job {job.id} {r.state} step {r.step}/{r.total_steps} loss {_fmt(r.loss, '.4f')} "
                      f"tok/s {_fmt(r.tokens_per_s, ',.0f')} MFU {_fmt(r.mfu and r.mfu * 100, '.1f')}% ({r.peak})")
        if r.state in monitor.TERMINAL:
            return r.state
        time.sleep(poll_s if job.cluster != "slurm" else max(poll_s, 2.0))


def _job(reg, job_id: int):
    job = reg.get(job_id)
    if job is None:
        ids = [j.id for j in reg.jobs()]
        raise SpecError(f"JOB {job_id} is not known in {reg.runs_dir}; known: {', '.join(map(str, ids)) or 'none'}")
    return job


def _fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def status_table(rows: list) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("id", "name", "job", "state", "nodes×gpus", "size/mode/strategy", "step", "epoch",
                "loss", "tok/s", "tok/s/gpu", "MFU", "ETA", "elapsed"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r.id), r.name, f"{r.cluster}:{r.cluster_job_id}", r.state,
            f"{r.nodes}×{r.gpus_per_node}" if r.cluster == "slurm" else f"{r.nodes}×{r.procs_per_node} cpu",
            f"{r.size}/{r.mode}/{r.strategy}", f"{_fmt(r.step)}/{_fmt(r.total_steps)}", _epoch(r.epoch),
            _fmt(r.loss, ".4f"), _fmt(r.tokens_per_s, ",.0f"), _fmt(r.tokens_per_s_per_gpu, ",.0f"),
            _fmt(r.mfu and r.mfu * 100, ".1f") + ("%" if r.mfu is not None else ""), _duration(r.eta_s),
            _duration(r.elapsed_s),
        )
    return table


def _epoch(epochs: float | None) -> str:
    """Within the first epoch its percentage; later, epochs done."""
    if epochs is None:
        return "-"
    return f"{epochs * 100:.1f}%" if epochs <= 1 else f"{epochs:.2f} ep"


SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 60) -> str:
    if not values:
        return ""
    step = max(1, len(values) // width)
    values = values[::step]
    lo, hi = min(values), max(values)
    return "".join(SPARK[int((v - lo) / (hi - lo + 1e-12) * (len(SPARK) - 1))] for v in values)


def print_detail(job, row) -> None:
    from llamajobs import events, monitor
    from llamajobs.spec import JobSpec

    spec = JobSpec.load(job.run_dir / "spec.json")
    out.print(f"[bold]job {job.id}[/] {job.name}  {row.state}  ({job.cluster} job {job.cluster_job_id})")
    out.print(f"run dir   {job.run_dir}")
    out.print(f"model     {spec.size} {spec.mode} {spec.strategy}, {spec.nodes} node(s) "
              f"seq {spec.seq_len} global batch {spec.global_batch} micro {spec.micro_batch} lr {spec.lr}")
    out.print(f"progress  step {_fmt(row.step)}/{_fmt(row.total_steps)}  loss {_fmt(row.loss, '.4f')}  "
              f"tok/s {_fmt(row.tokens_per_s, ',.0f')}  MFU {_fmt(row.mfu and row.mfu * 100, '.2f')}% "
              f"(peak {row.peak or '-'})  ETA {_duration(row.eta_s)}  elapsed {_duration(row.elapsed_s)}")
    losses = [m["loss"] for m in monitor.read_metrics(job.run_dir, tail_bytes=None) if m.get("loss") is not None]
    if losses:
        out.print(f"loss      {sparkline(losses)}  {losses[0]:.3f} → {losses[-1]:.3f}")
    out.print("events")
    for e in events.read(job.run_dir):
        extra = {k: v for k, v in e.items() if k not in ("time", "event")}
        out.print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['time']))}  {e['event']}  {extra}")
    out.print("logs")
    for path in monitor.log_files(job):
        out.print(f"  {path}")
    if row.state == "FAILED":
        log = monitor.traceback_log(job)
        out.print(f"[red]traceback in {log}[/]" if log else "[red]no traceback found in the logs[/]")


@cli.command()
@click.argument("job_id", type=int, required=False)
@click.option("--watch", is_flag=True, help="Refresh in place until interrupted.")
@click.option("--all", "show_all", is_flag=True, help="Include finished jobs older than a week.")
@runs_dir_option
@json_option
def status(job_id: int | None, watch: bool, show_all: bool, runs_dir: str | None, as_json: bool) -> None:
    """All jobs in one table, or one job in detail."""
    from llamajobs import monitor, registry

    reg = registry.Registry(_runs(runs_dir))

    def rows() -> list:
        jobs = [_job(reg, job_id)] if job_id is not None else reg.jobs()
        now = time.time()
        cached = reg.finished_rows()
        found = monitor.rows(jobs, now, cached)
        reg.set_finished([r.to_dict() for r in found if r.state in monitor.TERMINAL and r.id not in cached])
        if not show_all and job_id is None:
            week = 7 * 86400
            found = [r for r, j in zip(found, jobs) if r.state not in monitor.TERMINAL or now - j.submitted_at < week]
        return found

    if as_json:
        found = rows()
        print_json(found[0].to_dict() if job_id is not None else {"jobs": [r.to_dict() for r in found]})
    elif job_id is not None and not watch:
        print_detail(_job(reg, job_id), rows()[0])
    elif watch:
        from rich.live import Live
        with Live(status_table(rows()), console=out, refresh_per_second=1) as live:
            try:
                while True:
                    time.sleep(2)
                    live.update(status_table(rows()))
            except KeyboardInterrupt:
                pass
    else:
        out.print(status_table(rows()))


@cli.command()
@click.argument("job_id", type=int)
@runs_dir_option
def cancel(job_id: int, runs_dir: str | None) -> None:
    """Cancel a job."""
    from llamajobs import events, monitor, registry

    job = _job(registry.Registry(_runs(runs_dir)), job_id)
    state = monitor.row(job).state
    if state in monitor.TERMINAL:
        raise Failure(f"job {job_id} already ended {state}")
    events.record(job.run_dir, "cancelled")
    if job.cluster == "slurm":
        result = subprocess.run(["scancel", job.cluster_job_id], capture_output=True, text=True)
        if result.returncode != 0:
            raise Failure(f"scancel {job.cluster_job_id} failed: {result.stderr.strip()}")
    else:
        monitor.kill_local(int(job.cluster_job_id))
    out.print(f"job {job_id} cancelled")


@cli.command()
@click.argument("job_id", type=int)
@click.option("--timeout", "timeout_s", type=float, default=900, show_default=True,
              help="Seconds to wait for the checkpoint before giving up.")
@runs_dir_option
def requeue(job_id: int, timeout_s: float, runs_dir: str | None) -> None:
    """Checkpoint now and requeue, as preemption does; the run resumes from that checkpoint."""
    from llamajobs import events, monitor, registry

    job = _job(registry.Registry(_runs(runs_dir)), job_id)
    state = monitor.row(job).state
    if state not in ("RUNNING", "STALLED"):
        raise Failure(f"job {job_id} is {state}; only a running job can be requeued")
    asked = time.time()
    monitor.signal_launcher(job)
    while not any(e["event"] == "requeued" and e["time"] >= asked for e in events.read(job.run_dir)):
        if time.time() - asked > timeout_s:
            raise Failure(f"job {job_id} did not checkpoint within {timeout_s:.0f} s; see `llamajobs logs {job_id}`")
        time.sleep(0.5)
    latest = next(e for e in reversed(events.read(job.run_dir)) if e["event"] == "requeued")["latest"]
    out.print(f"job {job_id} checkpointed ({latest}) and requeued")


@cli.command()
@click.argument("job_id", type=int)
@click.option("--rank", type=int, default=None, help="A worker's global rank (default: the node launcher's log).")
@click.option("--follow", "-f", is_flag=True)
@click.option("--stderr", "use_stderr", is_flag=True)
@runs_dir_option
def logs(job_id: int, rank: int | None, follow: bool, use_stderr: bool, runs_dir: str | None) -> None:
    """Print a job's log: the node launcher's (submitit), or one worker rank's."""
    from llamajobs import monitor, registry

    job = _job(registry.Registry(_runs(runs_dir)), job_id)
    stream = "err" if use_stderr else "out"
    if rank is None:
        candidates = sorted((job.run_dir / "submitit").glob(f"*_0_log.{stream}"))
    else:
        candidates = [p for p in monitor.rank_logs(job).get(rank, []) if p.name == f"std{stream}.log"]
    if not candidates:
        raise Failure(f"no log yet for job {job_id}" + (f" rank {rank}" if rank is not None else ""))
    path = candidates[-1]
    with open(path, errors="replace") as f:
        sys.stdout.write(f.read())
        while follow:
            line = f.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            else:
                time.sleep(0.5)


@cli.command()
@click.argument("job_id", type=int)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="PNG file to write.")
@runs_dir_option
def plot(job_id: int, output: str, runs_dir: str | None) -> None:
    """Loss, tokens/s and MFU against step, as a PNG."""
    from llamajobs import monitor, registry
    from llamajobs.plot import plot_metrics

    job = _job(registry.Registry(_runs(runs_dir)), job_id)
    metrics = monitor.read_metrics(job.run_dir, tail_bytes=None)
    path = plot_metrics(metrics, f"job {job.id} {job.name}", Path(output))
    out.print(f"wrote {path}")


@cli.command("render")
@options(TRAINING_OPTIONS + JOB_OPTIONS)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Directory to write into.")
@click.pass_context
def render_cmd(ctx: click.Context, out_dir: str, **values: Any) -> None:
    """Write spec.json, launch.sh and job.sbatch without a cluster."""
    from llamajobs import render

    spec, site = build_spec(ctx, values, cluster_default="slurm")
    for path in render.render(spec, site, out_dir):
        out.print(str(path))


@cli.group()
def estimate() -> None:
    """Hours per epoch and memory fit, before or during a run."""


@estimate.command()
@click.argument("job_id", type=int, required=False)
@options(TRAINING_OPTIONS)
@click.option("--gpu", default="a100-80g", show_default=True, help=f"One of {', '.join(catalog.GPUS)}.")
@click.option("--tokens", default=None, help="Tokens per epoch, e.g. 2.5B (default: the spec's).")
@runs_dir_option
@json_option
@click.pass_context
def hours(ctx: click.Context, job_id: int | None, gpu: str, tokens: str | None, runs_dir: str | None,
          as_json: bool, **values: Any) -> None:
    """Hours per epoch: predicted from the model, or measured from JOB's throughput."""
    from llamajobs import estimate as est, monitor, registry
    from llamajobs.spec import JobSpec, parse_count

    if job_id is not None:
        job = _job(registry.Registry(_runs(runs_dir)), job_id)
        spec = JobSpec.load(job.run_dir / "spec.json")
        result = est.hours_from_metrics(spec, monitor.read_metrics(job.run_dir, tail_bytes=None),
                                        parse_count(tokens) if tokens else None)
        if result is None:
            raise Failure(f"job {job_id} has no measured throughput yet")
    else:
        if gpu not in catalog.GPUS:
            raise SpecError(f"--gpu {gpu!r} is not known; choose one of {', '.join(catalog.GPUS)}")
        spec, _ = build_spec(ctx, values, cluster_default="slurm")
        result = est.hours(spec, catalog.GPUS[gpu], parse_count(tokens) if tokens else None)
    if as_json:
        print_json(result)
        return
    table = Table(box=None, show_header=False)
    for key, value in result.items():
        table.add_row(key, _fmt(value, ",.4g") if isinstance(value, float) else _fmt(value))
    out.print(table)


@estimate.command()
@options(TRAINING_OPTIONS)
@click.option("--gpu", default="a100-80g", show_default=True, help=f"One of {', '.join(catalog.GPUS)}.")
@json_option
@click.pass_context
def memory(ctx: click.Context, gpu: str, as_json: bool, **values: Any) -> None:
    """Every strategy's GPU and CPU memory, a verdict, and the fastest strategy that fits."""
    from llamajobs import estimate as est

    if gpu not in catalog.GPUS:
        raise SpecError(f"--gpu {gpu!r} is not known; choose one of {', '.join(catalog.GPUS)}")
    spec, _ = build_spec(ctx, values, cluster_default="slurm")
    result = est.memory_table(spec, catalog.GPUS[gpu])
    if as_json:
        print_json(result)
        return
    table = Table(box=None, header_style="bold")
    for col in ("strategy", "GPU GiB", "CPU GiB/node", "verdict"):
        table.add_column(col)
    for r in result["strategies"]:
        table.add_row(r["strategy"], f"{r['gpu_mem_gib']:.1f}", f"{r['cpu_mem_gib']:.1f}", r["verdict"])
    out.print(table)
    out.print(f"recommended: {result['recommended'] or 'none fits; add nodes or use --mode lora'}")


@cli.group()
def tokenizer() -> None:
    """Tokenizers."""


@tokenizer.command("train")
@click.argument("texts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--vocab-size", type=int, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
def tokenizer_train(texts: tuple[str, ...], vocab_size: int, out_dir: str) -> None:
    """Train a LLaMA-style sentencepiece BPE model on text files (plain text or JSONL with "text")."""
    from llamajobs.data.tokenizer import read_texts, train_tokenizer

    path = train_tokenizer(read_texts([Path(t) for t in texts]), vocab_size, Path(out_dir))
    out.print(f"tokenizer written to {path}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"Error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except SpecError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    except Failure as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
