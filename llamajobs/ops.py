"""The operations behind the `llamajobs` commands: each command of llamajobs/cli/ parses its flags,
calls one of these and prints what it returns with llamajobs/views.py. No click and no rich here, so
tests call them directly and another front end could too.

Results are frozen dataclasses (or the typed rows of monitor and the estimator). Bad input raises
SpecError (the CLI exits 2), a failed operation Failure (exit 1).

submitit, torch and transformers are imported only by the operations that need them, so `status`,
`render` and `estimate` start fast.
"""

from __future__ import annotations

import dataclasses
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import llamajobs.spec
from llamajobs import catalog, cluster, estimate, events, files, forensics, hub, metrics, monitor, presets, registry, site
from llamajobs.data.prepare import PrepareConfig, Progress, prepare
from llamajobs.data.results import Prepared, Unfinished, prepared
from llamajobs.errors import Failure, SpecError
from llamajobs.evaluate import EvalResult
# What submit checks against the hardware lives in fit.py; the CLI calls it through ops.
from llamajobs.fit import FitCheck, accelerator, fit_check, node_ram_gib, plan_for_gpu, preemption_warning
from llamajobs.registry import Job
from llamajobs.site import Site
from llamajobs.spec import EvalSpec, JobSpec

# Job ids are small integers; anything longer than this is a typo, not a job (and would overflow SQLite).
MAX_JOB_ID = 10**12


# --- the runs directory and its jobs ---


def runs_dir(flag: str | None = None, writable: bool = False) -> Path:
    """--runs-dir, $LLAMAJOBS_RUNS, the site profile's, or $LLAMAJOBS_HOME/runs; refused when it is
    a file, or (writable: a submit makes run dirs there) when it cannot be written. Reading another
    user's runs needs no write access: the index lives in our own cache."""
    profile, _ = site.load()
    path = site.runs_dir(profile, flag)
    registry.check_runs_dir(path, write=writable)
    return path


def find_job(runs: Path, job_id: int) -> Job:
    if not 0 < job_id < MAX_JOB_ID:
        raise SpecError(f"JOB {job_id} is not a job id; ids are the small numbers `llamajobs status` lists")
    reg = registry.Registry(runs)
    try:
        job = reg.get(job_id)
        if job is None:
            known = ", ".join(str(j.id) for j in reg.jobs()) or "none"
            raise SpecError(f"JOB {job_id} is not known in {runs}; known: {known}")
        return job
    finally:
        reg.close()


def tokenizer_source(value: str) -> Path:
    """data's --tokenizer: a directory or file here, or a Hub id (org/name[@revision]) resolved into the
    Hugging Face cache (site.yaml's hf_home, else HF_HOME) as --model-path's is: its snapshot directory."""
    if not hub.is_hub_id(value):
        return Path(value)
    home = site.load()[1].get("hf_home")
    return hub.resolve(value, home if isinstance(home, str) else None, flag="--tokenizer").path


def load_spec(job: Job) -> JobSpec:
    """The job's spec.json; Failure naming the file when it is missing or damaged."""
    try:
        return JobSpec.load(job.run_dir / "spec.json")
    except (OSError, ValueError) as e:  # SpecError is a ValueError
        raise Failure(f"job {job.id}: {job.run_dir / 'spec.json'} cannot be read: {e}") from None


def training_job(runs: Path, job_id: int) -> tuple[Job, JobSpec]:
    """The job and its spec, refused by name when it is an eval job (it logs no training metrics)."""
    job = find_job(runs, job_id)
    spec = load_spec(job)
    if spec.evaluation is not None:
        raise Failure(f"job {job_id} is an eval job ({spec.evaluation.task}): it logs no training metrics; "
                      f"`llamajobs status {job_id}` shows its accuracy")
    return job, spec


# --- building a spec (submit, render, estimate, eval --cluster) ---


