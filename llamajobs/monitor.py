"""Job state and metrics -> status rows: what `llamajobs status` shows and `--json` prints."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from llamajobs import events
from llamajobs.errors import Failure
from llamajobs.registry import Job
from llamajobs.spec import JobSpec

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY"}
# A running job is STALLED when its last metric is older than this many of its own step times,
# and never sooner than the floor (a step of 7B at large batch can take minutes).
STALL_STEP_FACTOR = 10
STALL_FLOOR_S = 600.0
# `status JOB` warns when waiting for batches takes more than this share of the step time.
SLOW_INPUT_FRAC = 0.1
# How gloo and NCCL say that a collective waited out its timeout: the rank that reports it is the
# one that waited, not the one that stopped.
COLLECTIVE_TIMEOUTS = ("Timed out waiting", "collective operation timeout")


def collective_timeout_hint(error: str | None) -> str | None:
    """What a collective timeout means, when the first error is one."""
    if error is None or not any(text in error for text in COLLECTIVE_TIMEOUTS):
        return None
    return ("a collective timed out: this rank waited --collective-timeout-minutes for a rank that stopped "
            "answering (hung, or its node died); that rank's log is the one that ends earliest")


@dataclass(slots=True)
class Row:
    id: int
    name: str
    cluster: str
    cluster_job_id: str
    state: str
    nodes: int
    gpus_per_node: int
    procs_per_node: int
    size: str
    mode: str
    strategy: str
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
    problem: str | None = None  # what is wrong with a damaged run dir (unreadable, bad spec, truncated metrics)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_metrics(run_dir: Path, tail_bytes: int | None = 65536) -> list[dict[str, Any]]:
    """metrics.jsonl, or only its last lines; a line torn by a writer still writing is skipped."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    with open(path, "rb") as f:
        if tail_bytes is not None:
            f.seek(max(0, path.stat().st_size - tail_bytes))
        lines = f.read().decode(errors="replace").splitlines()
    if tail_bytes is not None and lines and path.stat().st_size > tail_bytes:
        lines = lines[1:]  # the first line of a tail is usually cut
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# --- the local cluster: a controller process per job, recorded by pid ---

def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields after the command name


def exited(pid: int) -> bool:
    """Gone, or a zombie (dead, waiting to be reaped) or dead-but-listed."""
    stat = _proc_stat(pid)
    return stat is None or stat[0] in "ZX"


