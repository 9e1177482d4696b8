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
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import submitit

from llamajobs import cluster, events, registry, render
from llamajobs.cluster import Allocation, SubmitError
from llamajobs.cluster.local import hold, wait_ended
from llamajobs.cluster.slurm import Partition, SlurmBackend
from llamajobs.control import STOP_MARGIN_S, save_seconds, signal_delay_s, stop_wait_s
from llamajobs.errors import SpecError
from llamajobs.launcher import NodeRun
from llamajobs.registry import Job
from llamajobs.site import Site
from llamajobs.spec import JobSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeLauncher(submitit.helpers.Checkpointable):
    """What submitit runs on each node: launch.sh, shielded from the stop signals (llamajobs.launcher).

    submitit calls checkpoint() on node 0 when its timeout signal (USR2) comes, then requeues the job
    with `scontrol requeue`; SIGTERM it only logs. Here a SIGTERM of a preemption takes that same path
    (submitit's own USR2 handler is called); a SIGTERM of a cancel kills the workers. checkpoint() asks
    the workers to stop at a step boundary, waits until they saved, and returns the launcher for the
    requeue; the requeued job resumes from `latest`.
    """

    def __init__(self, run_dir: str, stop_wait_s: float = 600.0, wait_for: tuple[Job, ...] = ()) -> None:
        self.run_dir = run_dir
        self.stop_wait_s = stop_wait_s
        self.wait_for = wait_for  # the local cluster's dependencies: jobs to outlive before starting
        self._run: NodeRun | None = None
        self._on_timeout_signal = None  # submitit's USR2 handler: checkpoint(), then the requeue

    def __call__(self) -> str:
        if self.wait_for:
            wait_ended(self.run_dir, self.wait_for)
        env = dict(os.environ)
        if "SLURM_JOB_ID" in env:
            # submitit parses the node list (gpu[003-004,010]) here, on the compute node.
            env["LLAMAJOBS_HOSTS"] = " ".join(submitit.JobEnvironment().hostnames)
        else:
            env["LLAMAJOBS_PORT"] = str(free_port())
        self._run = NodeRun(self.run_dir, self.stop_wait_s)
        self._on_timeout_signal = signal.getsignal(signal.SIGUSR2)
        signal.signal(signal.SIGTERM, self._on_sigterm)
        self._run.start(env)
        code = self._run.process.wait()
        if code != 0:
            launch = Path(self.run_dir) / "launch.sh"
            raise RuntimeError(f"{launch} exited with code {code}; worker logs under {Path(self.run_dir) / 'logs'}")
        return "finished"

    def _on_sigterm(self, signum: int, frame) -> None:
        if self._run.on_signal(signum) is not None and callable(self._on_timeout_signal):
            self._on_timeout_signal(signal.SIGUSR2, frame)  # a pause: as on the timeout signal

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        run = self._run or NodeRun(self.run_dir, self.stop_wait_s)
        if run.stopping is None:  # submitit's timeout signal itself (USR2), not a SIGTERM we passed on
            run.on_signal(signal.SIGUSR2)
        latest = run.wait_stopped()
        events.record(self.run_dir, "requeued", latest=latest, hosts=os.environ.get("SLURM_JOB_NODELIST", "localhost"))
        return submitit.helpers.DelayedSubmission(NodeLauncher(self.run_dir, self.stop_wait_s))

    def __getstate__(self) -> dict:
        return {"run_dir": self.run_dir, "stop_wait_s": self.stop_wait_s, "wait_for": self.wait_for, "_run": None,
                "_on_timeout_signal": None}


def grace_warning(spec: JobSpec, partition: Partition) -> str | None:
    """Preemption sends SIGTERM, then SIGKILL after the partition's GraceTime: a warning when the
    predicted save does not fit in between (the job then resumes from its last periodic checkpoint)."""
    needed = save_seconds(spec) + STOP_MARGIN_S
    if partition.preempt_mode.upper().startswith("OFF") or partition.grace_s >= needed:
        return None
    return (f"partition {partition.name} preempts with GraceTime {partition.grace_s} s, less than the ~{needed:.0f} s "
            f"this job needs to save a checkpoint, so a preempted run resumes from its last periodic checkpoint: "
            f"give --checkpoint-every-minutes to bound what it loses, save less (--mode lora checkpoints the "
            f"adapter only), or submit to a partition that is not preempted")


# When one node's launcher fails, srun ends the others' at once: a rank hung outside any collective
# (so no collective timeout fires) would otherwise hold its node until the time limit.
KILL_ON_BAD_EXIT = ("--kill-on-bad-exit=1",)


def allocation(spec: JobSpec, site: Site, dependency: str | None = None) -> Allocation:
    """What the job asks of its cluster: its nodes, time, resources and the site's setup lines."""
    return Allocation(
        name=spec.run_name, nodes=spec.nodes, minutes=spec.time_minutes, cpus_per_task=spec.cpus_per_task,
        gres=site.gres.format(gpus=spec.gpus_per_node) if site.gres and spec.device != "cpu" else None,
        mem=spec.mem_per_node, partition=spec.partition, account=spec.account, qos=spec.qos,
        constraint=spec.constraint, exclude=site.excluded(spec.exclude), exclusive=spec.exclusive, mail_user=spec.mail_user,
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


def submit(spec: JobSpec, site: Site, runs_dir: Path, after_any: Sequence[Job] = ()) -> Submission:
    """Allocate, render, submit, register; on failure nothing is left registered or half-written,
    and nothing is removed that this call did not create. `after_any`: jobs of the same cluster it
    starts after, however they end (a sweep's --max-parallel slots)."""
    backend = cluster.backend(spec.cluster)
    reg = registry.Registry(runs_dir)
    dependency = ",".join(filter(None, [dependency_on(spec.after, reg), backend.after_any_dependency(after_any)]))
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
        waits = backend.waits_for(after_any)
        if waits:
            hold(run_dir, waits)
        executor = backend.executor(allocation(spec, site, dependency or None), run_dir / "submitit")
        launcher = NodeLauncher(str(run_dir), stop_wait_s=stop_wait_s(spec), wait_for=waits)
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
