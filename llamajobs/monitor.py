"""Job state and metrics -> status rows: what `llamajobs status` shows and `--json` prints.

A run dir's files are input from disk that anything may have damaged: reading one job never
raises. What cannot be read leaves its fields empty and names itself in the row's `problem`; every
other job, and what the cluster still knows of this one, is unaffected."""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from llamajobs import catalog, cluster, estimate, events, files, forensics, metrics
from llamajobs.cluster import TERMINAL
from llamajobs.metrics import MetricsRow
from llamajobs.registry import Job
from llamajobs.spec import JobSpec

# A running job is STALLED when its last metric is older than this many of its own step times,
# and never sooner than the floor (a step of 7B at large batch can take minutes).
STALL_STEP_FACTOR = 10
STALL_FLOOR_S = 600.0
# `status JOB` warns when waiting for batches takes more than this share of the step time.
SLOW_INPUT_FRAC = 0.1
# eval.json holds the scores and the choice counts (predictions are in their own file): a few KB.
EVAL_RESULT_BYTES = 1 << 20


@dataclass(slots=True)
class Row:
    id: int
    name: str
    cluster: str
    cluster_job_id: str
    state: str
    nodes: int | None  # these six are None when spec.json is damaged (then `problem` says so)
    gpus_per_node: int | None
    procs_per_node: int | None
    size: str | None
    mode: str | None
    strategy: str | None
    step: int | None
    total_steps: int | None
    epoch: float | None
    loss: float | None
    tokens_per_s: float | None
    tokens_per_s_per_gpu: float | None
    mfu: float | None
    peak: str | None
    eta_s: float | None
    elapsed_s: float | None
    last_metric_age_s: float | None
    run_dir: str
    error: str | None = None  # the first failing rank's error, for FAILED and OUT_OF_MEMORY jobs
    # Where step time goes besides compute (recent medians), and memory. Defaults: rows cached by
    # an older version lack them.
    data_wait_s: float | None = None  # host seconds per step waiting for the next batch
    data_wait_frac: float | None = None  # the same as a share of the step time
    checkpoint_s: float | None = None  # the last checkpoint's save time
    checkpoints: int = 0  # saved in this run, all attempts
    mem_gib: float | None = None  # peak per process: GPU memory allocated, or RSS on the CPU
    kind: str = "train"  # or "eval" (`llamajobs eval --cluster`): then mode is "eval" and strategy the task
    accuracy: float | None = None  # an eval job's, once it finished
    problem: str | None = None  # what is wrong with a damaged run dir (unreadable, bad spec, damaged metrics)
    val_loss: float | None = None  # the latest validation loss (None: no eval split, or none run yet)
    hub_id: str | None = None  # --model-path as a Hub id: the repository, and the commit it was pinned to
    hub_commit: str | None = None
    slow: str | None = None  # why the job is SLOW (slow_reason), else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def recent_step_time(rows: Sequence[MetricsRow], window: int = 20) -> float | None:
    """Median step time of the recent logged steps, the first (warm-up, compile) left out."""
    return recent_median(rows, "step_time_s", window)


def recent_median(rows: Sequence[MetricsRow], field: str, window: int = 20) -> float | None:
    """Median of a metric over the recent logged steps, the first left out (as for the step time)."""
    values = [getattr(m, field) for m in rows if m.step > 1][-window:]
    return statistics.median(values) if values else None


# A running job is SLOW when its measured tokens/s after warm-up is below this share of what the
# estimator predicts for its own plan (issue 31): something the plan does not know is holding it back.
SLOW_SHARE = 0.7


