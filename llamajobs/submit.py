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

from llamajobs import catalog, cluster, events, registry, render
from llamajobs.cluster import Allocation, Backend, SubmitError
from llamajobs.cluster.base import Partition
from llamajobs.cluster.local import hold, wait_ended
from llamajobs.control import checkpoint_bytes, save_seconds, signal_delay_s, stop_wait_s
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
    predicted save does not fit in between (the job then resumes from its last periodic checkpoint).
    The save is sized from what the checkpoint holds (a LoRA run's: the adapter and its optimizer state)."""
    needed = save_seconds(spec)
    if partition.preempt_mode.upper().startswith("OFF") or partition.grace_s >= needed:
        return None
    return (f"partition {partition.name} preempts with GraceTime {partition.grace_s} s, less than the ~{needed:.0f} s "
            f"this job needs to save a checkpoint ({_gigabytes(checkpoint_bytes(spec))}), so a preempted run resumes "
            f"from its last periodic checkpoint: "
            f"give --checkpoint-every-minutes to bound what it loses, save less (--mode lora checkpoints the "
            f"adapter only), or submit to a partition that is not preempted")


def _gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def check_node_gpus(spec: JobSpec, site: Site, backend: Backend) -> None:
    """Refuse (naming the value to change) a job asking more GPUs per node than the partition's
    nodes have: sbatch would only say "Requested node configuration is not available"."""
    if render.gres(spec, site) is None:
        return
    most = backend.node_gpus(spec.partition)
    if most is not None and spec.gpus_per_node > most:
        where = f"partition {spec.partition}" if spec.partition else "the default partition"
        raise SpecError(f"--gpus-per-node {spec.gpus_per_node}: the nodes of {where} have at most {most} GPUs "
                        f"each; give --gpus-per-node {most} or fewer (more --nodes for more GPUs), or another "
                        f"--partition")


# When one node's launcher fails, srun ends the others' at once: a rank hung outside any collective
# (so no collective timeout fires) would otherwise hold its node until the time limit.
KILL_ON_BAD_EXIT = ("--kill-on-bad-exit=1",)


def allocation(spec: JobSpec, site: Site, dependency: str | None = None) -> Allocation:
    """What the job asks of its cluster: its nodes, time, resources and the site's setup lines."""
    return Allocation(
        name=spec.run_name, nodes=spec.nodes, minutes=spec.time_minutes, cpus_per_task=spec.cpus_per_task,
        gres=render.gres(spec, site),
        mem=spec.mem_per_node, partition=spec.partition, account=spec.account, qos=spec.qos,
        constraint=spec.constraint, exclude=site.excluded(spec.exclude), exclusive=spec.exclusive, mail_user=spec.mail_user,
        mail_type=spec.mail_type, dependency=dependency, hold=spec.hold, signal_delay_s=signal_delay_s(spec),
        max_requeues=spec.max_requeues, setup=site.setup, srun_args=(*KILL_ON_BAD_EXIT, *site.srun_args),
        python=site.python)


def dependency_on(spec: JobSpec, reg: registry.Registry) -> str | None:
    """--after names llamajobs ids; the cluster wants its own: afterok:ID:ID. Only jobs of this job's
    own cluster, where that cluster can depend on jobs."""
    if not spec.after:
        return None
    able = " or ".join(c.name for c in catalog.CLUSTER.values() if c.can_depend)
    cluster_ids = []
    for value in spec.after:
        job = reg.get(int(value)) if value.isdigit() else None
        if job is None or job.cluster != spec.cluster or not spec.cluster_info.can_depend:
            raise SpecError(f"--after {value}: not a job of the {spec.cluster} cluster known to llamajobs "
                            f"(--after waits for jobs of the same cluster, on {able})")
        cluster_ids.append(job.cluster_job_id)
    return "afterok:" + ":".join(cluster_ids)


def dry_run(spec: JobSpec, site: Site) -> tuple[Path, str | None]:
    """Render into a new temporary directory; where the cluster has one (SLURM: `sbatch --test-only`),
    also its verdict."""
    folder = Path(tempfile.mkdtemp(prefix="llamajobs-dry-run-"))
    render.render(spec, site, folder)
    return folder, cluster.backend(spec.cluster).test_only(folder / "job.sbatch")


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
    dependency = ",".join(filter(None, [dependency_on(spec, reg), backend.after_any_dependency(after_any)]))
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
