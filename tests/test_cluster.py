"""The cluster layer without a cluster and without root: SLURM faked at the subprocess boundary (what
sacct, squeue, scontrol, scancel and sbatch print, like submitit's MockedSubprocess), the local
backend against real processes (sleep, and python processes named like submitit's)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamajobs import cluster, events, spec, submit
from llamajobs.cluster import local, slurm
from llamajobs.cluster.base import Allocation, SubmitError
from llamajobs.errors import Failure
from llamajobs.registry import Job
from llamajobs.site import Site


class FakeSlurm:
    """subprocess.run for SLURM's commands: canned answers by command name, every call recorded."""

    def __init__(self, **answers: tuple[int, str, str] | str) -> None:
        self.answers = answers
        self.calls: list[list[str]] = []

    def __call__(self, command: list[str], **kwargs) -> subprocess.CompletedProcess:
        self.calls.append(list(command))
        name = command[0]
        if name not in self.answers:
            raise FileNotFoundError(2, "No such file or directory", name)
        answer = self.answers[name]
        code, out, err = (0, answer, "") if isinstance(answer, str) else answer
        return subprocess.CompletedProcess(command, code, out, err)

    def called(self, name: str) -> list[list[str]]:
        return [c for c in self.calls if c[0] == name]


@pytest.fixture
def fake(monkeypatch):
    def install(**answers) -> FakeSlurm:
        faked = FakeSlurm(**answers)
        monkeypatch.setattr(slurm.subprocess, "run", faked)
        return faked
    return install


def job(job_id: int, cluster_job_id: str, run_dir: Path = Path("/nonexistent"), name: str = "slurm") -> Job:
    return Job(id=job_id, name=f"job{job_id}", run_dir=run_dir, cluster=name, cluster_job_id=cluster_job_id,
               submitted_at=0.0)


# --- SLURM: states ---


@pytest.mark.parametrize("text, state", [
    ("COMPLETED", "COMPLETED"), ("CANCELLED by 0", "CANCELLED"), ("OUT_OF_ME+", "OUT_OF_MEMORY"),
    ("OUT_OF_MEMORY", "OUT_OF_MEMORY"), ("RUNNING ", "RUNNING"), ("NODE_FAIL", "NODE_FAIL"),
    ("SOMETHING_NEW", "UNKNOWN"), ("", "UNKNOWN"), ("   ", "UNKNOWN"),
])
def test_state_words(text, state):
    assert slurm.state_word(text) == state


def test_one_sacct_call_then_squeue_for_what_accounting_has_not_seen(fake):
    faked = fake(sacct="101|COMPLETED\n102|CANCELLED by 0\n103|OUT_OF_ME+\n104|BOGUS\n",
                 squeue="105 PENDING\n")
    jobs = [job(1, "101"), job(2, "102"), job(3, "103"), job(4, "104"), job(5, "105"), job(6, "106"),
            job(7, "")]  # 7: a damaged job.json left no cluster id; it is not asked about
    states = cluster.backend("slurm").states(jobs)
    assert states == {1: "COMPLETED", 2: "CANCELLED", 3: "OUT_OF_MEMORY", 4: "UNKNOWN", 5: "PENDING",
                      6: "UNKNOWN", 7: "UNKNOWN"}
    (sacct,) = faked.called("sacct")
    assert sacct[sacct.index("-j") + 1] == "101,102,103,104,105,106"
    (squeue,) = faked.called("squeue")
    assert squeue[squeue.index("-j") + 1] == "105,106"


def test_a_job_requeued_after_a_node_failure_is_whatever_the_queue_says(fake):
    # Until the requeued attempt starts, accounting shows the last attempt's end.
    faked = fake(sacct="4|NODE_FAIL\n5|PREEMPTED\n6|NODE_FAIL\n7|COMPLETED\n", squeue="4 PENDING\n5 RUNNING\n")
    states = cluster.backend("slurm").states([job(1, "4"), job(2, "5"), job(3, "6"), job(4, "7")])
    assert states == {1: "PENDING", 2: "RUNNING", 3: "NODE_FAIL", 4: "COMPLETED"}
    (squeue,) = faked.called("squeue")
    assert squeue[squeue.index("-j") + 1] == "4,5,6"