def is_local_controller(pid: int) -> bool:
    if exited(pid):
        return False
    return b"submitit.local._local" in cmdline(pid)


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))):
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_local(pid: int, grace_s: float = 5.0) -> None:
    """Stop a local job's controller and everything under it (launcher, torchrun, workers)."""
    if not is_local_controller(pid):
        return
    tree = [pid] + descendants(pid)
    for p in tree:
        with_signal(p, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and not all(exited(p) for p in tree):
        time.sleep(0.1)
    for p in tree:
        with_signal(p, signal.SIGKILL)


def with_signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def signal_launcher(job: Job) -> None:
    """Send the node launcher of node 0 submitit's timeout signal (USR2): it checkpoints and requeues."""
    if job.cluster == "slurm":
        result = subprocess.run(["scancel", "--signal=USR2", job.cluster_job_id], capture_output=True, text=True)
        if result.returncode != 0:
            raise Failure(f"scancel --signal=USR2 {job.cluster_job_id} failed: {result.stderr.strip()}")
        return
    tasks = [p for p in descendants(int(job.cluster_job_id)) if b"submitit.core._submit" in cmdline(p)]
    if not tasks:
        raise Failure(f"job {job.id}: its local task process is gone")
    with_signal(tasks[0], signal.SIGUSR2)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def local_result(job: Job) -> tuple[str, Any] | None:
    """submitit's result pickle of the local job: ("success", value) or ("error", traceback)."""
    path = job.run_dir / "submitit" / f"{job.cluster_job_id}_0_result.pkl"
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except (OSError, EOFError, pickle.UnpicklingError):
        return None


def local_state(job: Job, history: list[dict[str, Any]]) -> str:
    if any(e["event"] == "cancelled" for e in history):
        return "CANCELLED"
    if is_local_controller(int(job.cluster_job_id)):
        return "RUNNING"
    result = local_result(job)
    if result is not None:
        return "COMPLETED" if result[0] == "success" else "FAILED"
    return "COMPLETED" if any(e["event"] == "finished" for e in history) else "FAILED"


# --- SLURM: one sacct call for all jobs, squeue for what accounting has not seen yet ---

SLURM_STATES = {"PENDING", "RUNNING", "COMPLETING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED",
                "REQUEUED", "NODE_FAIL", "OUT_OF_MEMORY", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED",
                "RESIZING", "DEADLINE", "BOOT_FAIL", "CONFIGURING", "STOPPED", "SIGNALING"}


def _state_word(text: str) -> str:
    word = text.split()[0].rstrip("+") if text.strip() else "UNKNOWN"  # "CANCELLED by 0", "OUT_OF_ME+"
    if word == "OUT_OF_ME":
        return "OUT_OF_MEMORY"
    return word if word in SLURM_STATES else "UNKNOWN"


def _run(command: list[str]) -> str | None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None


def slurm_states(cluster_job_ids: list[str]) -> dict[str, str]:
    if not cluster_job_ids:
        return {}
    ids = ",".join(cluster_job_ids)
    states: dict[str, str] = {}
    for line in (_run(["sacct", "-n", "-P", "-X", "-j", ids, "-o", "JobIDRaw,State"]) or "").splitlines():
        job_id, _, state = line.partition("|")
        states[job_id.strip()] = _state_word(state)
    missing = [i for i in cluster_job_ids if i not in states]
    if missing:
        for line in (_run(["squeue", "-h", "-j", ",".join(missing), "-o", "%i %T"]) or "").splitlines():
            job_id, _, state = line.partition(" ")
            states[job_id] = _state_word(state)
    return states


def cluster_states(jobs: list[Job]) -> dict[int, str]:
    """Every job's state from its cluster, with one sacct call for all the SLURM jobs."""
    slurm = slurm_states([j.cluster_job_id for j in jobs if j.cluster == "slurm"])
    states = {}
    for job in jobs:
        if job.cluster == "slurm":
            states[job.id] = slurm.get(job.cluster_job_id, "UNKNOWN")
        else:
            states[job.id] = local_state(job, events.read(job.run_dir))
    return states


# --- rows ---

def recent_step_time(metrics: list[dict[str, Any]], window: int = 20) -> float | None:
    """Median step time of the recent logged steps, the first (warm-up, compile) left out."""
    return recent_median(metrics, "step_time_s", window)


def recent_median(metrics: list[dict[str, Any]], key: str, window: int = 20) -> float | None:
    """Median of a metric over the recent logged steps, the first left out (as for the step time)."""
    values = [m[key] for m in metrics if m.get(key) is not None and m.get("step", 0) > 1][-window:]
    return statistics.median(values) if values else None


def stall_threshold(step_time: float | None) -> float:
    configured = os.environ.get("LLAMAJOBS_STALL_S")
    if configured:
        return float(configured)
    return max(STALL_FLOOR_S, STALL_STEP_FACTOR * (step_time or 0.0))


def rows(jobs: list[Job], now: float | None = None, finished: dict[int, dict] | None = None) -> list[Row]:
    """Status rows; jobs in `finished` (rows cached when they ended) cost no file read or cluster query."""
    finished = finished or {}
    live = [job for job in jobs if job.id not in finished]
    states = cluster_states(live)
    computed = {job.id: row(job, states[job.id], now) for job in live}
    return [Row(**finished[job.id]) if job.id in finished else computed[job.id] for job in jobs]


def row(job: Job, state: str | None = None, now: float | None = None) -> Row:
    """One job's status: its cluster state (looked up unless given), its metrics, its ETA."""
    now = now or time.time()
    spec = JobSpec.load(job.run_dir / "spec.json")
    history = events.read(job.run_dir)
    metrics = read_metrics(job.run_dir)
    last = metrics[-1] if metrics else {}
    state = state or cluster_states([job])[job.id]
    step_time = recent_step_time(metrics)
    age = now - last["time"] if last.get("time") else None
    if state == "RUNNING" and age is not None and age > stall_threshold(step_time):
        state = "STALLED"
    eta = None
    if state in ("RUNNING", "STALLED") and step_time and last.get("total_steps"):
        eta = max(0.0, (last["total_steps"] - last["step"]) * step_time - (age or 0.0))
    error = None
    if state in ("FAILED", "OUT_OF_MEMORY") and (first := first_error(job)) is not None:
        error = f"rank {first.rank} on {first.host}: {first.message} ({first.log})"
        if is_out_of_memory(first):
            state = "OUT_OF_MEMORY"
    saves = [e for e in history if e["event"] == "checkpointed"]
    started = next((e["time"] for e in history if e["event"] == "started"), None)
    ended = next((e["time"] for e in reversed(history) if e["event"] == "finished"), None)
    if state not in TERMINAL:
        ended = now
    elif ended is None:
        ended = last.get("time")
    found = Row(
        id=job.id, name=job.name, cluster=job.cluster, cluster_job_id=job.cluster_job_id, state=state,
        nodes=spec.nodes, gpus_per_node=spec.gpus_per_node, procs_per_node=spec.planned_procs_per_node,
        size=spec.size, mode=spec.mode,
        strategy=spec.strategy, step=last.get("step"), total_steps=last.get("total_steps"),
        epoch=last.get("epoch"), loss=last.get("loss"), tokens_per_s=last.get("tokens_per_s"),
        tokens_per_s_per_gpu=last.get("tokens_per_s_per_gpu"), mfu=last.get("mfu"), peak=last.get("peak"),
        eta_s=eta, elapsed_s=(ended - started) if started and ended else None, last_metric_age_s=age,
        run_dir=str(job.run_dir), error=error,
        data_wait_s=recent_median(metrics, "data_wait_s"), data_wait_frac=recent_median(metrics, "data_wait_frac"),
        checkpoint_s=saves[-1].get("seconds") if saves else None, checkpoints=len(saves), mem_gib=last.get("mem_gib"),
    )
    if spec.evaluation is not None:  # no metrics: what it scores, and its accuracy once eval.json is there
        result = eval_result(job.run_dir) or {}
        found = replace(found, kind="eval", size=Path(spec.evaluation.model).name, mode="eval",
                        strategy=spec.evaluation.task, accuracy=result.get("accuracy"))
    return found


def eval_result(run_dir: Path) -> dict[str, Any] | None:
    """An eval job's result (what `eval --json` prints), written by its rank 0 at the end."""
    try:
        return json.loads((run_dir / "eval.json").read_text())
    except (OSError, ValueError):
        return None


def log_files(job: Job) -> list[Path]:
    """Every log of the job: submitit's per-node logs, then the per-rank worker logs."""
    submitit_logs = sorted((job.run_dir / "submitit").glob("*_log.*"))
    rank_logs = sorted((job.run_dir / "logs").glob("attempt-*/node-*/**/std*.log"))
    return submitit_logs + rank_logs


def _rank_dirs(job: Job) -> list[tuple[int, Path, Path]]:
    """(global rank, the rank's torchrun log dir, its node dir) for every attempt, oldest first.
    torchrun's layout under our per-attempt, per-node folder is <run id>/attempt_0/<local rank>/;
    ranks are node-major."""
    found = []
    for attempt in sorted((job.run_dir / "logs").glob("attempt-*"), key=lambda p: int(p.name.split("-")[1])):
        nodes = sorted(attempt.glob("node-*"), key=lambda p: int(p.name.split("-")[1]))
        local_dirs = [sorted({p.parent for p in node.glob("*/attempt_*/*/std*.log")}, key=lambda p: int(p.name))
                      for node in nodes]
        procs = max((len(d) for d in local_dirs), default=0)
        for node_rank, (node, dirs) in enumerate(zip(nodes, local_dirs)):
            found += [(node_rank * procs + int(local.name), local, node) for local in dirs]
    return found


def rank_logs(job: Job) -> dict[int, list[Path]]:
    """Each global rank's logs, oldest attempt first."""
    found: dict[int, list[Path]] = {}
    for rank, local, _ in _rank_dirs(job):
        found.setdefault(rank, []).extend(sorted(local.glob("std*.log")))
    return found


@dataclass(frozen=True, slots=True)
class FirstError:
    rank: int
    host: str
    message: str
    log: Path
    time: float


def first_error(job: Job) -> FirstError | None:
    """The earliest error a rank reported (torchrun's error.json, written by the worker's @record),
    or the earliest death without one that torchrun saw (a rank killed, or crashed in native code):
    later errors are usually other ranks noticing that one died. Times are whole seconds; at the same
    second a death without a Python error comes first (the others' errors are their reaction to it)."""
    found = []  # (time, 1 for a Python error or 0 for a death without one, rank, the error)
    newest: dict[int, tuple[Path, Path]] = {}  # rank -> (its log dir, its node dir), newest attempt
    for rank, local, node in _rank_dirs(job):
        newest[rank] = (local, node)
        try:
            info = json.loads((local / "error.json").read_text())["message"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        error = FirstError(rank=rank, host=_host(node), message=str(info.get("message", "")).strip(),
                           log=local / "stderr.log", time=float(info.get("extraInfo", {}).get("timestamp", 0)))
        found.append((error.time, 1, rank, error))
    for death in torchrun_deaths(job):
        if death.rank in newest:
            local, node = newest[death.rank]
            death = replace(death, host=_host(node, death.host), log=local / "stderr.log")
        found.append((death.time, 0, death.rank, death))
    return min(found, key=lambda f: f[:3], default=(None,) * 4)[3]


# torchrun's summary of a failed launch, at the end of its output (the node launcher's log):
#   Root Cause (first observed failure):
#   [0]:
#     time      : 2026-11-28_02:21:45
#     host      : gpu003
#     rank      : 1 (local_rank: 1)
#     exitcode  : -9 (pid: 9638)
#     error_file: <N/A>
ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):\s*\[\d+\]:\s*time\s*:\s*(?P<time>\S+)\s*"
                        r"host\s*:\s*(?P<host>\S+)\s*rank\s*:\s*(?P<rank>\d+)[^\n]*\s*"
                        r"exitcode\s*:\s*(?P<code>-?\d+)[^\n]*\s*error_file:\s*(?P<file>\S+)")


