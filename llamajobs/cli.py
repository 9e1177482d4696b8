"""The `llamajobs` command: parse flags, build a JobSpec, call one function, print with rich.

torch and transformers are imported only by the commands that need them, so `--help`, `render`,
`estimate` and `status` start fast.
"""

from __future__ import annotations

import dataclasses
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


# Where a job runs and how it is queued: submit's, and `eval --cluster`'s.
PLACEMENT_OPTIONS = [
    _opt("--nodes", type=int), _opt("--gpus-per-node", type=int),
    _opt("--procs-per-node", type=int, help="Worker processes per node (default: one per GPU, 2 without GPUs)."),
    _opt("--cpus-per-node", type=int, help="CPUs of each node's task (default: 4 per worker process)."),
    _opt("--mem-per-node", help="SLURM --mem of each node (default 0: all of it)."),
]
QUEUE_OPTIONS = [
    _opt("--device", help="auto, cuda or cpu; decided on the compute node."),
    _opt("--partition"), _opt("--account"), _opt("--qos"),
    _opt("--time", help="SLURM time limit, HH:MM:SS or D-HH:MM:SS."),
    _opt("--constraint"), _opt("--exclusive/--no-exclusive"), _opt("--exclude"),
    _opt("--mail-user"), _opt("--mail-type"),
    _opt("--after", help="Start only after these jobs completed (comma list)."),
]
TRAINING_OPTIONS = [
    _opt("--size", help=f"Model size: {', '.join(catalog.SIZES)}. Ignored with --model-path."),
    _opt("--strategy", help=f"One of {', '.join(catalog.STRATEGIES)}."),
    _opt("--mode", help=f"One of {', '.join(catalog.MODES)}."),
    _opt("--lora-r", type=int), _opt("--lora-alpha", type=int), _opt("--lora-dropout", type=float),
    _opt("--lora-targets", help="Comma list of module names, e.g. q_proj,v_proj."),
    _opt("--num-virtual-tokens", type=int, help="Virtual tokens trained by --mode prefix, ptuning or prompt."),
    _opt("--model-path", help="HF-format LLaMA weights; the shape is read from its config.json."),
    _opt("--init-from", help="Start from another run's final/ (JOB id or DIR)."),
    _opt("--data", help="A token store from `llamajobs data prepare`; default: the bundled sample corpus."),
    _opt("--epochs", type=float), _opt("--max-steps", type=int),
    _opt("--tokens-per-epoch", help="Tokens in one epoch, e.g. 2.5B."),
    _opt("--seq-len", type=int), _opt("--global-batch", type=int), _opt("--micro-batch", type=int),
    _opt("--lr", type=float), _opt("--warmup-ratio", type=float), _opt("--weight-decay", type=float),
    _opt("--activation-checkpointing/--no-activation-checkpointing"),
    _opt("--compile/--no-compile"), _opt("--seed", type=int),
    *PLACEMENT_OPTIONS,
]
JOB_OPTIONS = [
    _opt("--checkpoint-every-steps", type=int), _opt("--checkpoint-every-minutes", type=float),
    _opt("--resume/--no-resume", help="Resume from the run's latest checkpoint (default: yes)."),
    _opt("--merge/--no-merge", help="LoRA: also write a merged full model into final/merged."),
    _opt("--log-every-steps", type=int),
    _opt("--keep-checkpoints", type=int), _opt("--max-requeues", type=int),
    _opt("--collective-timeout-minutes", type=float,
         help="How long the ranks wait for one that went silent before the job fails (default 30)."),
    _opt("--cluster", help="slurm, local or debug (default: slurm when `scontrol ping` answers)."),
    *QUEUE_OPTIONS,
    _opt("--launcher", help="torchrun or deepspeed."), _opt("--name"),
    _opt("--wandb", help="Also log to this Weights & Biases [ENTITY/]PROJECT. Offline (RUN_DIR/wandb, upload with "
                         "`wandb sync`) unless WANDB_API_KEY or WANDB_MODE is set where the job runs."),
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


def build_spec(ctx: click.Context, values: dict[str, Any], cluster_default: str | None = None,
               fixed: dict[str, Any] | None = None):
    """The JobSpec of the typed flags over the run YAML and the site profile; `fixed` holds fields the
    command sets itself (an eval job's `evaluation`)."""
    from llamajobs import spec as spec_mod

    site, site_defaults = site_mod.load()
    config_file = values.pop("config_file", None)
    config = site_mod.read_yaml(Path(config_file), "--config") if config_file else {}
    flags = {**explicit_flags(ctx, values), **(fixed or {})}
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
@click.option("--gpu", default=None, help=f"The GPU type the estimate assumes: {', '.join(catalog.GPUS)} "
                                          f"(default a100-80g, said so in the output).")
@click.option("--dry-run", is_flag=True, help="Render into a temporary directory and print the batch script.")
@click.option("--wait", is_flag=True, help="Block until the job ends; exit non-zero unless it COMPLETED.")
@json_option
@click.pass_context
def submit(ctx: click.Context, runs_dir: str | None, force: bool, gpu: str | None, dry_run: bool, wait: bool,
           as_json: bool, **values: Any) -> None:
    """Render a run and submit it (SLURM, or the local cluster)."""
    from llamajobs import estimate, submit as submit_mod

    cluster = None if values.get("cluster") else submit_mod.detect_cluster()
    spec, site = build_spec(ctx, values, cluster_default=cluster)
    if spec.init_from is not None:
        spec = dataclasses.replace(spec, init_from=resolve_init_from(spec.init_from, runs_dir, spec.after))
    if spec.data is not None:
        from llamajobs.data.store import TokenStore
        TokenStore(spec.data)  # a path that is not a complete store fails before anything is queued
    if spec.merge and spec.mode != "lora":
        raise SpecError(f"--merge folds LoRA adapters into the base; --mode {spec.mode} has none: leave --merge out")
    if spec.compile and spec.strategy not in ("fsdp", "fsdp-offload"):
        raise SpecError(f"--compile is implemented for fsdp and fsdp-offload; leave it out with "
                        f"--strategy {spec.strategy}")
    if spec.strategy == "pp" and (spec.procs_per_node or 1) > 1:
        raise SpecError("--strategy pp runs one process per node (it drives all the node's GPUs); "
                        "leave --procs-per-node out")
    accel, gpu_note = _submit_fit_check(spec, gpu, force, dry_run)
    if dry_run:
        folder, verdict = submit_mod.dry_run(spec, site)
        click.echo((folder / "job.sbatch").read_text())
        err.print(f"rendered into {folder}; nothing queued, nothing registered")
        if verdict is not None:
            err.print(f"sbatch --test-only: {verdict}")
        return
    predicted = estimate.hours_for_spec(spec, accel) if accel else None
    done = submit_mod.submit(spec, site, _runs(runs_dir))
    job = done.job
    result = {"id": job.id, "cluster_job_id": job.cluster_job_id, "run_dir": str(job.run_dir),
              "predicted_hours_per_epoch": predicted}
    if as_json and not wait:
        print_json(result)
    elif not as_json:
        out.print(f"job [bold]{job.id}[/] ({job.cluster} job {job.cluster_job_id}) submitted; run dir {job.run_dir}")
        if predicted is not None:
            out.print(f"predicted hours per epoch: {predicted:.3g}{gpu_note}")
    if wait:
        state = wait_for(job)
        result["state"] = state
        if as_json:
            print_json(result)
        else:
            out.print(f"job {job.id} ended {state}")
        fail_unless_completed(job, state)


def _submit_fit_check(spec, gpu: str | None, force: bool, dry_run: bool):
    """Refuse (exit 2) a SLURM run the estimate says will not fit GPU or host memory, unless --force;
    a dry run only warns. Returns the GPU the estimate assumed (None off SLURM) and a note naming it.
    Local and debug runs (CPU, tiny models) are never refused."""
    from llamajobs import estimate

    if spec.cluster != "slurm" or spec.device == "cpu":
        return None, ""
    accel = _accelerator(gpu, None, None)
    note = "" if gpu else f" ({accel.name} assumed; pass --gpu)"
    problem = estimate.fit_check(spec, accel, node_ram_gib=_node_ram_gib(spec, None))
    if problem and not force:
        if not dry_run:
            raise SpecError(f"{problem}; --force submits anyway{note}")
        err.print(f"warning: {problem}{note}")
    return accel, note


def resolve_init_from(value: str, runs_dir: str | None, after: tuple[str, ...] = ()) -> str:
    """--init-from JOB|DIR -> the directory: a job's final/, or a directory holding a model or an
    adapter. A job this one waits for (--after) need not have finished yet."""
    from llamajobs import registry

    path = Path(value)
    if value.isdigit() and not path.exists():
        job = _job(registry.Registry(_runs(runs_dir)), int(value))
        path = job.run_dir / "final"
        if value in after:
            return str(path.absolute())
    if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
        raise SpecError(f"--init-from {value}: {path} holds neither a model (config.json) nor an adapter "
                        f"(adapter_config.json); give a finished job id or a final/ directory")
    return str(path.absolute())


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


def fail_unless_completed(job, state: str) -> None:
    """--wait's end: exit 1, naming the first error's log, unless the job completed."""
    from llamajobs import monitor

    if state != "COMPLETED":
        log = monitor.traceback_log(job)
        raise Failure(f"job {job.id} ended {state}" + (f"; its first error's log: {log}" if log else ""))


def _training_job(reg, job_id: int):
    """The job and its spec, refused by name when it is an eval job (it logs no training metrics)."""
    from llamajobs.spec import JobSpec

    job = _job(reg, job_id)
    spec = JobSpec.load(job.run_dir / "spec.json")
    if spec.evaluation is not None:
        raise Failure(f"job {job_id} is an eval job ({spec.evaluation.task}): it logs no training metrics; "
                      f"`llamajobs status {job_id}` shows its accuracy")
    return job, spec


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


def _state(r) -> str:
    """The state; a STALLED job also says how old its last metric is (the cluster still says RUNNING)."""
    if r.state == "STALLED" and r.last_metric_age_s is not None:
        return f"STALLED, no metric for {_duration(r.last_metric_age_s)}"
    return r.state


def status_table(rows: list) -> Table:
    table = Table(box=None, header_style="bold")
    for col in ("id", "name", "job", "state", "nodes×gpus", "size/mode/strategy", "step", "epoch",
                "loss", "tok/s", "tok/s/gpu", "MFU", "ETA", "elapsed"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            str(r.id), r.name, f"{r.cluster}:{r.cluster_job_id}", _state(r),
            f"{r.nodes}×{r.gpus_per_node}" if r.cluster == "slurm" else f"{r.nodes}×{r.procs_per_node} cpu",
            _what(r), f"{_fmt(r.step)}/{_fmt(r.total_steps)}", _epoch(r.epoch),
            _fmt(r.loss, ".4f"), _fmt(r.tokens_per_s, ",.0f"), _fmt(r.tokens_per_s_per_gpu, ",.0f"),
            _fmt(r.mfu and r.mfu * 100, ".1f") + ("%" if r.mfu is not None else ""), _eta(r.eta_s),
            _duration(r.elapsed_s),
        )
    return table


def _what(r) -> str:
    """size/mode/strategy; an eval job's model/eval/task, with its accuracy once it finished."""
    accuracy = f" acc {r.accuracy:.1%}" if r.accuracy is not None else ""
    return f"{r.size}/{r.mode}/{r.strategy}{accuracy}"


def _eta(seconds: float | None) -> str:
    """The time left and the time of day it ends: '5:12:00 (Tue 14:05)'."""
    if seconds is None:
        return "-"
    return f"{_duration(seconds)} ({time.strftime('%a %H:%M', time.localtime(time.time() + seconds))})"


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


def print_training_progress(job, row, spec) -> None:
    from llamajobs import monitor

    out.print(f"model     {spec.size} {spec.mode} {spec.strategy}, {spec.nodes} node(s) "
              f"seq {spec.seq_len} global batch {spec.global_batch} micro {spec.micro_batch} lr {spec.lr}")
    out.print(f"progress  step {_fmt(row.step)}/{_fmt(row.total_steps)}  loss {_fmt(row.loss, '.4f')}  "
              f"tok/s {_fmt(row.tokens_per_s, ',.0f')}  MFU {_fmt(row.mfu and row.mfu * 100, '.2f')}% "
              f"(peak {row.peak or '-'})  ETA {_eta(row.eta_s)}  elapsed {_duration(row.elapsed_s)}")
    share = f" ({row.data_wait_frac:.1%} of the step)" if row.data_wait_frac is not None else ""
    last_save = f", the last in {row.checkpoint_s:.1f} s" if row.checkpoint_s is not None else ""
    out.print(f"time      data wait {_fmt(row.data_wait_s, '.4f')} s/step{share}  checkpoints {row.checkpoints}"
              f"{last_save}  peak memory {_fmt(row.mem_gib, '.2f')} GiB per process")
    if row.data_wait_frac is not None and row.data_wait_frac > monitor.SLOW_INPUT_FRAC:
        out.print(f"[yellow]slow input: each step waits {row.data_wait_frac:.0%} of its time for the next batch; "
                  "is the token store (--data) on a slow filesystem? copy it to node-local disk or a faster one[/]")
    losses = [m["loss"] for m in monitor.read_metrics(job.run_dir, tail_bytes=None) if m.get("loss") is not None]
    if losses:
        out.print(f"loss      {sparkline(losses)}  {losses[0]:.3f} → {losses[-1]:.3f}")


def print_eval_progress(row, evaluation, run_dir: Path) -> None:
    """An eval job has no steps: what it scores, then its result once eval.json is there."""
    from llamajobs import evaluate, monitor

    adapter = f" + adapter {evaluation.adapter}" if evaluation.adapter else ""
    out.print(f"eval      {evaluation.task} {evaluation.data} ({evaluation.shots}-shot, "
              f"{evaluate.eval_mode(evaluation.generate, evaluation.score)}), model {evaluation.model}{adapter}")
    result = monitor.eval_result(run_dir)
    if result is None:
        out.print(f"result    none yet  elapsed {_duration(row.elapsed_s)}")
        return
    accuracy = "-" if result["accuracy"] is None else f"{result['accuracy'] * 100:.1f}%"
    choices = " ".join(f"{k} {v}" for k, v in result["choices"].items())
    out.print(f"result    accuracy {accuracy} ({result['correct']}/{result['n_labelled']}), n {result['n']}, "
              f"{result['questions_per_s']} questions/s over {result.get('world_size', '-')} processes  "
              f"chosen {choices}  elapsed {_duration(row.elapsed_s)}")
    out.print(f"          {run_dir / 'eval.json'}, {run_dir / 'predictions.jsonl'}")


def print_detail(job, row) -> None:
    from llamajobs import events, monitor
    from llamajobs.spec import JobSpec

    spec = JobSpec.load(job.run_dir / "spec.json")
    out.print(f"[bold]job {job.id}[/] {job.name}  {_state(row)}  ({job.cluster} job {job.cluster_job_id})")
    out.print(f"run dir   {job.run_dir}")
    if spec.evaluation is not None:
        print_eval_progress(row, spec.evaluation, job.run_dir)
    else:
        print_training_progress(job, row, spec)
    out.print("events")
    for e in events.read(job.run_dir):
        extra = {k: v for k, v in e.items() if k not in ("time", "event")}
        out.print(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(e['time']))}  {e['event']}  {extra}")
    out.print("logs")
    for path in monitor.log_files(job):
        out.print(f"  {path}")
    if row.error:
        out.print(f"[red]first error: {row.error}[/]")
        if hint := monitor.collective_timeout_hint(row.error):
            out.print(hint)
    if row.state == "OUT_OF_MEMORY":
        out.print("out of memory: lower --micro-batch, add --activation-checkpointing, or see "
                  f"`llamajobs estimate memory --size {spec.size} --mode {spec.mode}` for the strategy that fits")
    if row.state in ("FAILED", "OUT_OF_MEMORY"):
        log = monitor.traceback_log(job)
        out.print(f"[red]first error's log: {log}[/]" if log else "[red]no log holds an error[/]")


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

    job, _ = _training_job(registry.Registry(_runs(runs_dir)), job_id)
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