def test_sacct_failing_or_missing_falls_back_to_squeue(fake):
    faked = fake(sacct=(1, "", "sacct: error: Problem talking to the database"), squeue="7 RUNNING\n")
    assert cluster.backend("slurm").states([job(1, "7"), job(2, "8")]) == {1: "RUNNING", 2: "UNKNOWN"}
    fake()  # neither command installed: every job UNKNOWN, nothing raised
    assert cluster.backend("slurm").states([job(1, "7")]) == {1: "UNKNOWN"}
    assert faked.called("sacct")


def test_states_over_clusters_asks_each_once_and_knows_no_other(fake, tmp_path):
    faked = fake(sacct="11|RUNNING\n")
    found = cluster.states([job(1, "11"), job(2, "12", tmp_path, name="local"), job(3, "13", name="mars")])
    assert found[1] == "RUNNING" and found[3] == "UNKNOWN"
    assert found[2] in ("FAILED", "UNKNOWN")  # pid 12 is no submitit controller
    assert len(faked.called("sacct")) == 1
    assert cluster.states([]) == {}


def test_a_job_whose_job_file_is_damaged_cannot_be_reached():
    damaged = Job(id=4, name="x", run_dir=Path("/r/4-x"), cluster="", cluster_job_id="", submitted_at=0.0,
                  problem="job.json: not JSON (Expecting value)")
    with pytest.raises(Failure, match=r"job 4: job.json: not JSON .*; which cluster job it is cannot be told"):
        cluster.of(damaged)
    with pytest.raises(Failure, match="its cluster 'mars' is none of slurm, local, debug"):
        cluster.of(job(5, "1", name="mars"))
    assert cluster.of(job(6, "1")).name == "slurm"


# --- SLURM: cancel, signals, limits, dry runs, detection ---


def test_scancel_failure_is_a_failure_with_its_message(fake):
    faked = fake(scancel=(1, "", "scancel: error: Kill job error on job id 77: Invalid job id specified\n"))
    backend = cluster.backend("slurm")
    with pytest.raises(Failure, match="scancel 77 failed: scancel: error: Kill job error on job id 77: Invalid"):
        backend.cancel(job(1, "77"))
    with pytest.raises(Failure, match="scancel --signal=USR2 77 failed: .*Invalid job id"):
        backend.signal_stop(job(1, "77"))
    fake(scancel="")
    backend.cancel(job(1, "77"))
    assert faked.calls[0] == ["scancel", "77"]


def test_scancel_missing_is_a_failure(fake):
    fake()
    with pytest.raises(Failure, match="scancel 5 failed: .*No such file"):
        cluster.backend("slurm").cancel(job(1, "5"))


PARTITIONS = """PartitionName=debug
   AllowGroups=ALL Default=NO QoS=N/A
   MaxNodes=UNLIMITED MaxTime=00:30:00 MinNodes=0

PartitionName=gpu
   AllowGroups=ALL Default=YES QoS=N/A
   MaxNodes=UNLIMITED MaxTime=2-12:00:00 MinNodes=0
   PreemptMode=REQUEUE GraceTime=60

PartitionName=long
   AllowGroups=ALL Default=NO QoS=N/A
   MaxNodes=UNLIMITED MaxTime=UNLIMITED MinNodes=0
"""


def max_time(text: str, partition: str | None) -> int:
    return slurm.parse_partition(text, partition).max_minutes


def test_partition_max_time_and_grace_time():
    default = slurm.parse_partition(PARTITIONS, None)  # the Default=YES block
    assert (default.name, default.max_minutes, default.grace_s) == ("gpu", (2 * 24 + 12) * 60, 60)
    one = PARTITIONS.split("\n\n")
    assert max_time(one[0], "debug") == 30 and slurm.parse_partition(one[0], "debug").grace_s == 0
    assert max_time(one[2], "long") == 0
    assert max_time("PartitionName=x\n   MaxTime=INFINITE\n", "x") == 0
    assert max_time("PartitionName=x\n   MaxTime=1-00:00:00\n", "x") == 24 * 60
    assert max_time(one[0] + "\n\n" + one[2], None) == 30  # no default block: the first
    assert max_time("PartitionName=x\n   State=UP\n", "x") == 0  # no MaxTime: unlimited
    for bad in ("", "PartitionName=x MaxTime=soon", "PartitionName=x GraceTime=-1"):
        with pytest.raises(ValueError):
            slurm.parse_partition(bad, "x")