def build_spec(flags: dict[str, Any], config_file: str | None = None, cluster_default: str | None = None,
               fixed: dict[str, Any] | None = None) -> tuple[JobSpec, Site]:
    """The JobSpec of the typed flags over the run YAML (a file, or a preset's name) and the site
    profile; `fixed` holds fields the command sets itself (an eval job's `evaluation`)."""
    profile, site_defaults = site.load()
    config = site.read_yaml(presets.config_file(config_file), "--config") if config_file else {}
    flags = {**flags, **(fixed or {})}
    if cluster_default and "cluster" not in flags and "cluster" not in config and "cluster" not in site_defaults:
        flags["cluster"] = cluster_default
    return llamajobs.spec.build(flags, config, site_defaults), profile


def site_gpu() -> str | None:
    """The site profile's GPU type: what estimates and the fit check assume when --gpu is not given."""
    return site.load()[0].gpu


def resolve_init_from(value: str, runs: Path, after: tuple[str, ...] = ()) -> str:
    """--init-from JOB|DIR -> the directory: a job's final/, or a directory holding a model or an
    adapter. A job this one waits for (--after) need not have finished yet."""
    path = Path(value)
    if value.isdigit() and not path.exists():
        path = find_job(runs, int(value)).run_dir / "final"
        if value in after:
            return str(path.absolute())
    if not ((path / "config.json").exists() or (path / "adapter_config.json").exists()):
        raise SpecError(f"--init-from {value}: {path} holds neither a model (config.json) nor an adapter "
                        f"(adapter_config.json); give a finished job id or a final/ directory")
    return str(path.absolute())


# --- submit ---


