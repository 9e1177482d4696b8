"""Time limits and preemption are pauses: a run interrupted twice ends exactly like one never
interrupted (CPU: bitwise losses and weights). Real submitit, real torchrun, real SLURM."""

from __future__ import annotations

import json
import random
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llamajobs import events
from tests.conftest import run_cli, status

pytestmark = pytest.mark.slow

STEPS = 120
TINY = ["--size", "tiny", "--strategy", "fsdp", "--procs-per-node", "2", "--seq-len", "64", "--global-batch", "8",
        "--micro-batch", "2", "--lr", "3e-3", "--warmup-ratio", "0.1", "--max-steps", str(STEPS),
        "--checkpoint-every-steps", "1000"]


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line) for line in lines]
    assert len(steps) == len({m["step"] for m in steps}), "a step was logged twice"
    return {m["step"]: m["loss"] for m in steps}


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted((run_dir / "final").glob("*.safetensors")) for k, v in load_file(f).items()}


# What these jobs may end as. Not NODE_FAIL, PREEMPTED or COMPLETING: between such an end and the
# requeued attempt (or while the steps complete) a job passes through states that are not its last.
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY")


def wait(env, job_id: int, until, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while not until(row := status(env, job_id)):
        assert time.time() < deadline, f"job {job_id}: {row}"
        time.sleep(0.3)
    return row


def submit_straight(env, cluster_args: list[str]) -> dict:
    """The spec run uninterrupted: submitted, not waited for."""
    return json.loads(run_cli("submit", *cluster_args, *TINY, "--name", "straight", "--json", env=env,
                              check=True).stdout)


def straight_run(env, cluster_args: list[str]) -> dict:
    """The spec run uninterrupted: its final row."""
    return wait(env, submit_straight(env, cluster_args)["id"], lambda r: r["state"] in FINAL)


def interrupted_twice(env, cluster_args: list[str], second_interrupt, reference: dict | None = None) -> tuple[dict, dict]:
    """Submit, interrupt with `llamajobs requeue`, then with `second_interrupt`, let it finish;
    also run the same spec uninterrupted (unless a reference run is given), at the same time: its
    floats do not depend on what else the cores run. Returns both final rows."""
    reference = reference or submit_straight(env, cluster_args)
    job = json.loads(run_cli("submit", *cluster_args, *TINY, "--name", "twice", "--json", env=env, check=True).stdout)
    wait(env, job["id"], lambda r: (r["step"] or 0) >= 10)
    run_cli("requeue", str(job["id"]), env=env, check=True)
    wait(env, job["id"], lambda r: r["state"] == "RUNNING" and (r["step"] or 0) > _stopped_at(job, 0) + 10)
    second_interrupt(job)
    row = wait(env, job["id"], lambda r: r["state"] in FINAL, timeout=400)
    return wait(env, reference["id"], lambda r: r["state"] in FINAL), row


def _stopped_at(job: dict, index: int) -> int:
    stops = [e["step"] for e in events.read(Path(job["run_dir"])) if e["event"] == "stopped"]
    return stops[index] if len(stops) > index else 10**9


def check_identical(reference: dict, row: dict) -> None:
    assert reference["state"] == row["state"] == "COMPLETED"
    run_dir = Path(row["run_dir"])
    history = events.read(run_dir)
    stops = [e["step"] for e in history if e["event"] == "stopped"]
    assert len(stops) == 2 and 0 < stops[0] < stops[1] < STEPS, stops
    assert [e["step"] for e in history if e["event"] == "resumed"] == stops
    assert len([e for e in history if e["event"] == "requeued"]) == 2
    straight, twice = losses(Path(reference["run_dir"])), losses(run_dir)
    assert sorted(twice) == list(range(1, STEPS + 1))
    assert twice == straight  # bitwise: the same floats at every step
    a, b = weights(Path(reference["run_dir"])), weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def local_env(tmp_path) -> dict[str, str]:
    return {"LLAMAJOBS_HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache")}


def test_local_run_interrupted_twice_ends_as_if_never_interrupted(local_env):
    def time_limit(job: dict) -> None:
        # What submitit's local controller does near the time limit: USR2 to the task.
        from llamajobs import cluster, registry
        reg = registry.Registry(Path(local_env["LLAMAJOBS_HOME"]) / "runs")
        cluster.backend("local").signal_stop(reg.get(job["id"]))

    reference, row = interrupted_twice(local_env, ["--cluster", "local"], time_limit)
    check_identical(reference, row)



