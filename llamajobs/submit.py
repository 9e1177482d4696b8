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
from llamajobs.errors import Failure
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


class NodeLauncher(submitit.helpers.Checkpointable):
    """What submitit runs on each node: launch.sh under torchrun, USR2 kept away from torchrun.

    torchrun does not handle USR2 (it would die on submitit's timeout signal); an ignored
    disposition survives exec, so torchrun and its workers never see it.
    """

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir

    def __call__(self) -> str:
        env = dict(os.environ)
        if "SLURM_JOB_ID" not in env:
            env["LLAMAJOBS_PORT"] = str(free_port())
        launch = Path(self.run_dir) / "launch.sh"
        process = subprocess.Popen(
            ["bash", str(launch)], env=env,
            preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN),
        )
        code = process.wait()
        if code != 0:
            raise RuntimeError(f"{launch} exited with code {code}; worker logs under {Path(self.run_dir) / 'logs'}")
        return "finished"


@contextlib.contextmanager
def _detached_stdio() -> Iterator[None]:
    """Start the local controller without our stdio: it outlives this CLI, and a caller reading
    our output through a pipe would otherwise wait for the whole job."""
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


def make_executor(spec: JobSpec, site: Site, folder: Path) -> submitit.Executor:
    if spec.cluster in ("local", "debug"):
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=spec.time_minutes or LOCAL_DEFAULT_MINUTES, tasks_per_node=1,
                                   gpus_per_node=0)
        return executor
    raise SubmitError(f"--cluster {spec.cluster}: submission to SLURM is not built yet; use --cluster local")


@dataclass(frozen=True, slots=True)
class Submission:
    job: Job
    spec: JobSpec


def submit(spec: JobSpec, site: Site, runs_dir: Path) -> Submission:
    """Allocate, render, submit, register; on failure nothing is left registered or half-written."""
    job_id = registry.claim_id(runs_dir)
    run_dir = runs_dir / f"{job_id}-{spec.run_name}"
    staging = runs_dir / f".staging-{job_id}"
    try:
        render.render(spec, site, staging, run_dir=str(run_dir))
        os.rename(staging, run_dir)
        executor = make_executor(spec, site, run_dir / "submitit")
        if spec.cluster == "slurm":
            cluster_job = executor.submit(NodeLauncher(str(run_dir)))
        else:
            with _detached_stdio():
                cluster_job = executor.submit(NodeLauncher(str(run_dir)))
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
    reg = registry.Registry(runs_dir)
    reg.add(job)
    reg.close()
    return Submission(job=job, spec=spec)