# --- estimate (the model is llamajobs/estimate.py: pure and light, so its help texts come from it) ---

from llamajobs import estimate as estimate_model  # noqa: E402  (no torch: `estimate` stays fast)

_ERRORS = "; ".join(f"{s} {estimate_model.expected_error_text(s)}" for s in catalog.STRATEGIES)
HOURS_HELP = f"""Hours per epoch: predicted from the model, or measured from JOB's throughput.

Predicted: FLOPs per token (6N + 12·L·d·s; 4N with a frozen base) at our worker's measured
compute efficiency, plus FSDP's memory copies, all-gathers and reduce-scatters over NVLink or the
network, offload's PCIe traffic and CPU Adam (README "How estimates are made"). MFU is model FLOPs
over the catalog's datasheet peak. --size and --strategy take a comma list or `all` (every size but
tiny; every strategy) for a planning grid. Expected error, checked against published runs: {_ERRORS}.

Measured (JOB): steady tokens/s without warm-up steps and checkpoint pauses, the hours per epoch
and the time remaining, with the measured MFU.
"""


def estimate_options(f: Callable) -> Callable:
    """What both estimate commands take besides the training flags."""
    for option in reversed([
        click.option("--gpu", default=None,
                     help=f"One of {', '.join(catalog.GPUS)} (default {estimate_model.DEFAULT_GPU}); another name "
                          f"needs --peak-tflops and --gpu-mem-gib."),
        click.option("--peak-tflops", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Dense bf16 peak of the GPU, TFLOP/s (overrides the catalog's)."),
        click.option("--gpu-mem-gib", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Memory of the GPU, GiB (overrides the catalog's)."),
        click.option("--cpu-mem-gib", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Host RAM per node, GiB (default: --mem-per-node, else "
                          f"{estimate_model.DEFAULT.node_ram_gib:g})."),
        click.option("--assume", multiple=True, metavar="NAME=VALUE",
                     help="Override one of the model's constants (repeatable), e.g. network_gbps=100; "
                          "see llamajobs/estimate.py Assumptions."),
    ]):
        f = option(f)
    return f


def _accelerator(gpu: str | None, peak_tflops: float | None, gpu_mem_gib: float | None) -> catalog.Accelerator:
    name = gpu or estimate_model.DEFAULT_GPU
    if name in catalog.GPUS:
        base = catalog.GPUS[name]
    elif peak_tflops and gpu_mem_gib:
        return catalog.Accelerator(name=name, peak_bf16_flops=peak_tflops * 1e12, memory_gib=gpu_mem_gib)
    else:
        raise SpecError(f"--gpu {name!r} is not known; choose one of {', '.join(catalog.GPUS)}, "
                        f"or give --peak-tflops and --gpu-mem-gib for it")
    return dataclasses.replace(base, peak_bf16_flops=peak_tflops * 1e12 if peak_tflops else base.peak_bf16_flops,
                               memory_gib=gpu_mem_gib or base.memory_gib)


def _assumptions(assume: tuple[str, ...]):
    pairs = {}
    for item in assume:
        name, sep, value = item.partition("=")
        if not sep:
            raise SpecError(f"--assume {item!r} is malformed; use NAME=VALUE, e.g. network_gbps=100")
        pairs[name.strip()] = value.strip()
    try:
        return estimate_model.with_overrides(pairs)
    except ValueError as e:
        raise SpecError(str(e)) from None


def _node_ram_gib(spec, cpu_mem_gib: float | None) -> float | None:
    """--cpu-mem-gib, else the spec's --mem-per-node (SLURM syntax, megabytes without a suffix)."""
    if cpu_mem_gib:
        return cpu_mem_gib
    value = spec.mem_per_node.upper()
    if value in ("0", ""):
        return None
    scale = {"K": 1 / 2**20, "M": 1 / 1024, "G": 1.0, "T": 1024.0}
    unit = value[-1] if value[-1] in scale else "M"
    return float(value.rstrip("KMGT")) * scale[unit]


def _printed_grid(ctx, values, accel, count, a, cpu_mem_gib, as_json: bool) -> bool:
    """When --size or --strategy names several values (or all), print the planning grid; True if so."""
    sizes = _grid_axis(values, "size", [s for s in catalog.SIZES if s != "tiny"])
    strategies = _grid_axis(values, "strategy", catalog.STRATEGIES)
    if not (sizes or strategies):
        return False
    result = _grid(ctx, values, accel, count, a, cpu_mem_gib, sizes, strategies)
    print_json(result) if as_json else _print_grid(result, accel)
    return True


def _grid_axis(values: dict[str, Any], name: str, known: list[str] | tuple[str, ...]) -> list[str] | None:
    """The values of a grid axis (--size or --strategy), or None when the flag names one value."""
    raw = values.get(name)
    if raw is None or ("," not in raw and raw != "all"):
        return None
    items = list(known) if raw == "all" else [v.strip() for v in raw.split(",") if v.strip()]
    for item in items:
        if item not in known:
            raise SpecError(f"--{name} {item!r} is not allowed; choose from {', '.join(known)}, a comma list, or all")
    return items


def _grid(ctx: click.Context, values: dict[str, Any], gpu, tokens: int | None, a, cpu_mem_gib: float | None,
          sizes: list[str] | None, strategies: list[str] | None) -> dict[str, Any]:
    rows = []
    for size in sizes or [values.get("size")]:
        for strategy in strategies or [values.get("strategy")]:
            cell = dict(values)
            if size is not None:
                cell["size"] = size
            if strategy is not None:
                cell["strategy"] = strategy
            spec, _ = build_spec(ctx, cell, cluster_default="slurm")
            rows.append(estimate_model.grid_row(spec, gpu, spec.size, tokens, a, _node_ram_gib(spec, cpu_mem_gib)))
    return {"rows": rows}


def _hours(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def _print_grid(result: dict[str, Any], gpu) -> None:
    table = Table(box=None, header_style="bold")
    for col in ("size", "strategy", "mode", "hours/epoch", "MFU", "GPU GiB", "CPU GiB/node", "verdict"):
        table.add_column(col)
    for r in result["rows"]:
        table.add_row(r["size"], r["strategy"], r["mode"], _hours(r["hours_per_epoch"]), f"{r['mfu']:.1%}",
                      f"{r['gpu_mem_gib']:.1f}", f"{r['cpu_mem_gib']:.0f}", r["verdict"])
    out.print(table)
    out.print(f"GPU: {gpu.name} ({gpu.peak_bf16_flops / 1e12:g} TFLOP/s bf16, {gpu.memory_gib:g} GiB); "
              f"MFU is model FLOPs over that peak")


@cli.group()
def estimate() -> None:
    """Hours per epoch and memory fit, before or during a run."""


@estimate.command(help=HOURS_HELP)
@click.argument("job_id", type=int, required=False)
@options(TRAINING_OPTIONS)
@estimate_options
@click.option("--tokens", default=None, help="Tokens per epoch, e.g. 2.5B, 800M or 2500000000 (default: the spec's).")
@runs_dir_option
@json_option
@click.pass_context
def hours(ctx: click.Context, job_id: int | None, gpu: str | None, peak_tflops: float | None,
          gpu_mem_gib: float | None, cpu_mem_gib: float | None, assume: tuple[str, ...], tokens: str | None,
          runs_dir: str | None, as_json: bool, **values: Any) -> None:
    from llamajobs.spec import parse_count

    a = _assumptions(assume)
    count = parse_count(tokens) if tokens else None
    if job_id is not None:
        result = _measured_hours(job_id, runs_dir, count, a)
    else:
        accel = _accelerator(gpu, peak_tflops, gpu_mem_gib)
        if _printed_grid(ctx, values, accel, count, a, cpu_mem_gib, as_json):
            return
        spec, _ = build_spec(ctx, values, cluster_default="slurm")
        result = estimate_model.hours(spec, accel, count, a, _node_ram_gib(spec, cpu_mem_gib))
        result["spec"] = {"size": spec.size, "mode": spec.mode, "strategy": spec.strategy, "nodes": spec.nodes,
                          "gpus_per_node": spec.gpus_per_node, "seq_len": spec.seq_len,
                          "global_batch": spec.global_batch, "micro_batch": spec.micro_batch}
    if as_json:
        print_json(result)
        return
    _print_hours(result)


def _measured_hours(job_id: int, runs_dir: str | None, tokens: int | None, a) -> dict[str, Any]:
    from llamajobs import events, monitor, registry

    job, spec = _training_job(registry.Registry(_runs(runs_dir)), job_id)
    result = estimate_model.hours_from_metrics(monitor.read_metrics(job.run_dir, tail_bytes=None),
                                               events.read(job.run_dir), tokens, spec.tokens_per_epoch, a)
    if result is None:
        raise Failure(f"job {job_id} has no measured throughput yet; try again after its first logged steps")
    gpu = catalog.GPUS.get(result.get("peak") or "")
    if gpu is not None and spec.cluster == "slurm":  # the model's prediction for the same card, beside it
        try:
            result["predicted_tokens_per_s"] = estimate_model.throughput(spec, gpu, a)["tokens_per_s"]
        except ValueError:  # the checkpoint's config.json is gone: no shape to predict with
            pass
    return result


def _print_hours(r: dict[str, Any]) -> None:
    table = Table(box=None, show_header=False)
    measured = r["source"] == "measured"
    if "spec" in r:
        s = r["spec"]
        table.add_row("run", f"{s['size']} {s['mode']}, {s['strategy']}, {s['nodes']}x{s['gpus_per_node']} "
                             f"{r['peak']}, seq {s['seq_len']}, global batch {s['global_batch']}, "
                             f"micro {s['micro_batch']}")
    epoch = _hours(r["hours_per_epoch"])
    table.add_row("hours per epoch", epoch + (f" ({r['tokens_per_epoch']:,} tokens)" if r.get("tokens_per_epoch")
                                              else "  (pass --tokens 2.5B)"))
    per_gpu = _fmt(r["tokens_per_s_per_gpu"], ",.0f")
    table.add_row("tokens/s", f"{r['tokens_per_s']:,.0f} total, {per_gpu} per GPU")
    mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
    table.add_row(f"MFU ({'measured' if measured else 'assumed'})", f"{mfu} of {r.get('peak') or '?'}'s peak")
    parts = "" if measured else f" ({r['accumulation']} micro-batches: " + ", ".join(
        f"{k[:-2]} {v:.2f}" for k, v in r["time_parts_s"].items() if v) + ")"
    table.add_row("step", f"{r['step_s']:.3g} s{parts}")
    if measured:
        table.add_row("steps", f"{r['step']}/{_fmt(r['total_steps'])} ({r['steady_steps']} steady steps timed, "
                               f"{r['checkpoint_s']:.0f} s of checkpoints left out)")
        table.add_row("remaining", _duration(r["remaining_s"]))
        if r.get("predicted_tokens_per_s"):
            table.add_row("predicted", f"{r['predicted_tokens_per_s']:,.0f} tokens/s on this card")
        table.add_row("peak memory per process", _fmt(r["gpu_mem_gib"], ".1f") + " GiB")
    else:
        table.add_row("memory per GPU", f"{r['gpu_mem_gib']:.1f} GiB")
        table.add_row("memory per node (CPU)", f"{r['cpu_mem_gib']:.0f} GiB")
        table.add_row("verdict", r["verdict"])
        table.add_row("largest micro-batch that fits", _fmt(r["largest_fitting_micro_batch"]))
        table.add_row("expected error", r["expected_error"])
    out.print(table)


@estimate.command()
@options(TRAINING_OPTIONS)
@estimate_options
@json_option
@click.pass_context
def memory(ctx: click.Context, gpu: str | None, peak_tflops: float | None, gpu_mem_gib: float | None,
           cpu_mem_gib: float | None, assume: tuple[str, ...], as_json: bool, **values: Any) -> None:
    """Every strategy's GPU and CPU memory, a verdict, and the fastest strategy that fits.

    Per GPU: model states (by strategy, as DeepSpeed's own estimators count them), the unsharded fp32
    gradient our FSDP2 worker accumulates over micro-batches, activations (measured per layer), the
    logits and the framework. Per node's CPU: offloaded states, loading the weights once, the worker
    processes. fits: below 90% of the memory; tight: up to 100%. --size takes a comma list or `all`.
    """
    a = _assumptions(assume)
    accel = _accelerator(gpu, peak_tflops, gpu_mem_gib)
    if _printed_grid(ctx, values, accel, None, a, cpu_mem_gib, as_json):
        return
    spec, _ = build_spec(ctx, values, cluster_default="slurm")
    result = estimate_model.memory_table(spec, accel, a, _node_ram_gib(spec, cpu_mem_gib))
    if as_json:
        print_json(result)
        return
    table = Table(box=None, header_style="bold")
    for col in ("strategy", "GPU GiB", "CPU GiB/node", "verdict", "tokens/s"):
        table.add_column(col)
    for r in result["strategies"]:
        table.add_row(r["strategy"], f"{r['gpu_mem_gib']:.1f}", f"{r['cpu_mem_gib']:.0f}", r["verdict"],
                      f"{r['tokens_per_s']:,.0f}")
    out.print(table)
    first = result["strategies"][0]
    out.print(f"{spec.size} {spec.mode} on {spec.nodes}x{spec.gpus_per_node} {accel.name} "
              f"({first['gpu_capacity_gib']:g} GiB per GPU, {first['node_ram_gib']:g} GiB host RAM per node); "
              f"micro-batch {spec.micro_batch}")
    none = "none fits; add nodes, use --mode lora or --activation-checkpointing"
    out.print(f"recommended: {result['recommended'] or none}")


@cli.group()
def data() -> None:
    """Token stores: prepare them from corpora and instruction sets, inspect them."""


@data.command("prepare")
@click.argument("inputs", nargs=-1, required=True, type=click.Path())
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(),
              help="The model's directory (tokenizer.model or tokenizer.json), or a tokenizer.model file.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The store directory to write (written aside, renamed when complete).")
@click.option("--format", "fmt", default="text", show_default=True,
              help="text|s2orc|alpaca|medqa|medmcqa|pubmedqa|lmflow (JSON lines, a JSON list, or .gz of either).")
@click.option("--workers", type=int, default=1, show_default=True, help="Tokenizing processes (per shard).")
@click.option("--skip-bad-lines", is_flag=True, help="Skip and count malformed lines instead of stopping at the first.")
@click.option("--eval-fraction", type=float, default=0.0, show_default=True,
              help="Hold out this fraction of documents (by a hash of their id) into DIR/eval.")
@click.option("--force", is_flag=True, help="Replace an existing --out, once the new store is complete; with --shards, "
              "also discard an unfinished preparation made with other settings.")
@click.option("--shards", type=int, default=None,
              help="Split the inputs into N shards of equal bytes, one array task each, in DIR.parts; rerun the "
                   "same command to finish after an interruption or failed tasks.")
@click.option("--cluster", default=None, help="Where shards run: slurm or local (default: the site profile's, "
              "else slurm when `scontrol ping` answers).")
@click.option("--partition", default=None, help="SLURM partition of the shards (default: the site profile's).")
@click.option("--account", default=None, help="SLURM account of the shards (default: the site profile's).")
@click.option("--time", "time_limit", default=None,
              help="Each shard's time limit, HH:MM:SS (default: the site profile's, else the partition's).")
@click.option("--cpus-per-task", type=int, default=None, help="CPUs of each shard's task (default: --workers).")
@click.option("--mem", default=None, help="SLURM --mem of each shard's task (default: the cluster's).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait for the shards and merge them; --no-wait submits and returns (rerun to wait and merge).")
@json_option
def data_prepare(inputs: tuple[str, ...], tokenizer_path: str, out_dir: str, fmt: str, workers: int,
                 skip_bad_lines: bool, eval_fraction: float, force: bool, shards: int | None, cluster: str | None,
                 partition: str | None, account: str | None, time_limit: str | None, cpus_per_task: int | None,
                 mem: str | None, wait: bool, as_json: bool) -> None:
    """Tokenize corpora or instruction sets into a token store for `submit --data`.

    INPUT is a file (JSON lines, a JSON list, or .gz of either) or a directory of them."""
    from llamajobs.data import prepare as prep

    config = prep.PrepareConfig(inputs=tuple(Path(p) for p in inputs), tokenizer=Path(tokenizer_path),
                                out=Path(out_dir), format=fmt, workers=workers, skip_bad_lines=skip_bad_lines,
                                eval_fraction=eval_fraction, force=force)
    sharding = {"cluster": cluster, "partition": partition, "account": account, "time": time_limit,
                "cpus_per_task": cpus_per_task, "mem": mem}
    if shards is None:
        given = [f"--{k.replace('_', '-')}" for k, v in sharding.items() if v is not None] + ([] if wait else
                                                                                              ["--no-wait"])
        if given:
            raise SpecError(f"{', '.join(given)}: only with --shards N (sharded preparation)")
        with prep.RichProgress(err) as progress:
            meta = prep.prepare(config, progress)
    else:
        from llamajobs.data import shards as sh

        cluster_config = sh.cluster_config(shards, wait=wait, **sharding)
        with prep.RichProgress(err) as progress:
            meta = sh.prepare_sharded(config, cluster_config, progress, on_submit=lambda line: err.print(line))
        if meta.get("unfinished"):
            if as_json:
                print_json(meta)
                return
            out.print(f"{meta['workdir']}: {meta['counts']}; `llamajobs data inspect {out_dir}` shows the shards; "
                      f"rerun the same command to wait for them and merge")
            return
    if as_json:
        print_json(meta)
        return
    held = meta.get("eval")
    out.print(f"{out_dir}: {meta['documents']:,} documents, {meta['tokens']:,} tokens ({meta['dtype']})"
              + (f"; eval split: {held['documents']:,} documents, {held['tokens']:,} tokens" if held else ""))
    done = meta.get("preparation")
    if done:
        out.print(f"{done['shards']} shard(s) on the {done['cluster']} cluster"
                  + (f" ({done['shards_requested']} requested: whole files are not split)"
                     if done["shards"] < done["shards_requested"] else "")
                  + f", {done['seconds']:.1f} s; merge {done['merge_seconds']:.2f} s")
    if meta["skipped_empty"] or meta["skipped_bad_lines"]:
        err.print(f"skipped {meta['skipped_empty']:,} empty documents and {meta['skipped_bad_lines']:,} bad lines"
                  + "".join(f"\n  {line}" for line in meta["bad_line_examples"]))


@data.command("inspect")
@click.argument("store_dir", type=click.Path(file_okay=False))
@click.option("--document", type=int, default=0, show_default=True, help="Which document to decode as the sample.")
@click.option("--tokenizer", "tokenizer_path", default=None, type=click.Path(),
              help="Decode with this tokenizer (default: the one the store was made with).")
@json_option
def data_inspect(store_dir: str, document: int, tokenizer_path: str | None, as_json: bool) -> None:
    """Documents, tokens, dtype, tokenizer fingerprint and a decoded sample of a token store."""
    from llamajobs.data.prepare import describe

    info = describe(store_dir, tokenizer=tokenizer_path, document=document)
    if as_json:
        print_json(info)
        return
    if info.get("unfinished"):
        _print_unfinished(info)
        return
    table = Table(box=None, show_header=False)
    for key in ("path", "format", "documents", "tokens", "dtype", "loss_mask", "vocab_size", "fingerprint",
                "tokenizer", "mean_document_tokens", "max_document_tokens", "bytes_on_disk", "skipped_empty",
                "skipped_bad_lines", "eval"):
        value = info[key]
        table.add_row(key, f"{value:,.1f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int)
                      else str(value))
    out.print(table)
    sample = info["sample"]
    if sample:
        out.print(f"\ndocument {sample['document']} ({sample['tokens']:,} tokens)"
                  + (", first tokens shown" if sample.get("truncated") else "") + ":", style="bold")
        if sample.get("note"):
            out.print(sample["note"], style="yellow")
        if "prompt" in sample:
            out.print("[prompt, masked out of the loss]", style="dim", markup=False)
            out.print(sample["prompt"], markup=False, highlight=False)
            out.print("[response, trained on]", style="dim", markup=False)
            out.print(sample["response"], markup=False, highlight=False)
        elif sample.get("text") is not None:
            out.print(sample["text"], markup=False, highlight=False)
        else:
            out.print(f"ids: {sample['first_ids']} ...")


def _print_unfinished(info: dict[str, Any]) -> None:
    """`data inspect` of a sharded preparation that is not finished: one row per shard."""
    counts = ", ".join(f"{n} {state}" for state, n in info["counts"].items())
    out.print(f"{info['path']}: unfinished sharded preparation in {info['workdir']} ({counts}); "
              f"rerun the same `data prepare` command to finish it", markup=False)
    table = Table(box=None, header_style="bold")
    for column in ("shard", "state", "MB", "documents", "tokens", "host", "job", "note"):
        table.add_column(column)
    for row in info["shards"]:
        note = row.get("error") or (f"{row['done_fraction']:.0%}, updated {row['updated_s_ago']:.0f} s ago"
                                    if "done_fraction" in row else f"{row['seconds']} s" if "seconds" in row else "")
        table.add_row(str(row["index"]), row["state"], f"{row['bytes'] / 1e6:,.1f}",
                      f"{row['documents']:,}" if "documents" in row else "",
                      f"{row['tokens']:,}" if "tokens" in row else "", row.get("host") or "", row.get("job") or "",
                      note)
    out.print(table)


@cli.group()
def tokenizer() -> None:
    """Tokenizers."""


@tokenizer.command("train")
@click.argument("texts", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--vocab-size", type=int, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
def tokenizer_train(texts: tuple[str, ...], vocab_size: int, out_dir: str) -> None:
    """Train a LLaMA-style sentencepiece BPE model on text files (plain text or JSONL with "text")."""
    from llamajobs.data import read_text_files
    from llamajobs.data.tokenizer import train_tokenizer

    try:
        path = train_tokenizer(read_text_files(texts), vocab_size, Path(out_dir))
    except ValueError as e:  # a JSONL line without "text"
        raise SpecError(str(e)) from None
    except RuntimeError as e:  # sentencepiece refuses the vocabulary size, in its own words
        raise SpecError(f"--vocab-size {vocab_size}: {str(e).split('] ')[-1]}") from None
    out.print(f"tokenizer written to {path}")


@cli.command()
@click.option("--input-dir", required=True, type=click.Path(file_okay=False),
              help="Meta's checkpoint folder: consolidated.NN.pth shards and params.json.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The Hugging Face directory to write (new or empty).")
@click.option("--size", default=None, help=f"Cross-check the shape against the catalog: {', '.join(catalog.SIZES)}.")
@click.option("--tokenizer", "tokenizer_file", default=None, type=click.Path(dir_okay=False),
              help="Meta's tokenizer.model (default: in --input-dir or its parent).")
@click.option("--max-seq-len", type=int, default=None,
              help="max_position_embeddings (default: params.json's, else 2048 for LLaMA-1, 4096 for LLaMA-2).")
@json_option
def convert(input_dir: str, out_dir: str, size: str | None, tokenizer_file: str | None, max_seq_len: int | None,
            as_json: bool) -> None:
    """Meta's consolidated.*.pth + params.json + tokenizer.model -> an HF LLaMA directory.

    The shape comes from params.json and the shards from the files (merged, streamed layer group by
    layer group); --size only cross-checks.
    """
    from llamajobs import convert as convert_mod

    result = convert_mod.convert(input_dir, out_dir, size=size, tokenizer=tokenizer_file, max_seq_len=max_seq_len)
    if as_json:
        print_json(result)
        return
    out.print(f"converted {result['shards_in']} shard(s) into {result['out']}: {result['params'] / 1e9:.2f}B "
              f"parameters, {result['dtype']}, {result['files_out']} safetensors file(s)")
    out.print(f"dim {result['dim']}, {result['n_layers']} layers, {result['n_heads']} heads "
              f"({result['n_kv_heads']} kv), ffn {result['ffn_dim']}, vocab {result['vocab_size']}")


def _eval_default(name: str) -> str:
    from llamajobs.spec import EVAL_FIELDS

    return f" (default {EVAL_FIELDS[name].default})"


@cli.command("eval")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False),
              help="HF LLaMA directory (convert's output, a run's final/ or final/merged).")
@click.option("--adapter", default=None, type=click.Path(file_okay=False), help="A LoRA adapter (a LoRA run's final/).")
@click.option("--task", required=True, help="medqa, medmcqa or pubmedqa.")
@click.option("--data", required=True, type=click.Path(dir_okay=False), help="The questions (JSONL; JSON list or dict).")
@click.option("--shots", type=int, default=None, help="Solved examples before each question" + _eval_default("shots") + ".")
@click.option("--shots-file", default=None, type=click.Path(dir_okay=False), help="Where the shots come from (first K).")
@click.option("--generate", "use_generate", is_flag=True, help="Greedy-generate and parse the letter instead of scoring.")
@click.option("--score", default=None,
              help="letter: log-likelihood of the option's letter; text: of its text" + _eval_default("score") + ".")
@click.option("--batch-size", type=int, default=None, help="Questions per forward pass" + _eval_default("batch_size") + ".")
@click.option("--limit", type=int, default=None, help="Only the first N questions.")
@click.option("--max-new-tokens", type=int, default=None, help="With --generate" + _eval_default("max_new_tokens") + ".")
@click.option("--predictions", default=None, type=click.Path(dir_okay=False),
              help="Write per-question results (JSONL); a cluster job writes RUN_DIR/predictions.jsonl.")
@_opt("--cluster", help="slurm, local or debug: submit the eval as a job there (default: run it here).")
@options(PLACEMENT_OPTIONS + QUEUE_OPTIONS)
@click.option("--name", default=None, help="With --cluster: the job's name (default eval-TASK).")
@click.option("--wait", is_flag=True, help="With --cluster: block until the job ends, then print its accuracy.")
@runs_dir_option
@json_option
@click.pass_context
def eval_cmd(ctx: click.Context, model_dir: str, adapter: str | None, task: str, data: str, shots: int | None,
             shots_file: str | None, use_generate: bool, score: str | None, batch_size: int | None, limit: int | None,
             max_new_tokens: int | None, predictions: str | None, wait: bool, runs_dir: str | None, as_json: bool,
             **values: Any) -> None:
    """Multiple-choice accuracy on MedQA-USMLE, MedMCQA or PubMedQA: n, accuracy, choice counts.

    Runs here, or with --cluster as a job (the questions split over its worker processes; `status`,
    `logs` and `cancel` as for training; RUN_DIR/eval.json holds what --json prints).
    """
    from llamajobs import evaluate
    from llamajobs.spec import EvalSpec, default

    settings = {"model": model_dir, "adapter": adapter, "task": task, "data": data, "shots": shots,
                "shots_file": shots_file, "generate": use_generate, "score": score, "batch_size": batch_size,
                "limit": limit, "max_new_tokens": max_new_tokens}
    options = EvalSpec(**{k: v for k, v in settings.items() if v is not None})
    if values["cluster"] is None:
        job_flags = [k for k, v in values.items() if v is not None and k != "device"] + (["wait"] if wait else [])
        if job_flags:
            raise SpecError(f"--{job_flags[0].replace('_', '-')} is for an eval job: add --cluster slurm or "
                            f"--cluster local (without --cluster, eval runs here)")
        result = evaluate.evaluate(options, device=values["device"] or default("device"))
        details = result.pop("predictions")
        if predictions:
            evaluate.write_predictions(predictions, details)
        print_eval(result, as_json)
        return
    if predictions:
        raise SpecError(f"--predictions {predictions}: an eval job writes RUN_DIR/predictions.jsonl; leave it out")
    submit_eval(ctx, options, values, wait=wait, runs_dir=runs_dir, as_json=as_json)


def submit_eval(ctx: click.Context, options, values: dict[str, Any], *, wait: bool, runs_dir: str | None,
                as_json: bool) -> None:
    """`eval --cluster`: the files checked here, then a job like training's (run dir, registry)."""
    from llamajobs import evaluate, monitor, submit as submit_mod

    def absolute(path: str | None) -> str | None:  # the job runs elsewhere: no relative paths
        return None if path is None else str(Path(path).absolute())

    options = dataclasses.replace(options, model=absolute(options.model), data=absolute(options.data),
                                  adapter=absolute(options.adapter), shots_file=absolute(options.shots_file))
    spec, site = build_spec(ctx, values, fixed={"evaluation": options})
    evaluate.read_inputs(options)  # a bad data or shots file fails before anything is queued
    if not spec.after:  # a model that a job it waits for will write need not exist yet
        evaluate.resolve_model(options.model, options.adapter)
    job = submit_mod.submit(spec, site, _runs(runs_dir)).job
    result: dict[str, Any] = {"id": job.id, "cluster_job_id": job.cluster_job_id, "run_dir": str(job.run_dir)}
    if as_json and not wait:
        print_json(result)
    elif not as_json:
        out.print(f"eval job [bold]{job.id}[/] ({job.cluster} job {job.cluster_job_id}) submitted; run dir {job.run_dir}")
    if not wait:
        return
    state = wait_for(job)
    scored = monitor.eval_result(job.run_dir) if state == "COMPLETED" else None
    if as_json:
        print_json({**result, "state": state, **(scored or {})})
    else:
        out.print(f"job {job.id} ended {state}")
        if scored:
            print_eval(scored, as_json=False)
    fail_unless_completed(job, state)
    if scored is None:
        raise Failure(f"job {job.id} completed without writing {job.run_dir / 'eval.json'}")


def print_eval(result: dict[str, Any], as_json: bool) -> None:
    """Accuracy, n, throughput and the choice counts; or the whole result as JSON."""
    if as_json:
        print_json(result)
        return
    accuracy = "-" if result["accuracy"] is None else f"{result['accuracy'] * 100:.1f}%"
    ranks = f" over {result['world_size']} processes" if result.get("world_size") else ""
    out.print(f"{result['task']} ({result['mode']}, {result['shots']}-shot): accuracy [bold]{accuracy}[/] "
              f"({result['correct']}/{result['n_labelled']}), n {result['n']}, "
              f"{result['questions_per_s']} questions/s{ranks}")
    table = Table(box=None, header_style="bold")
    table.add_column("")
    for key in result["choices"]:
        table.add_column(key)
    table.add_row("chosen", *(str(v) for v in result["choices"].values()))
    table.add_row("gold", *(str(result["gold"].get(k, "-")) for k in result["choices"]))
    out.print(table)
    for note in result["notes"] + ([f"{result['truncated']} prompt(s) truncated to fit the model"]
                                   if result["truncated"] else []):
        err.print(f"note: {note}")


@cli.command("generate")
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="HF LLaMA directory.")
@click.option("--adapter", default=None, type=click.Path(file_okay=False), help="A LoRA adapter (a LoRA run's final/).")
@click.option("--prompt", required=True, help="The text to continue, as given.")
@click.option("--max-new-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0: greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="For sampling (temperature > 0).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def generate_cmd(model_dir: str, adapter: str | None, prompt: str, max_new_tokens: int, temperature: float,
                 top_p: float, seed: int, device: str) -> None:
    """Continue a prompt (greedy by default); prints only the generated text."""
    from llamajobs import evaluate

    click.echo(evaluate.generate(model_dir, prompt, adapter=adapter, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, seed=seed, device=device))


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
