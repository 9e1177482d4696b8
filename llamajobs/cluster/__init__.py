"""The one place that talks to a cluster: submitit's executors, sacct/squeue/scontrol/scancel, and the
local cluster's /proc process trees, behind a small Backend interface (submitit's executors expose a
few `_` hooks per backend the same way).

    BACKENDS                               the one registry: cluster name -> Backend class (each names
                                           its ClusterInfo, catalog.CLUSTER, which the rest asks)
    backend(name) -> Backend
    Backend.executor(allocation, folder)   a submitit executor: a job's node launchers, or an array
    Backend.states(jobs)                   {job id: state} in one query for all of them
    Backend.cancel(job)                    end the job (scancel / kill the process tree)
    Backend.signal_stop(job)               submitit's timeout signal to node 0's launcher: it
                                           checkpoints and the job is requeued
    Backend.reattach(job ids, folder)      an earlier command's jobs that still run, to wait on
    of(job)                                a registered job's backend (Failure when job.json is damaged)
    states(jobs)                           the same over jobs of any cluster
    detect()                               slurm when a controller answers, else local
"""

from __future__ import annotations

from typing import Sequence

from llamajobs.cluster.base import TERMINAL, UNKNOWN, Allocation, Backend, Handle, SubmitError, detached_stdio
from llamajobs.cluster.local import DebugBackend, LocalBackend
from llamajobs.cluster.slurm import SlurmBackend, available
from llamajobs.errors import Failure
from llamajobs.registry import Job

__all__ = ["BACKENDS", "TERMINAL", "UNKNOWN", "Allocation", "Backend", "Handle", "SubmitError", "backend",
           "detached_stdio", "detect", "of", "states"]
BACKENDS: dict[str, type[Backend]] = {b.info.name: b for b in (SlurmBackend, LocalBackend, DebugBackend)}
NAMES = tuple(BACKENDS)


def backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"cluster {name!r}; choose {', '.join(NAMES)}")
    return BACKENDS[name]()


def of(job: Job) -> Backend:
    """The backend of a registered job (to cancel it, signal it); Failure when its job.json is too
    damaged to tell which cluster job it is."""
    if job.cluster not in NAMES or not job.cluster_job_id:
        why = job.problem or f"its cluster {job.cluster!r} is none of {', '.join(NAMES)}"
        raise Failure(f"job {job.id}: {why}; which cluster job it is cannot be told, so llamajobs cannot reach it")
    return backend(job.cluster)


def detect() -> str:
    """slurm when a controller answers `scontrol ping`, else the local cluster."""
    return (SlurmBackend if available() else LocalBackend).info.name


def states(jobs: Sequence[Job]) -> dict[int, str]:
    """Every job's state from its own cluster, one query per cluster; a job of a cluster this
    version does not know (a damaged job.json) is UNKNOWN."""
    found = {j.id: UNKNOWN for j in jobs}
    by_cluster: dict[str, list[Job]] = {}
    for j in jobs:
        if j.cluster in BACKENDS:
            by_cluster.setdefault(j.cluster, []).append(j)
    for name, group in by_cluster.items():
        found.update(backend(name).states(group))
    return found
