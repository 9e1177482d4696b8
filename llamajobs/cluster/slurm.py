"""SLURM: sbatch through submitit, sacct/squeue for states, scancel. (Bodies move here from
submit.py, monitor.py and data/shards.py.)"""

from __future__ import annotations

import subprocess
from typing import Sequence

from llamajobs.cluster.base import Backend
from llamajobs.errors import Failure
from llamajobs.registry import Job


class SlurmBackend(Backend):
    name = "slurm"

    def executor(self, spec, site, folder, dependency=None):
        from llamajobs import submit  # TODO(cluster helper): the body moves here

        return submit.make_executor(spec, site, folder, dependency)

    def states(self, jobs: Sequence[Job]) -> dict[int, str]:
        from llamajobs import monitor  # TODO(cluster helper): the body moves here

        found = monitor.slurm_states([j.cluster_job_id for j in jobs])
        return {j.id: found.get(j.cluster_job_id, "UNKNOWN") for j in jobs}

    def cancel(self, job: Job) -> None:
        result = subprocess.run(["scancel", job.cluster_job_id], capture_output=True, text=True)
        if result.returncode != 0:
            raise Failure(f"scancel {job.cluster_job_id} failed: {result.stderr.strip()}")

    def signal_stop(self, job: Job) -> None:
        result = subprocess.run(["scancel", "--signal=USR2", job.cluster_job_id], capture_output=True, text=True)
        if result.returncode != 0:
            raise Failure(f"scancel --signal=USR2 {job.cluster_job_id} failed: {result.stderr.strip()}")
