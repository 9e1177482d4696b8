"""SLURM: sbatch through submitit's SlurmExecutor; sacct and squeue for states, scancel, `scontrol show
partition` for the time limit, `sbatch --test-only` for a dry run's verdict, `scontrol ping` to tell
whether there is a cluster at all. Every call to a SLURM command goes through `_run`, the one
subprocess boundary the unit tests fake."""

from __future__ import annotations

import os
import pwd
import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from llamajobs import catalog
from llamajobs.cluster.base import UNKNOWN, Allocation, Backend, Handle, Partition, SubmitError
from llamajobs.errors import Failure
from llamajobs.registry import Job
from llamajobs.values import parse_slurm_time

STATES = frozenset({"PENDING", "RUNNING", "COMPLETING", "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "PREEMPTED",
                    "REQUEUED", "NODE_FAIL", "OUT_OF_MEMORY", "SUSPENDED", "REQUEUE_HOLD", "REQUEUE_FED",
                    "RESIZING", "DEADLINE", "BOOT_FAIL", "CONFIGURING", "STOPPED", "SIGNALING", "STAGE_OUT"})
# A job in one of these is still the controller's: queued, running, or on its way back to the queue.
LIVE = frozenset({"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                  "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"})
TIMEOUT_S = 60
# Ends after which SLURM may put the job back in the queue (--requeue): squeue, not accounting, says
# whether it did.
REQUEUEABLE = frozenset({"NODE_FAIL", "PREEMPTED", "REQUEUED"})


def _run(command: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a SLURM command; a missing or hanging command reads as a failed one (exit 127 or 124)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except OSError as e:
        return subprocess.CompletedProcess(command, 127, "", str(e))
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(command, 124, "", f"{command[0]} did not answer within {timeout:.0f} s")


def state_word(text: str) -> str:
    """One of STATES from sacct's or squeue's column: "CANCELLED by 0" and sacct's cut "OUT_OF_ME+"
    are read as such; a word SLURM may add later is UNKNOWN rather than shown raw."""
    word = text.split()[0].rstrip("+") if text.strip() else UNKNOWN
    if word == "OUT_OF_ME":
        return "OUT_OF_MEMORY"
    return word if word in STATES else UNKNOWN


def parse_states(sacct: str, squeue: str = "") -> dict[str, str]:
    """{cluster job id: state} from `sacct -P -o JobIDRaw,State` and `squeue -o '%i %T'` output."""
    states: dict[str, str] = {}
    for line in squeue.splitlines():
        job_id, _, state = line.strip().partition(" ")
        if job_id:
            states[job_id] = state_word(state)
    for line in sacct.splitlines():  # accounting wins once it has the job
        job_id, _, state = line.partition("|")
        if job_id.strip():
            states[job_id.strip()] = state_word(state)
    return states


def parse_partition(text: str, partition: str | None) -> Partition:
    """`scontrol show partition [P]`'s block of P, or without a name the default partition's (the
    block with Default=YES, else the first). ValueError when it holds no partition or a bad value."""
    blocks = [b.split() for b in text.split("\n\n") if b.strip()]
    if not blocks:
        raise ValueError("no partition in its output")
    words = next((b for b in blocks if partition is None and "Default=YES" in b), blocks[0])
    fields = dict(w.split("=", 1) for w in words if "=" in w)
    limit = fields.get("MaxTime", "UNLIMITED")
    grace = fields.get("GraceTime", "0")
    if not grace.isdigit():
        raise ValueError(f"GraceTime={grace!r}")
    return Partition(name=fields.get("PartitionName", partition or ""), grace_s=int(grace),
                     preempt_mode=fields.get("PreemptMode", "OFF"),
                     max_minutes=0 if limit in ("UNLIMITED", "INFINITE") else parse_slurm_time(limit))


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What the controller holds of a running job when one of its processes is signalled: whether
    the signal is a preemption (a pause), the cluster's own requeue (a node failed), or a cancel."""

    state: str  # JobState: RUNNING, SIGNALING (preemption's grace), COMPLETING (cancelled, requeued), ...
    preempt_time: str | None  # PreemptTime: set once the job was chosen for preemption
    restarts: int  # Restarts: how often the job was requeued, this requeue counted as soon as it is decided

    def verdict(self, attempt: int) -> str:
        """"preempted" (save and requeue), "requeued" (the controller requeued it already: a node
        failed, or an admin's `scontrol requeue`) or "cancelled" (scancel, the time limit)."""
        if self.preempt_time is not None and self.state in ("RUNNING", "SIGNALING"):
            return "preempted"
        return "requeued" if self.restarts > attempt else "cancelled"


def parse_job_record(text: str) -> JobRecord:
    """`scontrol show job -o ID`'s line; ValueError when it holds no JobState."""
    fields = dict(w.split("=", 1) for w in text.split() if "=" in w)
    if "JobState" not in fields:
        raise ValueError("no JobState in scontrol's answer")
    preempt = fields.get("PreemptTime", "None")
    restarts = fields.get("Restarts", "0")
    return JobRecord(state=fields["JobState"], preempt_time=None if preempt in ("None", "Unknown", "") else preempt,
                     restarts=int(restarts) if restarts.isdigit() else 0)


def job_record(job_id: str) -> JobRecord | None:
    """The controller's record of a job now (None when scontrol cannot say)."""
    result = _run(["scontrol", "show", "job", "-o", job_id], timeout=20)
    try:
        return parse_job_record(result.stdout) if result.returncode == 0 else None
    except ValueError:
        return None


def requeue(job_id: str) -> None:
    """Back to the queue under the same id (it runs again with SLURM_RESTART_COUNT one higher)."""
    _check(_run(["scontrol", "requeue", job_id]))


@dataclass(frozen=True, slots=True)
class PastAttempt:
    """One earlier run of a requeued job, from accounting (`sacct -D`)."""

    state: str
    nodes: tuple[str, ...]
    start: str
    end: str
    failed_nodes: tuple[str, ...] = ()  # the nodes that went down while it ran (NODE_FAIL)


def parse_attempts(sacct: str) -> list[tuple[str, str, str, str]]:
    """(state, node list, start, end) of every run of the job, oldest first, from
    `sacct -D -X -n -P -o State,NodeList,Start,End`."""
    rows = [line.split("|") for line in sacct.splitlines() if line.count("|") == 3]
    return [(state_word(state), nodes, start, end) for state, nodes, start, end in rows]


def parse_node_events(text: str) -> list[tuple[str, str, str]]:
    """(node, start, reason) of every node event from `sacctmgr -n -P show event ... format=NodeName,TimeStart,Reason`
    (the cluster's own events, with no node name, are left out)."""
    rows = [line.split("|", 2) for line in text.splitlines() if line.count("|") >= 2]
    return [(node, start, reason) for node, start, reason in rows if node]


def hostnames(nodelist: str) -> tuple[str, ...]:
    """n[1-2] -> (n1, n2), by `scontrol show hostnames`."""
    result = _run(["scontrol", "show", "hostnames", nodelist], timeout=20)
    return tuple(result.stdout.split()) if result.returncode == 0 else (nodelist,)


def past_attempts(job_id: str) -> list[PastAttempt]:
    """The earlier runs of a requeued job, each with the nodes that went down during it (from the
    accounting's node events: a node that failed and returned at once is still named)."""
    sacct = _run(["sacct", "-D", "-X", "-n", "-P", "-j", job_id, "-o", "State,NodeList,Start,End"])
    found = []
    for state, nodelist, start, end in parse_attempts(sacct.stdout if sacct.returncode == 0 else ""):
        nodes, failed = hostnames(nodelist), ()
        if state == "NODE_FAIL" and start != "Unknown":
            events = _run(["sacctmgr", "-n", "-P", "show", "event", f"nodes={','.join(nodes)}", f"start={start}",
                           "format=NodeName,TimeStart,Reason"])
            failed = tuple(dict.fromkeys(node for node, when, _ in parse_node_events(events.stdout)
                                         if end == "Unknown" or when <= end))
        found.append(PastAttempt(state=state, nodes=nodes, start=start, end=end, failed_nodes=failed))
    return found


def available() -> bool:
    """Whether a SLURM controller answers `scontrol ping` from here."""
    result = _run(["scontrol", "ping"], timeout=10)
    return result.returncode == 0 and "UP" in result.stdout


def parse_node_gpus(sinfo: str) -> int | None:
    """The most GPUs one node has, from `sinfo -h -o %G` (one generic-resources list per line of nodes:
    gpu:8, gpu:a100:4(S:0-1),shard:8, (null)); None when no node lists a GPU count."""
    counts = [int(m.group(1)) for line in sinfo.split() for item in line.split(",")
              if (m := re.match(r"^gpu(?::[^:(]+)?:(\d+)", item))]
    return max(counts) if counts else None


class SlurmBackend(Backend):
    info = catalog.CLUSTER["slurm"]

    def executor(self, allocation: Allocation, folder: Path) -> Any:
        import submitit  # not at the top: `status` never loads it

        a = allocation
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=a.max_requeues)
        options = {
            "job_name": a.name, "nodes": a.nodes, "ntasks_per_node": 1,
            "time": a.minutes if a.minutes is not None else self.time_limit(a.partition),
            "partition": a.partition, "account": a.account, "qos": a.qos, "constraint": a.constraint,
            "exclude": a.exclude, "mail_user": a.mail_user, "mail_type": a.mail_type,
            "exclusive": a.exclusive or None, "dependency": a.dependency, "cpus_per_task": a.cpus_per_task,
            "mem": a.mem, "gres": a.gres, "setup": list(a.setup) or None, "srun_args": list(a.srun_args) or None,
            "stderr_to_stdout": False, "signal_delay_s": a.signal_delay_s,
            # --requeue: preemption (PreemptMode=REQUEUE), a node failure and the stop protocol's
            # `scontrol requeue` put the job back in the queue even where JobRequeue=0 is the default.
            "additional_parameters": {"requeue": True, **({"hold": True} if a.hold else {})},
        }
        executor.update_parameters(**{k: v for k, v in options.items() if v is not None})
        if a.python:
            # submitit writes its `python` into the batch script as shell words: the site's interpreter
            # is a path, data like every site value but setup, so it goes in quoted.
            executor.python = shlex.quote(a.python)
        return executor

    def after_any_dependency(self, jobs: Sequence[Job]) -> str | None:
        return "afterany:" + ":".join(j.cluster_job_id for j in jobs) if jobs else None

    def waits_for(self, jobs: Sequence[Job]) -> tuple[Job, ...]:
        return ()  # the scheduler holds the job (after_any_dependency)

    def _states(self, jobs: Sequence[Job]) -> dict[int, str]:
        """One sacct call for all of them, then squeue for those accounting has not seen yet (it
        learns of a new job only after a while) and for those it says ended in a way SLURM requeues
        (a node failure, a preemption): until the requeued attempt starts, accounting still shows the
        last one's end while the job waits in the queue."""
        ids = list(dict.fromkeys(j.cluster_job_id for j in jobs))
        sacct = _run(["sacct", "-n", "-P", "-X", "-j", ",".join(ids), "-o", "JobIDRaw,State"])
        found = parse_states(sacct.stdout if sacct.returncode == 0 else "")
        ask = [i for i in ids if found.get(i, "REQUEUED") in REQUEUEABLE]
        if ask:
            squeue = _run(["squeue", "-h", "-j", ",".join(ask), "-o", "%i %T"])
            found.update(parse_states("", squeue.stdout if squeue.returncode == 0 else ""))
        return {j.id: found[j.cluster_job_id] for j in jobs if j.cluster_job_id in found}

    def cancel(self, job: Job) -> None:
        _check(_run(["scancel", job.cluster_job_id]))

    def signal_stop(self, job: Job) -> None:
        _check(_run(["scancel", "--signal=USR2", job.cluster_job_id]))

    def reattach(self, job_ids: Sequence[str], folder: Path) -> dict[str, Handle]:
        import submitit

        live = self.live_jobs()
        return {i: submitit.SlurmJob(folder=folder, job_id=i) for i in job_ids if i in live}

    def live_jobs(self) -> set[str]:
        """This user's jobs that slurmctld holds as queued or running, one id per array element
        (squeue, not sacct: accounting learns of a new job only after a while). None seen when
        squeue fails: the caller resubmits rather than waits for jobs nobody can see."""
        user = pwd.getpwuid(os.getuid()).pw_name
        result = _run(["squeue", "-h", "-r", "-u", user, "-o", "%i|%T"])
        if result.returncode != 0:
            return set()
        return {job for job, _, state in (line.partition("|") for line in result.stdout.split()) if state in LIVE}

    def partition(self, name: str | None) -> Partition:
        """The named partition, or the default one; SubmitError when scontrol cannot tell."""
        result = _run(["scontrol", "show", "partition"] + ([name] if name else []), timeout=30)
        try:
            if result.returncode != 0:
                raise ValueError(result.stderr.strip() or f"exit code {result.returncode}")
            return parse_partition(result.stdout, name)
        except ValueError as e:
            raise SubmitError(f"cannot read partition {name or '(default)'}: {e}; give --time") from None

    def node_gpus(self, partition: str | None) -> int | None:
        """The most GPUs one node of the partition (else of the default one) has, from sinfo."""
        result = _run(["sinfo", "-h", "-o", "%G"] + (["-p", partition] if partition else []), timeout=30)
        return parse_node_gpus(result.stdout) if result.returncode == 0 else None

    def time_limit(self, partition: str | None) -> int:
        """The partition's MaxTime in minutes (0 when unlimited), for a job that names no --time."""
        return self.partition(partition).max_minutes

    def test_only(self, script: Path) -> str:
        """`sbatch --test-only SCRIPT`: where and when the job would start, or why it would not."""
        result = _run(["sbatch", "--test-only", str(script)])
        verdict = " ".join((result.stderr or result.stdout).strip().splitlines())
        return verdict or f"exit code {result.returncode}"


def _check(result: subprocess.CompletedProcess) -> None:
    if result.returncode != 0:
        message = result.stderr.strip() or result.stdout.strip() or f"exit code {result.returncode}"
        raise Failure(f"{' '.join(result.args)} failed: {message}")