def test_a_grace_time_too_short_for_the_checkpoint_is_a_warning():
    big = spec.build({"size": "7b", "cluster": "slurm"})  # ~108 GB to save at 1 GB/s
    requeue = slurm.parse_partition(PARTITIONS, None)  # PreemptMode=REQUEUE GraceTime=60
    assert "GraceTime 60 s, less than the ~108 s this job needs to save a checkpoint (107.8 GB)" in \
        submit.grace_warning(big, requeue)
    assert submit.grace_warning(spec.build({"size": "tiny", "cluster": "slurm"}), requeue) is None
    assert submit.grace_warning(big, slurm.parse_partition(PARTITIONS.split("\n\n")[0], "debug")) is None  # no preemption


def test_time_limit_asks_scontrol_and_says_what_to_do_when_it_cannot(fake):
    faked = fake(scontrol=PARTITIONS.split("\n\n")[1])
    assert cluster.SlurmBackend().time_limit("gpu") == 3600
    assert faked.calls == [["scontrol", "show", "partition", "gpu"]]
    fake(scontrol=(1, "", "slurm_load_partitions: Invalid partition name specified"))
    with pytest.raises(SubmitError, match="partition nope: slurm_load_partitions: Invalid partition .*; give --time"):
        cluster.SlurmBackend().time_limit("nope")
    fake(scontrol="PartitionName=x\n   MaxTime=soon\n")
    with pytest.raises(SubmitError, match="give --time"):
        cluster.SlurmBackend().time_limit("x")


def test_test_only_verdict(fake, tmp_path):
    faked = fake(sbatch=(0, "", "sbatch: Job 3 to start at 2026-12-03T05:00:00 using 16 processors on nodes n[1-2] "
                                "in partition debug\n"))
    verdict = cluster.SlurmBackend().test_only(tmp_path / "job.sbatch")
    assert verdict == ("sbatch: Job 3 to start at 2026-12-03T05:00:00 using 16 processors on nodes n[1-2] "
                       "in partition debug")
    assert faked.calls == [["sbatch", "--test-only", str(tmp_path / "job.sbatch")]]
    fake(sbatch=(1, "", "sbatch: error: Batch job submission failed: Requested node configuration is not available\n"
                        "more\n"))
    assert cluster.SlurmBackend().test_only(tmp_path / "job.sbatch").endswith("is not available more")
    fake(sbatch=(1, "", ""))
    assert cluster.SlurmBackend().test_only(tmp_path / "job.sbatch") == "exit code 1"


def test_detection(fake):
    fake(scontrol="Slurmctld(primary) at ctl is UP\n")
    assert cluster.detect() == "slurm"
    fake(scontrol=(1, "Slurmctld(primary) at ctl is DOWN\n", ""))
    assert cluster.detect() == "local"
    fake()  # no scontrol at all
    assert cluster.detect() == "local"


def test_live_jobs_one_id_per_array_element(fake):
    faked = fake(squeue="12_0|RUNNING\n12_1|PENDING\n12_2|COMPLETING\n13|COMPLETED\n14|REQUEUED\n")
    assert cluster.SlurmBackend().live_jobs() == {"12_0", "12_1", "12_2", "14"}
    assert "-r" in faked.calls[0] and "-u" in faked.calls[0]
    fake(squeue=(1, "", "squeue: error"))
    assert cluster.SlurmBackend().live_jobs() == set()


def test_slurm_executor_options_from_the_allocation(fake, tmp_path, monkeypatch):
    srun = tmp_path / "bin" / "srun"  # submitit's SlurmExecutor wants one on PATH; it is never run here
    srun.parent.mkdir()
    srun.write_text("#!/bin/sh\nexit 1\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{srun.parent}:{os.environ['PATH']}")
    faked = fake(scontrol=PARTITIONS.split("\n\n")[1])  # what `scontrol show partition gpu` prints
    s = spec.build({"size": "7b", "cluster": "slurm", "nodes": 2, "partition": "gpu", "account": "lab", "hold": True})
    allocation = submit.allocation(s, Site(setup=("module load cuda",), srun_args=("--mpi=none",)), "afterok:5")
    executor = cluster.backend("slurm").executor(allocation, tmp_path / "submitit")
    p = executor.parameters
    assert (p["nodes"], p["ntasks_per_node"], p["partition"], p["account"]) == (2, 1, "gpu", "lab")
    assert p["time"] == (2 * 24 + 12) * 60  # no --time: the partition's MaxTime
    assert faked.calls == [["scontrol", "show", "partition", "gpu"]]
    assert p["gres"] == "gpu:8" and p["dependency"] == "afterok:5" and p["setup"] == ["module load cuda"]
    assert p["srun_args"] == ["--kill-on-bad-exit=1", "--mpi=none"]
    assert p["additional_parameters"] == {"requeue": True, "hold": True} and p["signal_delay_s"] >= 120
    timed = spec.build({"size": "tiny", "cluster": "slurm", "time": "01:30:00"})
    executor = cluster.backend("slurm").executor(submit.allocation(timed, Site()), tmp_path / "s2")
    assert executor.parameters["time"] == 90 and len(faked.calls) == 1  # --time given: no scontrol


