"""The local cluster: submitit's LocalExecutor, one controller process per job recorded by pid,
/proc process trees and signals. (Bodies move here from monitor.py and submit.py.)"""

from __future__ import annotations

from typing import Sequence

from llamajobs.cluster.base import Backend
from llamajobs.registry import Job


class LocalBackend(Backend):
    def __init__(self, name: str = "local") -> None:
        self.name = name

    def executor(self, spec, site, folder, dependency=None):
        from llamajobs import submit  # TODO(cluster helper): the body moves here

        return submit.make_executor(spec, site, folder, dependency)

    def states(self, jobs: Sequence[Job]) -> dict[int, str]:
        from llamajobs import events, monitor  # TODO(cluster helper): the body moves here

        return {j.id: monitor.local_state(j, events.read(j.run_dir)) for j in jobs}

    def cancel(self, job: Job) -> None:
        from llamajobs import monitor  # TODO(cluster helper): the body moves here

        monitor.kill_local(int(job.cluster_job_id))

    def signal_stop(self, job: Job) -> None:
        from llamajobs import monitor  # TODO(cluster helper): the body moves here

        monitor.signal_launcher(job)
