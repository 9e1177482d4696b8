"""Submission: a run dir allocated and rendered, a submitit executor, the node launcher it runs.

The node launcher runs once per node (one SLURM task per node; the local cluster has one node) and
execs the rendered launch.sh, which starts torchrun. The local cluster is submitit's LocalExecutor.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import submitit

from llamajobs import events, registry, render
from llamajobs.control import request_stop
from llamajobs.monitor import exited
from llamajobs.errors import Failure, SpecError
from llamajobs.registry import Job
from llamajobs.site import Site
from llamajobs.spec import JobSpec

# The local cluster has no time limit of its own; submitit's default (2 minutes) would kill the run.
LOCAL_DEFAULT_MINUTES = 7 * 24 * 60


class SubmitError(Failure):
    """The cluster refused or failed the submission; nothing was registered."""


def detect_cluster() -> str:
    """slurm when a controller answers `scontrol ping`, else the local cluster."""
    try:
        out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "local"
    return "slurm" if out.returncode == 0 and "UP" in out.stdout else "local"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Seconds the node launcher waits for the workers to save and exit once it asked them to stop; the
# signal delay (signal_delay_s) leaves this much room before the time limit.
STOP_MARGIN_S = 30


class NodeLauncher(submitit.helpers.Checkpointable):
    """What submitit runs on each node: launch.sh under torchrun, USR2 kept away from torchrun.

    torchrun does not handle USR2 (it would die on submitit's timeout signal); an ignored
    disposition survives exec, so torchrun and its workers never see it. On node 0, submitit calls
    checkpoint() on that signal: it asks the workers to stop at a step boundary, waits until they
    saved, and returns itself for the requeue; the requeued job resumes from `latest`.
    """

    def __init__(self, run_dir: str, stop_wait_s: float = 600.0) -> None:
        self.run_dir = run_dir
        self.stop_wait_s = stop_wait_s
        self._process: subprocess.Popen | None = None

    def __call__(self) -> str:
        env = dict(os.environ)
        if "SLURM_JOB_ID" in env:
            # submitit parses the node list (gpu[003-004,010]) here, on the compute node.
            env["LLAMAJOBS_HOSTS"] = " ".join(submitit.JobEnvironment().hostnames)
        else:
            env["LLAMAJOBS_PORT"] = str(free_port())
        launch = Path(self.run_dir) / "launch.sh"
        self._process = subprocess.Popen(
            ["bash", str(launch)], env=env,
            preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN),
        )
        code = self._process.wait()
        if code != 0:
            raise RuntimeError(f"{launch} exited with code {code}; worker logs under {Path(self.run_dir) / 'logs'}")
        return "finished"

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        run_dir = Path(self.run_dir)
        request_stop(run_dir, "signal")
        deadline = time.time() + self.stop_wait_s
        # Not Popen.wait(): this runs in a signal handler that interrupted __call__'s wait(), which
        # holds the Popen's wait lock, so a nested wait() would only time out. The exited launch
        # shows as a zombie until __call__ reaps it. Past the deadline the requeue goes on anyway:
        # the last periodic checkpoint holds.
        while self._process is not None and time.time() < deadline and not exited(self._process.pid):
            time.sleep(0.2)
        latest = (run_dir / "checkpoints" / "latest")
        events.record(run_dir, "requeued", latest=latest.read_text().strip() if latest.exists() else None,
                      hosts=os.environ.get("SLURM_JOB_NODELIST", "localhost"))
        return submitit.helpers.DelayedSubmission(NodeLauncher(self.run_dir, self.stop_wait_s))

    def __getstate__(self) -> dict:
        return {"run_dir": self.run_dir, "stop_wait_s": self.stop_wait_s, "_process": None}


def signal_delay_s(spec: JobSpec, write_bytes_per_s: float = 1e9) -> int:
    """How long before the time limit SLURM signals: time to save a checkpoint, doubled, plus the
    margin for the workers to reach a step boundary. A 7B full checkpoint (weights and Adam in
    fp32, ~16 bytes/param = 108 GB) needs minutes, not submitit's default 90 s."""
    trained = spec.shape.params if spec.mode == "full" else 0.02 * spec.shape.params
    return int(max(120, 2 * 16 * trained / write_bytes_per_s + 2 * STOP_MARGIN_S))


@contextlib.contextmanager
def _detached_stdio() -> Iterator[None]:
    """Submit without our stdio. The local controller outlives this CLI, and a caller reading our
    output through a pipe would otherwise wait for the whole job; sbatch's own error lines would
    come out twice (submitit puts them in the exception we report)."""
    saved = [os.dup(fd) for fd in (0, 1, 2)]
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in zip((0, 1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def partition_time_limit(partition: str | None) -> int:
    """The partition's MaxTime in minutes (0 when unlimited), for a spec that names no --time."""
    from llamajobs.spec import parse_slurm_time

    command = ["scontrol", "show", "partition"] + ([partition] if partition else [])
    try:
        text = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise SubmitError(f"cannot read the time limit of partition {partition or '(default)'}: {e}; "
                          f"give --time") from None
    blocks = text.split("\n\n")
    block = next((b for b in blocks if partition is None and "Default=YES" in b), blocks[0])
    limit = next((w.split("=", 1)[1] for w in block.split() if w.startswith("MaxTime=")), "UNLIMITED")
    return 0 if limit in ("UNLIMITED", "INFINITE") else parse_slurm_time(limit)


# When one node's launcher fails, srun ends the others' at once: a rank hung outside any collective
# (so no collective timeout fires) would otherwise hold its node until the time limit.
KILL_ON_BAD_EXIT = ("--kill-on-bad-exit=1",)


def make_executor(spec: JobSpec, site: Site, folder: Path, dependency: str | None = None) -> submitit.Executor:
    if spec.cluster in ("local", "debug"):
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=spec.max_requeues)
        executor.update_parameters(timeout_min=spec.time_minutes or LOCAL_DEFAULT_MINUTES, tasks_per_node=1,
                                   gpus_per_node=0, signal_delay_s=signal_delay_s(spec))
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=spec.max_requeues)
    options = {
        "job_name": spec.run_name, "nodes": spec.nodes, "ntasks_per_node": 1,
        "time": spec.time_minutes if spec.time else partition_time_limit(spec.partition),
        "partition": spec.partition, "account": spec.account, "qos": spec.qos, "constraint": spec.constraint,
        "exclude": spec.exclude, "mail_user": spec.mail_user, "mail_type": spec.mail_type,
        "exclusive": spec.exclusive or None, "dependency": dependency, "cpus_per_task": spec.cpus_per_task,
        "mem": spec.mem_per_node, "setup": list(site.setup) or None, "srun_args": [*KILL_ON_BAD_EXIT, *site.srun_args],
        "gres": site.gres.format(gpus=spec.gpus_per_node) if site.gres and spec.device != "cpu" else None,
        "stderr_to_stdout": False, "signal_delay_s": signal_delay_s(spec),
        "additional_parameters": {"hold": True} if spec.hold else None,
    }
    executor.update_parameters(**{k: v for k, v in options.items() if v is not None})
    if site.python:
        executor.python = site.python
    return executor


def dependency_on(after: tuple[str, ...], reg: registry.Registry) -> str | None:
    """--after names llamajobs ids; SLURM wants its own: afterok:ID:ID."""
    if not after:
        return None
    cluster_ids = []
    for value in after:
        job = reg.get(int(value)) if value.isdigit() else None
        if job is None or job.cluster != "slurm":
            raise SpecError(f"--after {value}: not a SLURM job known to llamajobs")
        cluster_ids.append(job.cluster_job_id)
    return "afterok:" + ":".join(cluster_ids)


def dry_run(spec: JobSpec, site: Site) -> tuple[Path, str | None]:
    """Render into a new temporary directory; on SLURM also ask `sbatch --test-only` for its verdict."""
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="llamajobs-dry-run-"))
    render.render(spec, site, folder)
    if spec.cluster != "slurm":
        return folder, None
    result = subprocess.run(["sbatch", "--test-only", str(folder / "job.sbatch")], capture_output=True, text=True)
    verdict = (result.stderr or result.stdout).strip().splitlines()
    return folder, " ".join(verdict) or f"exit code {result.returncode}"