def torchrun_deaths(job: Job, tail_bytes: int = 65536) -> list[FirstError]:
    """The ranks whose death torchrun reported as a node's first failure with no error file: they
    left no Python error (killed by a signal, os._exit, a crash in native code). Ranks that did
    leave one are found through their error.json."""
    deaths = []
    for path in sorted((job.run_dir / "submitit").glob("*_log.err")):
        try:
            with open(path, "rb") as f:
                f.seek(max(0, path.stat().st_size - tail_bytes))
                text = f.read().decode(errors="replace")
        except OSError:
            continue
        for match in ROOT_CAUSE.finditer(text):
            if match["file"] != "<N/A>":
                continue
            code = int(match["code"])
            how = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                   else f"exited with code {code}")
            try:
                when = time.mktime(time.strptime(match["time"], "%Y-%m-%d_%H:%M:%S"))
            except ValueError:
                when = path.stat().st_mtime
            deaths.append(FirstError(rank=int(match["rank"]), host=match["host"], log=path, time=when,
                                     message=f"the process {how} without a Python error (killed, out of host "
                                             f"memory, or crashed in native code)"))
    return deaths


def _host(node: Path, default: str = "?") -> str:
    host_file = node / "host"
    return host_file.read_text().strip() if host_file.exists() else default


OOM_MARKERS = ("OutOfMemoryError", "CUDA out of memory")


def is_out_of_memory(error: FirstError | None) -> bool:
    return error is not None and any(m in error.message for m in OOM_MARKERS)


def traceback_log(job: Job) -> Path | None:
    """The log that holds the root-cause traceback: the first failing rank's, else any worker log
    with a traceback, before submitit's."""
    if (error := first_error(job)) is not None:
        return error.log
    for path in sorted(log_files(job), key=lambda p: "submitit" in p.parts):
        try:
            if "Traceback (most recent call last)" in path.read_text(errors="replace"):
                return path
        except OSError:
            continue
    return None
