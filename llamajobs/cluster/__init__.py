"""The one place that talks to a cluster: submitit's executors, sacct/squeue/scontrol/scancel, and the
local cluster's /proc process trees, behind a small Backend interface (submitit's executors expose a
few `_` hooks per backend the same way).

    backend("slurm" | "local" | "debug") -> Backend
    Backend.executor(spec, site, folder, dependency)  a submitit executor for a run's node launchers
    Backend.states(jobs)                              {job id: state} in one query for all of them
    Backend.cancel(job)                               end the job (scancel / kill the process tree)
    Backend.signal_stop(job)                          submitit's timeout signal to node 0's launcher:
                                                      it checkpoints and the job is requeued
"""

from __future__ import annotations

from llamajobs.cluster.base import TERMINAL, Backend, SubmitError
from llamajobs.cluster.local import LocalBackend
from llamajobs.cluster.slurm import SlurmBackend

__all__ = ["TERMINAL", "Backend", "SubmitError", "backend"]


def backend(name: str) -> Backend:
    if name == "slurm":
        return SlurmBackend()
    if name in ("local", "debug"):
        return LocalBackend(name)
    raise ValueError(f"cluster {name!r}; choose slurm, local or debug")