def checked_spec(spec: JobSpec, runs: Path) -> JobSpec:
    """What submit checks on the submitting host before anything is queued: --init-from resolved to
    a directory, --data a complete token store."""
    if spec.init_from is not None:
        resolved = dataclasses.replace(spec, init_from=resolve_init_from(spec.init_from, runs, spec.after))
        spec = llamajobs.spec.with_model_shape(resolved)  # a full model there is what trains
    own_tokenizer = spec.init_from and (Path(spec.init_from) / "tokenizer_config.json").is_file()
    if spec.model_path and not own_tokenizer and not any(
            (Path(spec.model_path) / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise SpecError(f"--model-path {spec.model_path}: no tokenizer.json or tokenizer.model there; the worker "
                        f"tokenizes with the model's own tokenizer: copy it beside the weights")
    from llamajobs.rules import validate_objective_data

    if spec.data is None:
        validate_objective_data(spec, preference_store=False)  # (dpo: refused, it needs pairs)
    else:
        from llamajobs.data.preference import is_preference_store
        from llamajobs.data.store import TokenStore
        from llamajobs.rules import validate_packing

        store = TokenStore(spec.data)
        validate_objective_data(spec, is_preference_store(store))
        validate_packing(spec, packed=store.has_loss_mask and not is_preference_store(store))
    return spec


def check_partition(spec: JobSpec, profile: Site) -> None:
    """What the cluster can tell before a submit (SLURM: its nodes' GPUs), refused naming the value."""
    from llamajobs import submit

    submit.check_node_gpus(spec, profile, cluster.backend(spec.cluster))


@dataclass(frozen=True, slots=True)
class DryRun:
    folder: Path
    script: str  # the batch script, job.sbatch
    verdict: str | None  # `sbatch --test-only`'s, on SLURM


def dry_run(spec: JobSpec, profile: Site) -> DryRun:
    from llamajobs import submit

    folder, verdict = submit.dry_run(spec, profile)
    return DryRun(folder, (folder / "job.sbatch").read_text(), verdict)


@dataclass(frozen=True, slots=True)
class Submitted:
    job: Job
    predicted_hours_per_epoch: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.job.id, "cluster_job_id": self.job.cluster_job_id, "run_dir": str(self.job.run_dir),
                "predicted_hours_per_epoch": self.predicted_hours_per_epoch}


def submit_job(spec: JobSpec, profile: Site, runs: Path, fit: FitCheck | None = None,
               after_any: tuple[Job, ...] = ()) -> Submitted:
    """after_any: jobs it starts after, however they end (a sweep's --max-parallel slots)."""
    from llamajobs import submit

    predicted = estimate.hours_for_spec(spec, fit.accelerator) if fit and fit.accelerator else None
    return Submitted(submit.submit(spec, profile, runs, after_any).job, predicted)


def wait(job: Job, on_step: Callable[[monitor.Row], None] = lambda row: None, poll_s: float = 1.0) -> str:
    """Poll until the job ends, calling on_step with each row that logged a new step; its end state."""
    shown = None
    info = catalog.CLUSTER.get(job.cluster)
    poll_s = max(poll_s, info.poll_s if info else 0.0)  # a controller is not to be hammered
    while True:
        row = monitor.row(job)
        if row.step is not None and row.step != shown:
            shown = row.step
            on_step(row)
        if row.state in cluster.TERMINAL:
            return row.state
        time.sleep(poll_s)


def fail_unless_completed(job: Job, state: str) -> None:
    """--wait's end: Failure naming the first error's log, unless the job completed."""
    if state != "COMPLETED":
        log = forensics.traceback_log(job)
        raise Failure(f"job {job.id} ended {state}" + (f"; its first error's log: {log}" if log else ""))


# --- status ---

FINISHED_HIDDEN_AFTER_S = 7 * 86400  # `status` without --all leaves out jobs that ended a week ago


def status_rows(runs: Path, job_id: int | None = None, show_all: bool = False, now: float | None = None
                ) -> list[monitor.Row]:
    """One row per job, or JOB's. A finished job's row is cached in the registry when first seen
    finished, so later tables read none of its files and ask no cluster about it."""
    jobs = [find_job(runs, job_id)] if job_id is not None else None
    reg = registry.Registry(runs)
    try:
        jobs = jobs or reg.jobs()
        now = now or time.time()
        found = _rows(reg, jobs, now)
    finally:
        reg.close()
    if show_all or job_id is not None:
        return found
    return [r for r, j in zip(found, jobs)
            if r.state not in cluster.TERMINAL or now - j.submitted_at < FINISHED_HIDDEN_AFTER_S]


def _rows(reg: registry.Registry, jobs: list[Job], now: float) -> list[monitor.Row]:
    cached = reg.finished_rows()
    found = monitor.rows(jobs, now, cached)
    reg.set_finished([r.to_dict() for r in found if r.state in cluster.TERMINAL and r.problem is None
                      and r.id not in cached])
    return found


def job_rows(runs: Path, ids: list[int], now: float | None = None) -> dict[int, monitor.Row]:
    """The rows of these jobs only (a sweep's trials), by id, cached as status_rows caches them; an
    id the runs directory no longer holds is left out."""
    if not ids:
        return {}
    reg = registry.Registry(runs)
    try:
        jobs = [job for i in ids if (job := reg.get(i)) is not None]
        return {r.id: r for r in _rows(reg, jobs, now or time.time())}
    finally:
        reg.close()


@dataclass(frozen=True, slots=True)
class Detail:
    """`status JOB`: the row, and what the detail view shows beside it."""
    job: Job
    row: monitor.Row
    spec: JobSpec | None  # None when spec.json is damaged (row.problem says so)
    events: list[dict[str, Any]]
    logs: list[Path]
    losses: list[float]  # every logged step's, for the sparkline
    slow_input: bool  # waiting for batches takes a noticeable share of the step
    eval_result: EvalResult | dict[str, Any] | None  # an eval job's eval.json, once written (a dict: lm-eval's)
    error_hint: str | None  # what the first error means (a collective timeout)
    error_log: Path | None  # the first error's log, for a failed job
    val_losses: tuple[tuple[int, float], ...] = ()  # (step, validation loss) of every validation run
    preference: metrics.MetricsRow | None = None  # --objective dpo: the last row with its statistics


def detail(runs: Path, job_id: int) -> Detail:
    job = find_job(runs, job_id)
    row = status_rows(runs, job_id)[0]
    try:
        spec = JobSpec.load(job.run_dir / "spec.json")
    except (OSError, ValueError):
        spec = None
    try:
        measured = job_metrics(job)
    except Failure:  # the row names the problem; the rest of the detail still shows
        measured = []
    losses = [r.loss for r in measured]
    preference = next((r for r in reversed(measured) if r.reward_accuracy is not None), None)
    failed = row.state in ("FAILED", "OUT_OF_MEMORY")
    return Detail(job=job, row=row, spec=spec, events=events.read(job.run_dir), logs=forensics.log_files(job),
                  losses=losses,
                  slow_input=row.data_wait_frac is not None and row.data_wait_frac > monitor.SLOW_INPUT_FRAC,
                  eval_result=_eval_detail(job.run_dir, spec.evaluation) if spec and spec.evaluation else None,
                  error_hint=forensics.collective_timeout_hint(row.error),
                  error_log=forensics.traceback_log(job) if failed else None,
                  val_losses=tuple((r.step, r.val_loss) for r in measured if r.val_loss is not None),
                  preference=preference)


# --- cancel, requeue, logs ---


def cancel(runs: Path, job_id: int) -> Job:
    job = find_job(runs, job_id)
    state = monitor.row(job).state
    if state in cluster.TERMINAL:
        raise Failure(f"job {job_id} already ended {state}")
    events.record(job.run_dir, "cancelled")  # tells a cancel from a preemption on the local cluster
    cluster.of(job).cancel(job)
    return job


def requeue(runs: Path, job_id: int, timeout_s: float = 900, poll_s: float = 0.5) -> str | None:
    """Checkpoint now and requeue (what preemption does): the `latest` checkpoint it resumes from."""
    job = find_job(runs, job_id)
    state = monitor.row(job).state
    if state not in ("RUNNING", "STALLED"):
        raise Failure(f"job {job_id} is {state}; only a running job can be requeued")
    asked = time.time()
    cluster.of(job).signal_stop(job)
    while True:
        done = [e for e in events.read(job.run_dir) if e.get("event") == "requeued" and e.get("time", 0) >= asked]
        if done:
            return done[-1].get("latest")
        if time.time() - asked > timeout_s:
            raise Failure(f"job {job_id} did not checkpoint within {timeout_s:.0f} s; see `llamajobs logs {job_id}`")
        time.sleep(poll_s)


def log_file(runs: Path, job_id: int, rank: int | None = None, stderr: bool = False) -> Path:
    """The node launcher's log (submitit's, node 0), or one worker rank's newest."""
    job = find_job(runs, job_id)
    stream = "err" if stderr else "out"
    if rank is None:
        candidates = sorted((job.run_dir / "submitit").glob(f"*_0_log.{stream}"))
    else:
        candidates = [p for p in forensics.rank_logs(job).get(rank, []) if p.name == f"std{stream}.log"]
    if not candidates:
        raise Failure(f"no log yet for job {job_id}" + (f" rank {rank}" if rank is not None else ""))
    return candidates[-1]


def read_log(path: Path, follow: bool = False, poll_s: float = 0.5) -> Iterator[str]:
    """The log's text in pieces (never the whole of a long log in memory), then (follow) each line as it
    is written, until interrupted. A log that is no regular file (a FIFO, a device) is refused, not waited on."""
    with io.TextIOWrapper(files.open_regular(path), errors="replace") as f:
        while piece := f.read(1 << 16):
            yield piece
        while follow:
            line = f.readline()
            if line:
                yield line
            else:
                time.sleep(poll_s)


def job_metrics(job: Job) -> list[metrics.MetricsRow]:
    """Every metrics row of the job (lines that are not rows left out: monitor's row counts them)."""
    try:
        return metrics.read(job.run_dir, tail_bytes=None).rows
    except OSError as e:
        raise Failure(f"job {job.id}: {job.run_dir / metrics.METRICS_FILE} cannot be read ({e.strerror})") from None


def plot_job(runs: Path, job_id: int, output: Path, x: str = "step") -> Path:
    from llamajobs.plot import plot_metrics

    job, _ = training_job(runs, job_id)
    return plot_metrics(job_metrics(job), f"job {job.id} {job.name}", output, x)


def plot_jobs(runs: Path, job_ids: list[int], output: Path, x: str = "step") -> Path:
    """Several jobs' loss curves overlaid, one legend entry each."""
    from llamajobs.plot import overlay

    curves = []
    for job_id in job_ids:
        job, _ = training_job(runs, job_id)
        curves.append((f"job {job.id} {job.name}", job_metrics(job)))
    return overlay(curves, f"jobs {', '.join(map(str, job_ids))}", output, x)


# --- eval ---


@dataclass(frozen=True, slots=True)
class EvalRun:
    result: EvalResult  # what `eval --json` prints (predictions aside)
    predictions_error: str | None = None  # the scoring stands even when its predictions file could not be written


def evaluate_here(options: EvalSpec, device: str, predictions: Path | None = None) -> EvalRun:
    """In-process `eval`: score, then write the per-question predictions (if asked)."""
    from llamajobs import evaluate

    if predictions is not None:
        evaluate.check_writable(predictions, "--predictions")
    result, details = evaluate.evaluate(options, device=device)
    if predictions is None:
        return EvalRun(result)
    try:
        evaluate.write_predictions(predictions, details)
    except OSError as e:
        return EvalRun(result, f"--predictions {predictions}: not written ({e.strerror}); the scores above stand")
    return EvalRun(result)


def submit_eval(options: EvalSpec, flags: dict[str, Any], runs: Path) -> Submitted:
    """`eval --cluster`: the files checked here, then a job like training's (run dir, registry)."""
    from llamajobs import evaluate, submit

    def absolute(path: str | None) -> str | None:  # the job runs elsewhere: no relative paths
        return None if path is None else str(Path(path).absolute())

    options = dataclasses.replace(options, model=absolute(options.model), data=absolute(options.data),
                                  adapter=absolute(options.adapter), shots_file=absolute(options.shots_file))
    spec, profile = build_spec(flags, fixed={"evaluation": options})
    check_partition(spec, profile)
    evaluate.read_inputs(options)  # a bad data or shots file fails before anything is queued
    if not spec.after:  # a model that a job it waits for will write need not exist yet
        evaluate.resolve_model(options.model, options.adapter)
    return Submitted(submit.submit(spec, profile, runs).job)


def eval_result(job: Job, state: str) -> EvalResult | None:
    """A multiple-choice eval job's result, once it completed (None: not written, or damaged)."""
    return EvalResult.from_json(monitor.eval_result(job.run_dir)) if state == "COMPLETED" else None


def harness_result(job: Job, state: str) -> dict[str, Any] | None:
    """An lm-eval job's summary (its eval.json, lm-eval's metrics per task), once it completed."""
    return monitor.eval_result(job.run_dir) if state == "COMPLETED" else None


def _eval_detail(run_dir: Path, evaluation: EvalSpec) -> EvalResult | dict[str, Any] | None:
    """What `status JOB` shows of an eval job's eval.json: typed for the built-in eval, lm-eval's summary as is."""
    written = monitor.eval_result(run_dir)
    return written if evaluation.harness else EvalResult.from_json(written)


# --- data ---


def prepare_data(config: PrepareConfig, shards: int | None, sharding: dict[str, Any], wait: bool = True,
                 progress: Callable[[Progress], None] | None = None,
                 on_submit: Callable[[str], None] = lambda line: None) -> Prepared | Unfinished:
    """`data prepare`: in this process, or (shards) as array tasks merged into one store; or a
    sharded preparation's state while it is unfinished."""
    if shards is None:
        given = [f"--{k.replace('_', '-')}" for k, v in sharding.items() if v is not None] + ([] if wait else
                                                                                              ["--no-wait"])
        if given:
            raise SpecError(f"{', '.join(given)}: only with --shards N (sharded preparation)")
        return prepared(prepare(config, progress))
    if config.format == "preference":
        raise SpecError("--shards: --format preference is prepared in one process; leave --shards out")
    from llamajobs.data import sharded_prepare

    cluster_config = sharded_prepare.cluster_config(shards, wait=wait, **sharding)
    return prepared(sharded_prepare.prepare_sharded(config, cluster_config, progress, on_submit=on_submit))