@dataclass(frozen=True, slots=True)
class Submission:
    job: Job
    spec: JobSpec


def submit(spec: JobSpec, site: Site, runs_dir: Path) -> Submission:
    """Allocate, render, submit, register; on failure nothing is left registered or half-written."""
    reg = registry.Registry(runs_dir)
    dependency = dependency_on(spec.after, reg)
    os.umask(0o022)  # the run dir and what submitit writes into it are not world-writable
    job_id = registry.claim_id(runs_dir)
    run_dir = runs_dir / f"{job_id}-{spec.run_name}"
    staging = runs_dir / f".staging-{job_id}"
    try:
        render.render(spec, site, staging, run_dir=str(run_dir))
        os.rename(staging, run_dir)
        executor = make_executor(spec, site, run_dir / "submitit", dependency)
        launcher = NodeLauncher(str(run_dir), stop_wait_s=max(60, signal_delay_s(spec) - STOP_MARGIN_S))
        with _detached_stdio():
            cluster_job = executor.submit(launcher)
        job = Job(id=job_id, name=spec.run_name, run_dir=run_dir, cluster=spec.cluster,
                  cluster_job_id=str(cluster_job.job_id), submitted_at=time.time())
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        registry.release_id(runs_dir, job_id)
        if isinstance(e, (SubmitError, KeyboardInterrupt)):
            raise
        raise SubmitError(f"submission failed: {e}") from e
    registry.write_job_file(job)
    events.record(run_dir, "submitted", cluster=job.cluster, cluster_job_id=job.cluster_job_id)
    reg.add(job)
    reg.close()
    return Submission(job=job, spec=spec)