def test_local_executor_has_a_week_and_the_requeues(tmp_path):
    s = spec.build({"size": "tiny", "cluster": "local", "max_requeues": 3})
    executor = cluster.backend("local").executor(submit.allocation(s, Site()), tmp_path)
    assert executor.parameters["timeout_min"] == 7 * 24 * 60 and executor.max_num_timeout == 3
    array = cluster.backend("local").executor(Allocation(name="prepare-x", minutes=5), tmp_path)
    assert array.parameters["timeout_min"] == 5


# --- the local backend, with real processes ---


def spawn(*marks: str, child: str | None = None) -> subprocess.Popen:
    """A python process sleeping, its command line holding `marks` (as submitit's processes hold
    their module names); with `child`, it first starts that python code as its child."""
    code = "import subprocess, sys, time\n"
    if child:
        code += f"subprocess.Popen([sys.executable, '-c', {child!r}, 'submitit.core._submit'])\n"
    code += "time.sleep(120)\n"
    return subprocess.Popen([sys.executable, "-c", code, *marks])


def wait_for(probe, timeout: float = 20.0):
    deadline = time.time() + timeout
    while not (found := probe()):
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)
    return found


def test_kill_tree_ends_every_process_under_it():
    parent = subprocess.Popen(["bash", "-c", "sleep 120 & sleep 120 & wait"])
    try:
        children = wait_for(lambda: len(local.descendants(parent.pid)) == 2 and local.descendants(parent.pid))
        assert all(b"sleep" in local.cmdline(p) for p in children)
        local.kill_tree(parent.pid, grace_s=2)
        parent.wait(timeout=10)
        assert wait_for(lambda: all(local.exited(p) for p in children))
    finally:
        parent.kill()


def test_a_zombie_counts_as_exited_and_a_gone_pid_too():
    child = subprocess.Popen(["sleep", "0"])
    wait_for(lambda: local._proc_stat(child.pid) is None or local._proc_stat(child.pid)[0] == "Z")
    assert local.exited(child.pid)  # dead, not yet reaped
    child.wait()
    assert local.exited(child.pid) and local.cmdline(child.pid) == b""


def test_local_state_follows_the_controller_then_what_it_left(tmp_path):
    controller = spawn("submitit.local._local", str(tmp_path))
    try:
        j = job(1, str(controller.pid), tmp_path, name="local")
        backend = cluster.backend("local")
        assert backend.states([j]) == {1: "RUNNING"}
        assert not local.LocalHandle(str(controller.pid), tmp_path).done()
        assert local.LocalHandle(str(controller.pid), tmp_path / "other").done()  # another folder's controller
        assert list(backend.reattach([str(controller.pid), "999999999"], tmp_path)) == [str(controller.pid)]
        backend.cancel(j)
        controller.wait(timeout=10)
        assert backend.states([j]) == {1: "FAILED"}  # no result, no `finished` event
        (tmp_path / "submitit").mkdir()
        result = tmp_path / "submitit" / f"{controller.pid}_0_result.pkl"
        result.write_bytes(pickle.dumps(("success", "finished")))
        assert backend.states([j]) == {1: "COMPLETED"}
        result.write_bytes(pickle.dumps(("error", "Traceback ...")))
        assert backend.states([j]) == {1: "FAILED"}
        result.write_bytes(b"garbage")
        events.record(tmp_path, "finished", step=3)
        assert backend.states([j]) == {1: "COMPLETED"}
        events.record(tmp_path, "cancelled")
        assert backend.states([j]) == {1: "CANCELLED"}
        assert backend.states([job(2, "not-a-pid", tmp_path, name="local")]) == {2: "UNKNOWN"}
    finally:
        controller.kill()


def test_a_pid_that_is_no_controller_is_not_killed(tmp_path):
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        cluster.backend("local").cancel(job(1, str(bystander.pid), tmp_path, name="local"))
        time.sleep(0.2)
        assert bystander.poll() is None
    finally:
        bystander.kill()


