"""The Backend interface and the state vocabulary every backend speaks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import submitit

from llamajobs.errors import Failure
from llamajobs.registry import Job

# SLURM's states as `status` shows them; a job in one of TERMINAL is over (it may still be requeued
# by hand, which makes it a new attempt).
TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY"})


class SubmitError(Failure):
    """The cluster refused or failed the submission; nothing was registered."""


class Backend(ABC):
    name: str

    @abstractmethod
    def executor(self, spec, site, folder, dependency: str | None = None) -> submitit.Executor:
        """submitit's executor for a run's node launchers (one task per node)."""

    @abstractmethod
    def states(self, jobs: Sequence[Job]) -> dict[int, str]:
        """Every job's state, by llamajobs id, with one query for all of them."""

    @abstractmethod
    def cancel(self, job: Job) -> None:
        """End the job now; Failure when the cluster refuses."""

    @abstractmethod
    def signal_stop(self, job: Job) -> None:
        """Ask node 0's launcher to checkpoint at the next step boundary and requeue the job."""
