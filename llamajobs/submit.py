"""Submission: a run dir allocated and rendered, the allocation asked of the cluster, the node
launcher it runs, the job registered.

The node launcher runs once per node (one SLURM task per node; the local cluster has one node) and
execs the rendered launch.sh, which starts torchrun. Executors come from the cluster layer.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from llamajobs import cluster, events, registry, render
from llamajobs.cluster import Allocation, SubmitError
from llamajobs.cluster.local import exited
from llamajobs.cluster.slurm import Partition, SlurmBackend
from llamajobs.control import request_stop
from llamajobs.errors import SpecError
from llamajobs.registry import Job
from llamajobs.site import Site
from llamajobs.spec import JobSpec


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


def save_seconds(spec: JobSpec, write_bytes_per_s: float = 1e9) -> float:
    """A checkpoint's predicted save time: weights and Adam in fp32, ~16 bytes per trained parameter
    (a 7B full checkpoint is ~108 GB: minutes, not seconds)."""
    trained = 0.02 * spec.shape.params if spec.mode_info.frozen_base else spec.shape.params
    return 16 * trained / write_bytes_per_s


def signal_delay_s(spec: JobSpec) -> int:
    """How long before the time limit SLURM signals: time to save a checkpoint, doubled, plus the
    margin for the workers to reach a step boundary; never below submitit's default 90 s."""
    return int(max(120, 2 * save_seconds(spec) + 2 * STOP_MARGIN_S))


def grace_warning(spec: JobSpec, partition: Partition) -> str | None:
    """Preemption sends SIGTERM, then SIGKILL after the partition's GraceTime: a warning when the
    predicted save does not fit in between (the job then resumes from its last periodic checkpoint)."""
    needed = save_seconds(spec) + STOP_MARGIN_S
    if partition.preempt_mode.upper().startswith("OFF") or partition.grace_s >= needed:
        return None
    return (f"partition {partition.name} preempts with GraceTime {partition.grace_s} s, less than the ~{needed:.0f} s "
            f"this job needs to save a checkpoint; a preempted run resumes from its last periodic checkpoint "
            f"(--checkpoint-every-minutes sets how old that may be)")


# When one node's launcher fails, srun ends the others' at once: a rank hung outside any collective
# (so no collective timeout fires) would otherwise hold its node until the time limit.
KILL_ON_BAD_EXIT = ("--kill-on-bad-exit=1",)


def allocation(spec: JobSpec, site: Site, dependency: str | None = None) -> Allocation:
    """What the job asks of its cluster: its nodes, time, resources and the site's setup lines."""
    return Allocation(
        name=spec.run_name, nodes=spec.nodes, minutes=spec.time_minutes, cpus_per_task=spec.cpus_per_task,
        gres=site.gres.format(gpus=spec.gpus_per_node) if site.gres and spec.device != "cpu" else None,
        mem=spec.mem_per_node, partition=spec.partition, account=spec.account, qos=spec.qos,
        constraint=spec.constraint, exclude=spec.exclude, exclusive=spec.exclusive, mail_user=spec.mail_user,
        mail_type=spec.mail_type, dependency=dependency, hold=spec.hold, signal_delay_s=signal_delay_s(spec),
        max_requeues=spec.max_requeues, setup=site.setup, srun_args=(*KILL_ON_BAD_EXIT, *site.srun_args),
        python=site.python)


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
    folder = Path(tempfile.mkdtemp(prefix="llamajobs-dry-run-"))
    render.render(spec, site, folder)
    if spec.cluster != "slurm":
        return folder, None
    return folder, SlurmBackend().test_only(folder / "job.sbatch")


@dataclass(frozen=True, slots=True)
class Submission:
    job: Job
    spec: JobSpec


def submit(spec: JobSpec, site: Site, runs_dir: Path) -> Submission:
    """Allocate, render, submit, register; on failure nothing is left registered or half-written,
    and nothing is removed that this call did not create."""
    backend = cluster.backend(spec.cluster)
    reg = registry.Registry(runs_dir)
    dependency = dependency_on(spec.after, reg)
    os.umask(0o022)  # the run dir and what submitit writes into it are not world-writable
    job_id = registry.claim_id(runs_dir)
    run_dir = runs_dir / f"{job_id}-{spec.run_name}"
    staging = runs_dir / f".staging-{job_id}"
    made: list[Path] = []  # what this call created: the only paths it may remove
    try:
        staging.mkdir()
        made.append(staging)
        render.render(spec, site, staging, run_dir=str(run_dir))
        if run_dir.exists():  # the claim makes this unreachable for llamajobs' own submits
            raise SubmitError(f"{run_dir} exists already; nothing was submitted")
        os.rename(staging, run_dir)
        made[-1] = run_dir
        executor = backend.executor(allocation(spec, site, dependency), run_dir / "submitit")
        launcher = NodeLauncher(str(run_dir), stop_wait_s=max(60, signal_delay_s(spec) - STOP_MARGIN_S))
        with cluster.detached_stdio():
            cluster_job = executor.submit(launcher)
        job = Job(id=job_id, name=spec.run_name, run_dir=run_dir, cluster=spec.cluster,
                  cluster_job_id=str(cluster_job.job_id), submitted_at=time.time())
    except BaseException as e:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)
        registry.release_id(runs_dir, job_id)
        if isinstance(e, (SubmitError, SpecError, KeyboardInterrupt)):
            raise
        raise SubmitError(f"submission failed: {e}") from e
    registry.write_job_file(job)
    events.record(run_dir, "submitted", cluster=job.cluster, cluster_job_id=job.cluster_job_id)
    reg.add(job)
    reg.close()
    return Submission(job=job, spec=spec)