def test_signal_stop_sends_usr2_to_the_task(tmp_path):
    flag = tmp_path / "usr2"
    task = (f"import signal, time, pathlib\n"
            f"signal.signal(signal.SIGUSR2, lambda *a: pathlib.Path({str(flag)!r}).write_text('got it'))\n"
            f"pathlib.Path({str(flag)!r} + '.ready').touch()\n"
            f"time.sleep(120)\n")
    controller = spawn("submitit.local._local", child=task)
    try:
        wait_for(lambda: Path(f"{flag}.ready").exists())
        cluster.backend("local").signal_stop(job(1, str(controller.pid), tmp_path, name="local"))
        assert wait_for(lambda: flag.exists() and flag.read_text() == "got it")
        local.kill_tree(controller.pid, grace_s=1)
        controller.wait(timeout=10)
        with pytest.raises(Failure, match="job 1: its local task process is gone"):
            cluster.backend("local").signal_stop(job(1, str(controller.pid), tmp_path, name="local"))
    finally:
        controller.kill()


def test_detached_stdio_gives_back_our_streams(capfd):
    """What runs meanwhile (sbatch, the local controller submitit starts) holds none of our fds."""
    with cluster.detached_stdio():
        os.write(1, b"swallowed\n")
        subprocess.run(["sh", "-c", "echo swallowed too; echo and this >&2"])
    os.write(1, b"kept\n")
    assert capfd.readouterr() == ("kept\n", "")


def test_states_of_jobs_whose_run_dir_is_gone_are_unknown_or_what_the_cluster_says(tmp_path):
    gone = job(1, "999999999", tmp_path / "vanished", name="local")
    assert cluster.states([gone]) == {1: "FAILED"}  # no controller, nothing left: what `status` said before


# --- SLURM: what a signal means (preemption, cancel, the controller's requeue) ---

# `scontrol show job -o ID` at the SIGTERM of each, as SLURM 22.05 answered (trimmed).
PREEMPTED = "JobId=7 JobName=x JobState=SIGNALING Reason=None Requeue=1 Restarts=0 PreemptTime=2026-12-03T08:40:24"
CANCELLED = "JobId=3 JobName=x JobState=COMPLETING Reason=None Requeue=1 Restarts=0 PreemptTime=None"
NODE_FAILED = "JobId=4 JobName=x JobState=COMPLETING Reason=None Requeue=1 Restarts=1 PreemptTime=None"
SECOND_ATTEMPT_CANCELLED = "JobId=7 JobState=CANCELLED Restarts=1 PreemptTime=2026-12-03T08:40:24"


@pytest.mark.parametrize("text, attempt, verdict", [
    (PREEMPTED, 0, "preempted"), (CANCELLED, 0, "cancelled"), (NODE_FAILED, 0, "requeued"),
    (SECOND_ATTEMPT_CANCELLED, 1, "cancelled"),  # an earlier preemption does not make a cancel a pause
])
def test_the_controllers_record_tells_a_preemption_from_a_cancel(text, attempt, verdict):
    assert slurm.parse_job_record(text).verdict(attempt) == verdict


def test_job_record_when_scontrol_cannot_say(fake):
    fake(scontrol=(1, "", "slurm_load_jobs error: Invalid job id specified"))
    assert slurm.job_record("99") is None
    fake(scontrol="nothing like a job")
    assert slurm.job_record("99") is None


def test_an_unreadable_record_is_a_pause_and_the_local_cluster_sigterm_a_cancel(fake, monkeypatch):
    import signal

    from llamajobs import launcher

    fake(scontrol=(1, "", "no controller"))
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    assert launcher.verdict(signal.SIGTERM) == "unknown" and "unknown" in launcher.PAUSE
    assert launcher.verdict(signal.SIGUSR2) == "time limit"
    fake(scontrol=PREEMPTED)
    assert launcher.verdict(signal.SIGUSR2) == "preempted"  # send_user_signal: USR2 at preemption
    monkeypatch.delenv("SLURM_JOB_ID")
    assert launcher.verdict(signal.SIGTERM) == "cancelled"


def test_past_attempts_name_the_node_that_failed(fake):
    faked = fake(sacct="NODE_FAIL|n[1-2]|2026-12-03T08:42:16|2026-12-03T08:42:20\n"
                       "RUNNING|n[1-2]|2026-12-03T08:42:37|Unknown\n",
                 scontrol="n1\nn2\n",
                 sacctmgr="|2026-12-03T08:40:14|Cluster Registered TRES\nn2|2026-12-03T08:42:20|llamajobs-test\n"
                          "n1|2026-12-03T09:00:00|later\n")
    past = slurm.past_attempts("4")
    assert [(a.state, a.nodes, a.failed_nodes) for a in past] == [("NODE_FAIL", ("n1", "n2"), ("n2",)),
                                                                 ("RUNNING", ("n1", "n2"), ())]
    assert faked.called("sacctmgr")[0][:4] == ["sacctmgr", "-n", "-P", "show"]