# --- the real SLURM cluster: partitions low (preempted, GraceTime) and high (preempts low) ---

SLURM = ["--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--time", "00:20:00"]


@pytest.fixture(scope="module")
def slurm_env(slurm, tmp_path_factory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("slurm-preemption")
    return {"LLAMAJOBS_HOME": str(home / "home"), "XDG_CACHE_HOME": str(home / "cache")}


@pytest.fixture(scope="module")
def slurm_reference(slurm_env) -> dict:
    """One uninterrupted run on SLURM that every interrupted run of this module is compared with."""
    row = straight_run(slurm_env, SLURM)
    assert row["state"] == "COMPLETED", row
    return row


def preempt(node: str = "n1") -> None:
    """A job on partition high that needs all of `node`: the job on low there is preempted."""
    subprocess.run(["sbatch", "-p", "high", "--exclusive", "-N1", "-w", node, "-o", "/dev/null", "--wrap", "sleep 2"],
                   check=True, capture_output=True)


def show(history: list[dict]) -> str:
    """The events, one a line, seconds from the first (for the test's output)."""
    t0 = history[0]["time"] if history else 0
    return "\n".join(f"{e['time'] - t0:8.2f} {e['event']} " + " ".join(
        f"{k}={v}" for k, v in e.items() if k not in ("time", "event", "host", "path")) for e in history)


def seconds_to_save(history: list[dict], stop: int) -> float:
    """From the launcher's `signalled` to the stop step's committed checkpoint."""
    signalled = next(e["time"] for e in history if e["event"] == "signalled")
    saved = next(e["time"] for e in history if e["event"] == "checkpointed" and e["step"] == stop)
    return saved - signalled


def same_as_reference(reference: dict, run_dir: Path, steps: int = STEPS) -> None:
    """Every step logged once (a resume drops the metrics of the steps it redoes), each loss bitwise
    the uninterrupted run's, and the same final weights."""
    logged = losses(run_dir)
    assert sorted(logged) == list(range(1, steps + 1))
    assert logged == losses(Path(reference["run_dir"]))
    a, b = weights(Path(reference["run_dir"])), weights(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slurm
def test_slurm_run_interrupted_twice_ends_as_if_never_interrupted(slurm_env, slurm_reference):
    def time_limit(job: dict) -> None:
        # The signal SLURM sends ahead of the time limit, without waiting for one.
        subprocess.run(["scancel", "--signal=USR2", job["cluster_job_id"]], check=True)

    reference, row = interrupted_twice(slurm_env, SLURM, time_limit, slurm_reference)
    check_identical(reference, row)
    starts = [e for e in events.read(Path(row["run_dir"])) if e["event"] == "started"]
    assert len(starts) == 3 and all(e["world_size"] == 4 for e in starts)


@pytest.mark.slurm
def test_slurm_preemption_and_a_node_failure_are_pauses(slurm, slurm_env, slurm_reference):
    """Preempted once at a random step (SIGTERM, GraceTime): saved at the next step boundary, requeued,
    resumed there, no step trained twice. Then node n2 goes down: the job is requeued by SLURM and
    resumes from its last periodic checkpoint. It ends COMPLETED with the uninterrupted run's losses
    and weights, and `status` tells the three attempts apart."""
    every = 20
    args = [*SLURM, "--partition", "low", *TINY[:-1], str(every), "--name", "paused"]
    job = json.loads(run_cli("submit", *args, "--json", env=slurm_env, check=True).stdout)
    run_dir = Path(job["run_dir"])
    at = random.Random().randint(3, every)
    print(f"preempting at step >= {at}")
    wait(slurm_env, job["id"], lambda r: (r["step"] or 0) >= at)
    preempt()
    wait(slurm_env, job["id"], lambda r: any(e["event"] == "resumed" for e in events.read(run_dir)))
    stop = next(e["step"] for e in events.read(run_dir) if e["event"] == "stopped")
    # past the next periodic checkpoint, so the node failure has one to resume from
    periodic = (stop // every + 1) * every
    wait(slurm_env, job["id"], lambda r: (r["step"] or 0) >= periodic + 3)
    subprocess.run(["scontrol", "update", "nodename=n2", "state=down", "reason=llamajobs-test"], check=True)
    last_logged = max(losses(run_dir))  # (the resume drops the metrics of the steps it redoes)
    row = wait(slurm_env, job["id"], lambda r: r["state"] in FINAL, timeout=400)
    history = events.read(run_dir)
    print(show(history))
    assert row["state"] == "COMPLETED", row

    signalled = [e for e in history if e["event"] == "signalled" and e["verdict"] == "preempted"]
    assert len(signalled) == 1 and signalled[0]["signal"] == "SIGTERM" and signalled[0]["node"] == 0
    assert seconds_to_save(history, stop) < slurm.grace_s
    resumed = [e["step"] for e in history if e["event"] == "resumed"]
    assert resumed[0] == stop and resumed[1] >= periodic and resumed[1] % every == 0
    print(f"preempted: SIGTERM, saved step {stop} {seconds_to_save(history, stop):.2f} s after the signal, "
          f"no step redone; node failure: resumed at {resumed[1]}, steps {resumed[1] + 1}-{last_logged} redone "
          f"(and the one in flight)")
    same_as_reference(slurm_reference, run_dir)

    runs = events.attempts(history)
    assert [a.resumed_step for a in runs] == [None, stop, resumed[1]]
    assert runs[0].end == f"stopped at step {stop} (preempted)"
    assert runs[1].end.startswith("node failure (n2")
    assert runs[2].end == f"finished at step {STEPS}"
    shown = run_cli("status", str(job["id"]), env=slurm_env, check=True).stdout
    assert "node failure (n2)" in shown and f"resumed at step {resumed[1]}" in shown


@pytest.mark.slurm
def test_slurm_scancel_cancels_without_a_save_or_requeue(slurm_env):
    job = json.loads(run_cli("submit", *SLURM, "--partition", "low", *TINY, "--name", "cancelled", "--json",
                             env=slurm_env, check=True).stdout)
    run_dir = Path(job["run_dir"])
    wait(slurm_env, job["id"], lambda r: (r["step"] or 0) >= 3)
    asked = time.time()
    subprocess.run(["scancel", job["cluster_job_id"]], check=True)
    row = wait(slurm_env, job["id"], lambda r: r["state"] in FINAL, timeout=60)
    assert row["state"] == "CANCELLED", row
    print(f"scancel: CANCELLED {time.time() - asked:.1f} s after scancel")
    time.sleep(12)  # longer than a requeued job waits to start again (cred_expire 10 s + scheduling)
    assert status(slurm_env, job["id"])["state"] == "CANCELLED"
    queued = subprocess.run(["squeue", "-h", "-j", job["cluster_job_id"]], capture_output=True, text=True).stdout
    assert queued.strip() == ""
    history = events.read(run_dir)
    assert {e["verdict"] for e in history if e["event"] == "signalled"} == {"cancelled"}
    assert not [e for e in history if e["event"] in ("stopped", "requeued", "resumed", "finished")]


@pytest.fixture
def send_user_signal(slurm):
    """The cluster as a site with send_user_signal configures it (SlurmctldParameters=preempt_send_user_signal
    in SLURM 22.05, PreemptParameters=send_user_signal in later ones): a preempted job gets its --signal
    (USR2) instead of SIGTERM. Restored afterwards."""
    original = slurm.conf.read_text()
    assert "SlurmctldParameters" not in original
    slurm.conf.write_text(original + "SlurmctldParameters=preempt_send_user_signal\n")
    subprocess.run(["scontrol", "reconfigure"], check=True)
    yield
    slurm.conf.write_text(original)
    subprocess.run(["scontrol", "reconfigure"], check=True)


@pytest.mark.slurm
def test_hand_submitted_job_sbatch_pauses_at_preemption_with_send_user_signal(slurm, slurm_env, slurm_reference,
                                                                              send_user_signal, tmp_path):
    """`llamajobs render` then `sbatch job.sbatch`, as a user who submits by hand, on a site that sends
    the job's --signal at preemption: the launcher (no submitit here) sees the preemption in the
    controller's record, the workers save, the launcher requeues the job, and it ends COMPLETED like
    the uninterrupted run. (SIGTERM at preemption takes the same launcher path: the test above.)"""
    run_dir = tmp_path / "by-hand"
    run_cli("render", *SLURM, "--partition", "low", *TINY, "--name", "by-hand", "--out", str(run_dir),
            env=slurm_env, check=True)
    script = (run_dir / "job.sbatch").read_text()
    assert "#SBATCH --requeue" in script and "#SBATCH --signal=USR2@" in script
    job_id = subprocess.run(["sbatch", "--parsable", str(run_dir / "job.sbatch")], check=True, capture_output=True,
                            text=True).stdout.strip()

    def sacct_state() -> str:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True,
                             text=True).stdout.split()
        return out[-1] if out else "PENDING"

    def until(predicate, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while not predicate():
            assert time.time() < deadline, (sacct_state(), show(events.read(run_dir)))
            time.sleep(0.5)

    at = random.Random().randint(3, 40)
    until(lambda: (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= at)
    preempt()
    until(lambda: any(e["event"] == "finished" for e in events.read(run_dir)), timeout=400)
    until(lambda: sacct_state() == "COMPLETED", timeout=60)
    history = events.read(run_dir)
    print(show(history))
    stop = next(e["step"] for e in history if e["event"] == "stopped")
    assert [e["step"] for e in history if e["event"] == "resumed"] == [stop]
    assert [(e["signal"], e["verdict"]) for e in history if e["event"] == "signalled" and e["node"] == 0][0] == (
        "SIGUSR2", "preempted")
    print(f"job.sbatch, send_user_signal: saved step {stop} {seconds_to_save(history, stop):.2f} s after USR2")
    assert seconds_to_save(history, stop) < slurm.grace_s
    same_as_reference(slurm_reference, run_dir)


# --- the same under DeepSpeed's own launcher (deepspeed.launcher.runner --no_ssh, then launch.py) ---

DS_STEPS = 40
# One node (after SLURM's two): launch.py's handler is the same on every node, the coordinated save
# across nodes is the torchrun tests', and each node's DeepSpeed start costs about a minute on 2 cores.
DS = ["--nodes", "1", "--size", "tiny", "--strategy", "ds-zero3", "--launcher", "deepspeed", "--procs-per-node", "2",
      "--seq-len", "64",
      "--global-batch", "8", "--micro-batch", "2", "--lr", "3e-3", "--warmup-ratio", "0.1", "--max-steps", str(DS_STEPS),
      "--checkpoint-every-steps", "1000"]


def launcher_logs(run_dir: Path) -> str:
    return "".join(f.read_text(errors="replace") for f in sorted((run_dir / "submitit").glob("*_log.*")))


@pytest.mark.slurm
def test_slurm_deepspeed_launcher_preemption_is_a_pause(slurm, slurm_env):
    """--launcher deepspeed: DeepSpeed's launch.py installs its own SIGTERM handler, which kills the
    workers. SLURM signals every process of the step, so at preemption it must never run: the workers
    save the stop step on every rank, the job is requeued and ends with the losses and weights of an
    uninterrupted DeepSpeed run. (A scancel takes the launcher's one kill path, whatever it launched:
    test_slurm_scancel_cancels_without_a_save_or_requeue; not repeated here, each DeepSpeed start
    costs about a minute on 2 cores.)"""
    submit = lambda *args: json.loads(run_cli("submit", *SLURM, *DS, *args, "--json", env=slurm_env,  # noqa: E731
                                              check=True).stdout)
    reference = submit("--name", "ds-straight")
    reference = wait(slurm_env, reference["id"], lambda r: r["state"] in FINAL)
    assert reference["state"] == "COMPLETED", reference

    job = submit("--partition", "low", "--name", "ds-paused")
    run_dir = Path(job["run_dir"])
    at = random.Random().randint(3, 15)
    print(f"preempting at step >= {at}")
    wait(slurm_env, job["id"], lambda r: (r["step"] or 0) >= at)
    preempt()
    row = wait(slurm_env, job["id"], lambda r: r["state"] in FINAL, timeout=400)
    history = events.read(run_dir)
    print(show(history))
    assert row["state"] == "COMPLETED", (row, launcher_logs(run_dir)[-4000:])
    signalled = [e for e in history if e["event"] == "signalled" and e["verdict"] == "preempted"]
    assert len(signalled) == 1 and signalled[0]["signal"] == "SIGTERM" and signalled[0]["node"] == 0
    stop = next(e["step"] for e in history if e["event"] == "stopped")
    assert [e["step"] for e in history if e["event"] == "resumed"] == [stop]  # 0 steps redone
    assert len([e for e in history if e["event"] == "requeued"]) == 1
    saved_in = seconds_to_save(history, stop)
    assert saved_in < slurm.grace_s
    print(f"deepspeed, preempted: SIGTERM, saved step {stop} on every rank {saved_in:.2f} s after the signal, "
          f"no step redone")
    same_as_reference(reference, run_dir, DS_STEPS)
    # DeepSpeed's launch.py ran (it logs each worker it spawns) and never took the SIGTERM (it would
    # have logged killing its workers)
    logs = launcher_logs(run_dir)
    assert "spawned with command" in logs and "received SIGTERM" not in logs and "Killing subprocess" not in logs

