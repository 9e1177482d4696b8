"""The node launcher: the rendered launch.sh on one node, shielded from the stop signals, which it turns
into the stop protocol.

SLURM stops a job with signals to every process of its steps: USR2 (`--signal`) ahead of the time
limit and, at sites with PreemptParameters=send_user_signal, at preemption; SIGTERM at preemption
(PreemptMode=REQUEUE: SIGKILL follows after the partition's GraceTime), at `scancel`, and when the
controller requeued the job itself (a node failed). torchrun dies of USR2 and kills its workers on
SIGTERM; DeepSpeed's per-node launch.py installs a SIGTERM handler of its own (whatever it inherits) that
terminates its workers and SIGKILLs them 30 s later, however long their save takes. So launch.sh's
whole tree runs with both signals blocked (and ignored): a blocked signal stays pending whichever handler
a program installs, the mask survives fork and exec, and torchrun is also told to leave SIGTERM alone.
Only this launcher, outside that tree, receives them. It decides:

- a pause (USR2; SIGTERM of a preemption): node 0 writes the stop request, worker rank 0 stops every
  rank at the next optimizer-step boundary, they save that step, and the job goes back to the queue;
- a cancel (SIGTERM of a scancel or a time limit; the controller's own requeue): the workers are
  killed at once, nothing is saved (a requeued job resumes from its last periodic checkpoint).

SIGTERM means either, so the controller's record of the job (`scontrol show job`) tells them apart.

submit.NodeLauncher runs this under submitit (whose USR2 handler calls its checkpoint() and requeues);
`python -m llamajobs.launcher RUN_DIR` runs it from a hand-submitted job.sbatch, requeueing itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llamajobs import events
from llamajobs.cluster import slurm
from llamajobs.cluster.local import descendants, exited, send
from llamajobs.control import STOP_REQUEST, request_stop

# torchrun's elastic agent turns these into a SignalException and kills its workers: everything it
# handles by default (SIGTERM,SIGINT,SIGHUP,SIGQUIT) but SIGTERM, which must stay ignored.
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
PAUSE = ("preempted", "time limit", "unknown")  # verdicts that save and requeue
STOP_SIGNALS = {signal.SIGUSR2, signal.SIGTERM}  # what SLURM stops a job with; only this launcher takes them


def _shield() -> None:
    """In the child before exec: USR2 and SIGTERM blocked and ignored, for launch.sh and everything it
    starts (the mask and an ignored disposition survive exec and are inherited). Ignoring alone is not
    enough: DeepSpeed's launch.py replaces it with its own SIGTERM handler, which never runs while the
    signal is blocked."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def attempt() -> int:
    return int(os.environ.get("SLURM_RESTART_COUNT") or os.environ.get("LLAMAJOBS_ATTEMPT") or 0)


def node_rank() -> int:
    return int(os.environ.get("SLURM_NODEID") or 0)


def verdict(signum: int) -> str:
    """What a signal means for this job: "time limit" (USR2), "preempted" (SIGTERM, or USR2 under
    send_user_signal), "requeued" (by the controller: a node failed), "cancelled", or "unknown" when
    the controller cannot say (then it is taken as a pause: a save costs nothing, and a cancelled job
    cannot be requeued)."""
    job_id = os.environ.get("SLURM_JOB_ID")
    if signum == signal.SIGUSR2:  # ahead of the time limit, or a preemption under send_user_signal
        record = slurm.job_record(job_id) if job_id else None
        return "preempted" if record is not None and record.verdict(attempt()) == "preempted" else "time limit"
    if not job_id:  # the local cluster: SIGTERM is `llamajobs cancel`
        return "cancelled"
    record = slurm.job_record(job_id)
    return "unknown" if record is None else record.verdict(attempt())