def test_attempts_from_the_events():
    history = [
        {"event": "attempt", "hosts": "n[1-2]", "previous_state": None, "failed_nodes": []},
        {"event": "started", "hosts": ["vm"]},
        {"event": "signalled", "verdict": "preempted", "signal": "SIGTERM"},
        {"event": "stopped", "step": 23},
        {"event": "signalled", "verdict": "requeued", "signal": "SIGTERM", "node": 1},  # the requeue's own kill
        {"event": "attempt", "hosts": "n[1-2]", "previous_state": "REQUEUED", "failed_nodes": []},
        {"event": "started", "hosts": ["vm"]},
        {"event": "resumed", "step": 23},
        {"event": "signalled", "verdict": "requeued", "signal": "SIGTERM"},
        {"event": "attempt", "hosts": "n[1,3]", "previous_state": "NODE_FAIL", "failed_nodes": ["n2"]},
        {"event": "started", "hosts": ["vm"]},
        {"event": "resumed", "step": 40},
        {"event": "finished", "step": 120},
    ]
    runs = events.attempts([{"time": float(i), **e} for i, e in enumerate(history)])
    assert [(a.number, a.nodes, a.resumed_step, a.end) for a in runs] == [
        (0, "n[1-2]", None, "stopped at step 23 (preempted)"),
        (1, "n[1-2]", 23, "node failure (n2)"),
        (2, "n[1,3]", 40, "finished at step 120")]
    local = events.attempts([{"time": 0.0, "event": "started", "hosts": ["box"]}])
    assert [(a.nodes, a.end) for a in local] == [("box", "running")]


def test_the_sites_keep_out_nodes_join_the_jobs_exclude(tmp_path):
    site = Site(keep_out=("n7", "n9"))
    assert site.excluded(None) == "n7,n9" and site.excluded("n1,n7") == "n1,n7,n9" and Site().excluded(None) is None
    s = spec.build({"cluster": "slurm", "procs_per_node": 1, "global_batch": 4, "exclude": "n1"})
    assert submit.allocation(s, site).exclude == "n1,n7,n9"
    from llamajobs import render
    render.render(s, site, tmp_path)
    script = (tmp_path / "job.sbatch").read_text()
    assert script.count("--exclude") == 1 and "#SBATCH --exclude=n1,n7,n9\n" in script
    assert "#SBATCH --requeue\n" in script and "#SBATCH --signal=USR2@" in script
    assert f"-m llamajobs.launcher {tmp_path}" in script


def test_keep_out_in_site_yaml(tmp_path):
    from llamajobs import site as site_lib

    (tmp_path / "site.yaml").write_text("keep_out: [n3]\npartition: low\n")
    loaded, defaults = site_lib.load(tmp_path / "site.yaml")
    assert loaded.keep_out == ("n3",) and defaults == {"partition": "low"}


def test_the_launcher_shields_launch_sh_from_sigterm_and_a_cancel_kills_its_whole_tree(tmp_path, monkeypatch):
    """SIGTERM ignored down the tree (a preemption must not kill the workers), and a cancel kills
    every process under launch.sh, a worker in a session of its own (as torchrun starts them) too."""
    import signal

    from llamajobs.launcher import NodeRun

    for name in ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "launch.sh").write_text('setsid sleep 300 &\necho $! > "$(dirname "$0")/worker"\nwait\n')
    run = NodeRun(str(tmp_path), stop_wait_s=5)
    run.start(dict(os.environ))
    worker = int(wait_for(lambda: (tmp_path / "worker").exists() and (tmp_path / "worker").read_text().strip()))
    os.kill(worker, signal.SIGTERM)
    time.sleep(0.5)
    assert not local.exited(worker)  # ignored
    assert run.on_signal(signal.SIGTERM) is None and run.stopping == "cancelled"  # (no SLURM: `llamajobs cancel`)
    assert run.process.wait(timeout=10) == -signal.SIGKILL
    wait_for(lambda: local.exited(worker))
    assert [e["verdict"] for e in events.read(tmp_path) if e["event"] == "signalled"] == ["cancelled"]
