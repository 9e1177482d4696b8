"""The local cluster: submitit's LocalExecutor, whose controller process (recorded by pid as the job's
cluster id) runs the task; states, cancel and signals through /proc process trees."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llamajobs import catalog, events, files
from llamajobs.cluster.base import TERMINAL, UNKNOWN, Allocation, Backend, Handle
from llamajobs.errors import Failure
from llamajobs.registry import Job

# The local cluster has no time limit of its own; submitit's default (2 minutes) would kill the run.
DEFAULT_MINUTES = 7 * 24 * 60
# How a submitit local controller and the task it starts show in /proc/PID/cmdline.
CONTROLLER = b"submitit.local._local"
TASK = b"submitit.core._submit"
ENDED = TERMINAL | {UNKNOWN}


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # fields after the command name, which may hold spaces


def exited(pid: int) -> bool:
    """Gone, or a zombie (dead, waiting to be reaped) or dead-but-listed."""
    stat = _proc_stat(pid)
    return stat is None or stat[0] in "ZX"


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def is_controller(pid: int, folder: Path | None = None) -> bool:
    """A live submitit local controller (of jobs in `folder`, when given): not a recycled pid."""
    if exited(pid):
        return False
    command = cmdline(pid)
    return CONTROLLER in command and (folder is None or str(folder).encode() in command)


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


def send(pid: int, sig: int) -> None:
    """Signal a process that may have exited meanwhile."""
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(pid: int, grace_s: float = 5.0) -> None:
    """SIGTERM the process and everything under it, SIGKILL what is left after grace_s."""
    tree = [pid] + descendants(pid)
    for p in tree:
        send(p, signal.SIGTERM)
    deadline = time.time() + grace_s
    while time.time() < deadline and not all(exited(p) for p in tree):
        time.sleep(0.1)
    for p in tree:
        if not exited(p):
            send(p, signal.SIGKILL)


def host_ram_gib() -> float | None:
    """This host's RAM (MemTotal), the local cluster's node; None when /proc cannot tell."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def host_gpus() -> int:
    """NVIDIA GPUs on this host, as `nvidia-smi -L` lists them (0 without the driver)."""
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(line.startswith("GPU") for line in listed.stdout.splitlines()) if listed.returncode == 0 else 0


def _pid(job: Job) -> int | None:
    return int(job.cluster_job_id) if job.cluster_job_id.isdigit() else None


RESULT_BYTES = 16 << 20  # the launcher returns a few bytes; submitit pickles its traceback on an error


def result(job: Job) -> tuple[str, Any] | None:
    """submitit's result pickle of the local job: ("success", value) or ("error", traceback)."""
    path = job.run_dir / "submitit" / f"{job.cluster_job_id}_0_result.pkl"
    try:  # (a FIFO or a device in its place is refused, not waited on or read without end)
        found = pickle.loads(files.read_bytes(path, RESULT_BYTES))
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ImportError, ValueError):
        return None
    return found if isinstance(found, tuple) and len(found) == 2 else None


def state(job: Job) -> str:
    """RUNNING while its controller lives; after that, what the job left: a cancel recorded by
    `llamajobs cancel`, submitit's result, or the worker's `finished` event."""
    pid = _pid(job)
    if pid is None:
        return UNKNOWN
    history = events.read(job.run_dir)
    if any(e["event"] == "cancelled" for e in history):
        return "CANCELLED"
    if is_controller(pid):
        waits = [e["event"] for e in history if e["event"] in ("waiting", "released")]
        return "PENDING" if waits and waits[-1] == "waiting" else "RUNNING"
    outcome = result(job)
    if outcome is not None:
        return "COMPLETED" if outcome[0] == "success" else "FAILED"
    return "COMPLETED" if any(e["event"] == "finished" for e in history) else "FAILED"


def hold(run_dir: str | Path, jobs: Sequence[Job]) -> None:
    """Mark a job as waiting for `jobs` (before it is submitted: it shows PENDING from the start,
    not RUNNING while its launcher starts), until its launcher is released by wait_ended."""
    events.record(run_dir, "waiting", on=[j.id for j in jobs])


def wait_ended(run_dir: str | Path, jobs: Sequence[Job], poll_s: float = 1.0) -> None:
    """The local cluster's dependency, run by the job's own launcher before it starts: wait until
    every one of `jobs` ended, however it ended (UNKNOWN too: a damaged job would never end)."""
    while any(state(j) not in ENDED for j in jobs):
        time.sleep(poll_s)
    events.record(run_dir, "released")


@dataclass(frozen=True, slots=True)
class LocalHandle:
    """A local job of an earlier command, by its controller's pid."""

    job_id: str
    folder: Path

    def done(self) -> bool:
        return not self.job_id.isdigit() or not is_controller(int(self.job_id), self.folder)


class LocalBackend(Backend):
    info = catalog.CLUSTER["local"]

    def executor(self, allocation: Allocation, folder: Path) -> Any:
        import submitit  # not at the top: `status` never loads it

        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=allocation.max_requeues)
        options = {"timeout_min": allocation.minutes or DEFAULT_MINUTES, "tasks_per_node": 1, "gpus_per_node": 0,
                   "signal_delay_s": allocation.signal_delay_s}
        executor.update_parameters(**{k: v for k, v in options.items() if v is not None})
        return executor

    def _states(self, jobs: Sequence[Job]) -> dict[int, str]:
        found = {}
        for job in jobs:
            try:
                found[job.id] = state(job)
            except OSError:  # its run dir is unreadable or gone: the row says so, the state is unknown
                continue
        return found

    def cancel(self, job: Job) -> None:
        pid = _pid(job)
        if pid is not None and is_controller(pid):
            kill_tree(pid)

    def signal_stop(self, job: Job) -> None:
        """USR2 to the task under the controller, as submitit's controller does near the time limit."""
        pid = _pid(job)
        tasks = [p for p in descendants(pid) if TASK in cmdline(p)] if pid is not None and is_controller(pid) else []
        if not tasks:
            raise Failure(f"job {job.id}: its local task process is gone")
        send(tasks[0], signal.SIGUSR2)

    def reattach(self, job_ids: Sequence[str], folder: Path) -> dict[str, Handle]:
        handles = {i: LocalHandle(i, folder) for i in job_ids}
        return {i: h for i, h in handles.items() if not h.done()}


class DebugBackend(LocalBackend):
    """The local cluster under another name, for quick debugging runs."""

    info = catalog.CLUSTER["debug"]