class NodeRun:
    """launch.sh as a child process group of this launcher, and the stop protocol around it."""

    def __init__(self, run_dir: str, stop_wait_s: float) -> None:
        self.run_dir = Path(run_dir)
        self.stop_wait_s = stop_wait_s
        self.process: subprocess.Popen | None = None
        self.stopping: str | None = None  # the verdict of the signal that stopped it
        self.consumed: set[Path] = set()  # stop requests the workers had consumed before this one

    def start(self, env: dict[str, str]) -> None:
        env = {**env, "PET_SIGNALS_TO_HANDLE": TORCHRUN_SIGNALS}  # torchrun --signals-to-handle
        self.process = subprocess.Popen(["bash", str(self.run_dir / "launch.sh")], env=env, preexec_fn=_shield)
        if node_rank() == 0 and os.environ.get("SLURM_JOB_ID"):
            record_attempt(self.run_dir, os.environ["SLURM_JOB_ID"])

    def on_signal(self, signum: int) -> str | None:
        """Decide what the signal means; kill the workers on a cancel; returns the verdict when this
        node must now stop the run and requeue it (node 0, first stop signal), else None."""
        if self.stopping is not None:
            return None
        found = verdict(signum)
        name = signal.Signals(signum).name
        if found in PAUSE:
            if node_rank() != 0:
                return None
            self.stopping = found
            events.record(self.run_dir, "signalled", signal=name, verdict=found, node=node_rank(), attempt=attempt())
            self.consumed = set(self.run_dir.glob(f"{STOP_REQUEST}.done-step-*"))
            request_stop(self.run_dir, found)
            return found
        self.stopping = found
        events.record(self.run_dir, "signalled", signal=name, verdict=found, node=node_rank(), attempt=attempt())
        self.kill()
        return None

    def kill(self) -> None:
        """SIGKILL to launch.sh's whole tree, listed before any of it dies: torchrun starts each worker
        in a session of its own, so neither its process group nor its death would take them along
        (orphaned, they would train on, out of SLURM's sight under proctrack/linuxproc)."""
        if self.process is None or exited(self.process.pid):
            return
        for pid in [self.process.pid, *descendants(self.process.pid)]:
            send(pid, signal.SIGKILL)

    def saved(self) -> bool:
        """Whether the workers consumed this stop request: rank 0 does so once the step's checkpoint
        is committed on every rank."""
        return not (self.run_dir / STOP_REQUEST).exists() and bool(
            set(self.run_dir.glob(f"{STOP_REQUEST}.done-step-*")) - self.consumed)

    def wait_stopped(self) -> str | None:
        """After a stop request: wait until the workers saved (or the wait is over: the last periodic
        checkpoint holds); the checkpoint `latest` names. On SLURM the requeue ends the workers, so
        their exit (seconds of teardown) is not waited for once the checkpoint is committed; the local
        cluster starts the next attempt beside this one, which must be gone first."""
        deadline = time.time() + self.stop_wait_s
        on_slurm = "SLURM_JOB_ID" in os.environ
        # Not Popen.wait(): under submitit this runs in a signal handler that interrupted the main
        # wait(), which holds the Popen's wait lock. The exited launch shows as a zombie until reaped.
        while self.process is not None and time.time() < deadline and not exited(self.process.pid):
            if on_slurm and self.saved():
                self.kill()
                break
            time.sleep(0.2)
        latest = self.run_dir / "checkpoints" / "latest"
        return latest.read_text().strip() if latest.exists() else None


def record_attempt(run_dir: Path, job_id: str) -> None:
    """At the start of every attempt: its nodes and, after a requeue, how the attempt before it ended
    in the cluster's words and which nodes failed during it (for `status JOB`)."""
    try:
        past = slurm.past_attempts(job_id) if attempt() > 0 else []
    except (OSError, ValueError):
        past = []
    previous = past[-2] if len(past) >= 2 else None  # the last row is this attempt
    events.record(run_dir, "attempt", attempt=attempt(), hosts=os.environ.get("SLURM_JOB_NODELIST"),
                  previous_state=previous.state if previous else None,
                  failed_nodes=list(previous.failed_nodes) if previous else [])


def main(argv: list[str]) -> int:
    """`python -m llamajobs.launcher RUN_DIR [STOP_WAIT_S]` on every node of a hand-submitted job:
    what NodeLauncher does under submitit, with the requeue done here."""
    run_dir, stop_wait_s = argv[0], float(argv[1]) if len(argv) > 1 else 600.0
    run = NodeRun(run_dir, stop_wait_s)
    signal.signal(signal.SIGUSR2, lambda signum, _: run.on_signal(signum))
    signal.signal(signal.SIGTERM, lambda signum, _: run.on_signal(signum))
    env = dict(os.environ)
    if "SLURM_JOB_ID" not in env:
        raise SystemExit("llamajobs.launcher runs inside a SLURM job (srun in job.sbatch)")
    run.start(env)
    while run.process.poll() is None and run.stopping not in PAUSE:
        time.sleep(0.5)
    if run.stopping in PAUSE:
        latest = run.wait_stopped()
        events.record(run.run_dir, "requeued", latest=latest, hosts=env.get("SLURM_JOB_NODELIST"))
        slurm.requeue(env["SLURM_JOB_ID"])
        return 0
    return run.process.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