def slow_reason(spec: JobSpec | None, measured: Sequence[MetricsRow], history: Sequence[dict]) -> str | None:
    """Why a job is SLOW, or None: its steady throughput (warm-up steps and checkpoint pauses left out,
    as `estimate hours JOB` measures it) against the prediction for its plan on the GPU it ran on.
    Only for runs planned on GPUs the catalog knows, once a step past the warm-up was logged."""
    if spec is None or spec.evaluation is not None or not spec.plans_gpus or not measured:
        return None
    gpu = catalog.GPUS.get(measured[-1].peak)
    if gpu is None or not any(m.step > estimate.DEFAULT.warmup_steps for m in measured):
        return None
    steady = estimate.hours_from_metrics(list(measured), history)
    predicted = estimate.throughput(spec, gpu)["tokens_per_s"]
    if steady is None or not steady.tokens_per_s or steady.tokens_per_s >= SLOW_SHARE * predicted:
        return None
    got = steady.tokens_per_s
    return (f"{got:,.0f} tokens/s after warm-up, {got / predicted:.0%} of the {predicted:,.0f} predicted for its "
            f"plan on {gpu.name} (below {SLOW_SHARE:.0%})")


def stall_threshold(step_time: float | None) -> float:
    configured = os.environ.get("LLAMAJOBS_STALL_S")
    if configured:
        return float(configured)
    return max(STALL_FLOOR_S, STALL_STEP_FACTOR * (step_time or 0.0))


def rows(jobs: list[Job], now: float | None = None, finished: dict[int, dict] | None = None) -> list[Row]:
    """Status rows; jobs in `finished` (rows cached when they ended) cost no file read or cluster query."""
    finished = finished or {}
    cached = {i: r for i in finished if (r := _cached(finished[i])) is not None}
    live = [job for job in jobs if job.id not in cached]
    states = cluster.states(live)
    return [cached[job.id] if job.id in cached else row(job, states[job.id], now) for job in jobs]


def _cached(data: dict[str, Any]) -> Row | None:
    """A cached row, unless it is damaged or of a version whose fields differ."""
    try:
        found = Row(**data)
    except TypeError:
        return None
    return None if found.problem else found


@dataclass(slots=True)
class RunFiles:
    """What a run dir holds for its status row, and what could not be read of it."""

    spec: JobSpec | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    metrics: metrics.Metrics = field(default_factory=lambda: metrics.Metrics(rows=[]))
    problems: list[str] = field(default_factory=list)


def read_run_dir(job: Job) -> RunFiles:
    """spec.json, the events and metrics.jsonl of a job; never raises: damage goes to `problems`."""
    found = RunFiles(problems=[job.problem] if job.problem else [])

    def damage(what: str, e: Exception) -> None:
        found.problems.append(f"{what}: {e.strerror if isinstance(e, OSError) and e.strerror else e}")

    if not job.run_dir.is_dir():
        found.problems.append(f"run dir {job.run_dir} is gone")
        return found
    if not os.access(job.run_dir, os.R_OK | os.X_OK):
        found.problems.append(f"run dir {job.run_dir} is not readable by this user")
        return found
    try:
        found.spec = JobSpec.load(job.run_dir / "spec.json")
    except Exception as e:  # any damage: not JSON, wrong types, unreadable, or a rule it breaks now
        damage("spec.json", e)
    log = events.history(job.run_dir)
    found.history = log.events
    if log.bad_lines:
        found.problems.append(f"events: {_lines(log.bad_lines)}")
    found.problems.extend(log.unread)
    try:
        found.metrics = metrics.read(job.run_dir)
        if found.metrics.bad_lines:
            found.problems.append(f"{metrics.METRICS_FILE}: {_lines(found.metrics.bad_lines)}")
    except OSError as e:
        damage(metrics.METRICS_FILE, e)
    return found


SPEC_FIELDS = ("nodes", "gpus_per_node", "procs_per_node", "size", "mode", "strategy")
METRICS_FIELDS = ("step", "total_steps", "epoch", "loss", "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "peak",
                  "mem_gib")


