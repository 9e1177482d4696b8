"""The Backend interface, the allocation a job asks for, and the state vocabulary every backend speaks."""

from __future__ import annotations

import contextlib
import os
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterator, Protocol, Sequence

from llamajobs.catalog import ClusterInfo
from llamajobs.errors import Failure
from llamajobs.registry import Job

# SLURM's states as `status` shows them; a job in one of TERMINAL is over (it may still be requeued
# by hand, which makes it a new attempt).
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY"})
UNKNOWN = "UNKNOWN"


class SubmitError(Failure):
    """The cluster refused or failed the submission; nothing was registered."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Allocation:
    """What a job asks of its cluster: one task per node, each running one submitit callable. The
    local cluster honours the time limit, the requeues and the signal delay; SLURM all of it."""

    name: str
    nodes: int = 1
    minutes: int | None = None  # None: the partition's MaxTime on SLURM, a week on the local cluster
    cpus_per_task: int | None = None
    gres: str | None = None  # SLURM --gres, e.g. gpu:8
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclude: str | None = None
    exclusive: bool = False
    mail_user: str | None = None
    mail_type: str | None = None
    dependency: str | None = None  # afterok:ID:ID
    hold: bool = False
    signal_delay_s: int | None = None  # how long before the time limit the timeout signal comes
    max_requeues: int = 0
    setup: tuple[str, ...] = ()  # shell lines run first (module loads, venv activation)
    srun_args: tuple[str, ...] = ()
    python: str | None = None  # the interpreter on the nodes, a path (the backend quotes it); None: this one


@dataclass(frozen=True, slots=True)
class Partition:
    """What submit needs of a partition: its time limit, and how long a preempted job has to save."""

    name: str
    max_minutes: int  # 0: unlimited
    grace_s: int  # GraceTime: between preemption's SIGTERM and its SIGKILL
    preempt_mode: str = "OFF"  # REQUEUE, CANCEL, SUSPEND, ... or OFF: no job here is preempted


class Handle(Protocol):
    """A job of an earlier command, reattached: what submitit's Job offers that the caller needs."""

    job_id: str

    def done(self) -> bool: ...


class Backend(ABC):
    """One kind of cluster. Public methods take registered jobs and never raise for one job's
    damage: a job whose state cannot be told is UNKNOWN. Each names its ClusterInfo (what it can do),
    which the rest of the code asks instead of the name."""

    info: ClassVar[ClusterInfo]

    @property
    def name(self) -> str:
        return self.info.name

    @abstractmethod
    def executor(self, allocation: Allocation, folder: Path) -> Any:
        """submitit's executor for this allocation, its pickles and logs in `folder`."""

    def states(self, jobs: Sequence[Job]) -> dict[int, str]:
        """Every job's state, by llamajobs id, with one query for all of them."""
        asked = [j for j in jobs if j.cluster_job_id]  # a damaged job.json leaves none to ask about
        found = self._states(asked) if asked else {}
        return {j.id: found.get(j.id, UNKNOWN) for j in jobs}

    @abstractmethod
    def _states(self, jobs: Sequence[Job]) -> dict[int, str]:
        """The states the cluster knows, by llamajobs id; a job left out is UNKNOWN."""

    @abstractmethod
    def cancel(self, job: Job) -> None:
        """End the job now; Failure when the cluster refuses."""

    @abstractmethod
    def signal_stop(self, job: Job) -> None:
        """Send node 0's launcher submitit's timeout signal: it checkpoints at the next step
        boundary and the job is requeued. Failure when the job cannot be reached."""

    def partition(self, name: str | None) -> Partition | None:
        """The partition a job goes to (its time limit, its preemption), where the cluster has them."""
        return None

    def node_gpus(self, partition: str | None) -> int | None:
        """The most GPUs one node of the partition has; None when the cluster cannot tell."""
        return None

    def test_only(self, script: Path) -> str | None:
        """The cluster's verdict on a batch script without queueing it (a dry run); None: it has none."""
        return None

    def after_any_dependency(self, jobs: Sequence[Job]) -> str | None:
        """The scheduler's own dependency on jobs to start after, however they end; None when it has
        none and the job's launcher waits for them itself (waits_for)."""
        return None

    def waits_for(self, jobs: Sequence[Job]) -> tuple[Job, ...]:
        """The jobs a job's launcher must wait for itself before it starts (see after_any_dependency)."""
        return tuple(jobs)

    @abstractmethod
    def reattach(self, job_ids: Sequence[str], folder: Path) -> dict[str, Handle]:
        """Those of the jobs (submitted from `folder` by an earlier command) still queued or
        running, as handles to wait on."""


@contextlib.contextmanager
def detached_stdio() -> Iterator[None]:
    """Submit without our stdio. The local controller outlives this process, and a caller reading
    our output through a pipe would otherwise wait for the whole job; sbatch's own error lines would
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
        sys.stdout.flush()  # what Python buffered meanwhile goes to /dev/null too
        sys.stderr.flush()
        for fd, copy in zip((0, 1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)