def row(job: Job, state: str | None = None, now: float | None = None) -> Row:
    """One job's status: its cluster state (looked up unless given), its metrics, its ETA."""
    now = now or time.time()
    state = state or cluster.states([job])[job.id]
    files = read_run_dir(job)
    spec, history, measured = files.spec, files.history, files.metrics.rows
    evaluation = spec.evaluation if spec is not None else None  # an eval job: no metrics, an accuracy
    last = files.metrics.last
    step_time = recent_step_time(measured)
    age = now - last.time if last else None
    if state == "RUNNING" and age is not None and age > stall_threshold(step_time):
        state = "STALLED"
    eta = None
    if state in ("RUNNING", "STALLED") and step_time and last:
        to_come = validation_time_to_come(measured, last.step, last.total_steps, spec.eval_every_steps if spec else None)
        eta = max(0.0, (last.total_steps - last.step) * step_time + to_come - (age or 0.0))
    error = None
    if state in ("FAILED", "OUT_OF_MEMORY") and (first := forensics.first_error(job)) is not None:
        error = f"rank {first.rank} on {first.host}: {first.message} ({first.log})"
        if forensics.is_out_of_memory(first):
            state = "OUT_OF_MEMORY"
    saves = [e for e in history if e["event"] == "checkpointed"]
    started = next((e["time"] for e in history if e["event"] == "started"), None)
    ended = next((e["time"] for e in reversed(history) if e["event"] == "finished"), None)
    if state not in TERMINAL:
        ended = now
    elif ended is None:
        ended = last.time if last else None
    from_spec = dict.fromkeys(SPEC_FIELDS) if spec is None else {
        "nodes": spec.nodes, "gpus_per_node": spec.gpus_per_node, "procs_per_node": spec.planned_procs_per_node,
        "size": spec.size, "mode": spec.mode, "strategy": spec.strategy}
    if evaluation is not None:  # what it scores
        from_spec.update(size=Path(evaluation.model).name, mode="eval", strategy=evaluation.task)
    return Row(
        id=job.id, name=job.name, cluster=job.cluster, cluster_job_id=job.cluster_job_id, state=state,
        **from_spec, **{f: getattr(last, f) if last else None for f in METRICS_FIELDS},
        eta_s=eta, elapsed_s=(ended - started) if started and ended else None, last_metric_age_s=age,
        run_dir=str(job.run_dir), error=error,
        data_wait_s=recent_median(measured, "data_wait_s"), data_wait_frac=recent_median(measured, "data_wait_frac"),
        checkpoint_s=_number(saves[-1].get("seconds")) if saves else None, checkpoints=len(saves),
        kind="train" if evaluation is None else "eval",
        accuracy=None if evaluation is None else _number((eval_result(job.run_dir) or {}).get("accuracy")),
        problem="; ".join(files.problems) or None,
        val_loss=latest_val_loss(measured),
        hub_id=spec.hub_id if spec else None, hub_commit=spec.hub_commit if spec else None,
        slow=slow_reason(spec, measured, history) if state == "RUNNING" else None,
    )


def validations_after(step: int, total: int, every: int | None) -> int:
    """The validations still due after `step`: every `every` steps, and after the last one."""
    if step >= total:
        return 0
    periodic = total // every - step // every if every else 0
    return periodic + (0 if every and total % every == 0 else 1)


def validation_time_to_come(rows: Sequence[MetricsRow], step: int, total: int, every: int | None,
                            window: int = 5) -> float:
    """Seconds the validations still due will take, each at the median wall time of the recent ones
    (the rows that carry a val_loss). None measured yet (no eval split, or none run in the tail read): 0."""
    measured = [r.val_s for r in rows if r.val_loss is not None][-window:]
    return validations_after(step, total, every) * statistics.median(measured) if measured else 0.0


def latest_val_loss(rows: Sequence[MetricsRow]) -> float | None:
    """The validation loss of the last row that has one (in the tail of metrics.jsonl read)."""
    return next((r.val_loss for r in reversed(rows) if r.val_loss is not None), None)


def _lines(n: int) -> str:
    return f"{n} damaged line{'s' * (n > 1)}"


def _number(value: Any) -> float | None:
    """A finite number from a file, else None (also for an integer beyond float's range)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def eval_result(run_dir: Path) -> dict[str, Any] | None:
    """An eval job's result (what `eval --json` prints), written by its rank 0 at the end."""
    try:
        result = json.loads(files.read_bytes(run_dir / "eval.json", EVAL_RESULT_BYTES))
    except (OSError, ValueError, RecursionError):
        return None
    return result if isinstance(result, dict) else None
