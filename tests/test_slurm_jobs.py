"""End to end on the real SLURM cluster: slurmctld, two slurmd nodes with fake GPUs, slurmdbd for
sacct, submitit's SLURM executor, torchrun across the two nodes. Nothing here is mocked."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from llamajobs import events
from llamajobs.cluster.local import cmdline
from tests.conftest import debug_section, run_cli, status

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TWO_NODES = ["--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--procs-per-node", "2", "--size", "tiny",
             "--strategy", "fsdp", "--seq-len", "64", "--global-batch", "8", "--micro-batch", "2", "--lr", "3e-3",
             "--time", "00:10:00"]


@pytest.fixture(scope="module")
def env(slurm, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("slurm-runs")
    return {"LLAMAJOBS_HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "cache")}


def submit(env, *args: str) -> dict:
    return json.loads(run_cli("submit", *TWO_NODES, *args, "--json", env=env, check=True).stdout)


def wait_state(env, job_id: int, states: set[str], timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while (row := status(env, job_id))["state"] not in states:
        assert time.time() < deadline, f"job {job_id} still {row['state']} after {timeout} s"
        time.sleep(1)
    return row


@pytest.fixture(scope="module")
def chained(env, tmp_path_factory) -> dict:
    """A 2-node job, and a second queued behind it with --after that crashes at step 2: one pair of
    launches serves the completion, the chain and the crash assertions."""
    crash = tmp_path_factory.mktemp("crash") / "crash.yaml"  # (JSON is YAML) the debug section of its spec.json
    crash.write_text(json.dumps({"debug": debug_section("crash:2")}))
    first = submit(env, "--max-steps", "8", "--name", "two-nodes")
    second = submit(env, "--max-steps", "6", "--name", "crash", "--after", str(first["id"]), "--config", str(crash))
    wait_state(env, first["id"], {"RUNNING", "COMPLETED", "FAILED"})
    queued_behind = status(env, second["id"])["state"]
    first_row = wait_state(env, first["id"], {"COMPLETED", "FAILED", "CANCELLED"})
    second_row = wait_state(env, second["id"], {"COMPLETED", "FAILED", "CANCELLED"})
    return {"first": first, "second": second, "first_row": first_row, "second_row": second_row,
            "second_while_first_ran": queued_behind}


def test_two_node_job_completes_with_four_workers(chained):
    row = chained["first_row"]
    assert row["state"] == "COMPLETED" and row["cluster"] == "slurm"
    assert (row["step"], row["total_steps"]) == (8, 8) and row["tokens_per_s"] > 0
    history = events.read(Path(row["run_dir"]))
    started = [e for e in history if e["event"] == "started"]
    assert started and started[0]["world_size"] == 4
    assert (Path(row["run_dir"]) / "final" / "config.json").exists()


def test_chained_job_starts_only_after_its_predecessor(chained):
    assert chained["second_while_first_ran"] == "PENDING"
    first = events.read(Path(chained["first_row"]["run_dir"]))
    second = events.read(Path(chained["second_row"]["run_dir"]))
    first_end = next(e["time"] for e in first if e["event"] == "finished")
    second_start = next(e["time"] for e in second if e["event"] == "started")
    assert second_start > first_end


def test_crashing_worker_shows_failed_with_the_log(env, chained):
    row = chained["second_row"]
    assert row["state"] == "FAILED"
    detail = run_cli("status", str(chained["second"]["id"]), env=env, check=True).stdout
    log = Path(detail.split("first error's log: ")[1].split()[0])
    assert "injected fault at step 2" in log.read_text()
    # srun ends every node's launcher when one fails (a rank hung outside a collective would not time out)
    (script,) = Path(row["run_dir"]).glob("**/*_submission.sh")
    assert "--kill-on-bad-exit=1" in next(line for line in script.read_text().splitlines() if line.startswith("srun"))


def workers_of(run_dir: str) -> list[int]:
    """The worker processes of a job (both nodes are this host): `python -m llamajobs.worker RUN_DIR`,
    not the torchrun agents that started them."""
    found = []
    for entry in Path("/proc").iterdir():
        command = cmdline(int(entry.name)) if entry.name.isdigit() else b""
        if b"llamajobs.worker" in command and run_dir.encode() in command and b"torch.distributed.run" not in command:
            found.append(int(entry.name))
    return found


def test_eta_and_stalled_of_a_running_job(env):
    """One 2-node job: its ETA at step 20 against its real end, and its workers stopped with SIGSTOP
    turn it STALLED while SLURM still says RUNNING; SIGCONT lets it finish (the stop's length is
    added to the predicted end)."""
    job = submit(env, "--max-steps", "150", "--name", "eta-stall")
    deadline = time.time() + 240
    while (row := status(env, job["id"]))["step"] is None or row["step"] < 20:
        assert row["state"] in ("PENDING", "RUNNING") and time.time() < deadline, row
        time.sleep(0.5)
    assert row["state"] == "RUNNING" and row["eta_s"] > 0, row
    eta, predicted_at = row["eta_s"], time.time()
    predicted_end = predicted_at + eta
    workers = workers_of(job["run_dir"])
    assert len(workers) == 4
    stopped = time.time()
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(3)
        quick = {**env, "LLAMAJOBS_STALL_S": "2"}
        row = json.loads(run_cli("status", str(job["id"]), "--json", env=quick, check=True).stdout)
        assert row["state"] == "STALLED" and row["last_metric_age_s"] > 2
        assert "STALLED" in run_cli("status", env=quick, check=True).stdout
        assert status(env, job["id"])["state"] == "RUNNING"  # the default threshold is minutes
    finally:
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
    paused = time.time() - stopped
    assert wait_state(env, job["id"], {"COMPLETED", "FAILED", "CANCELLED"})["state"] == "COMPLETED"
    ended = next(e["time"] for e in events.read(Path(job["run_dir"])) if e["event"] == "finished")
    left = ended - paused - predicted_at  # what the ETA had to predict, the stop taken out
    # Within 3 s or half the time that was left (as on the local cluster).
    assert abs(predicted_end + paused - ended) < max(3.0, 0.5 * left), f"predicted {eta:.1f} s, took {left:.1f} s"


def test_cancelled_job_shows_cancelled(env):
    job = submit(env, "--max-steps", "100000", "--name", "long")
    deadline = time.time() + 240
    while status(env, job["id"])["step"] is None:
        assert time.time() < deadline, "no step logged"
        time.sleep(1)
    run_cli("cancel", str(job["id"]), env=env, check=True)
    wait_state(env, job["id"], {"CANCELLED"}, timeout=60)


def test_more_gpus_than_a_node_has_is_refused_at_submit(env):
    def ids() -> list[int]:
        return [j["id"] for j in json.loads(run_cli("status", "--json", "--all", env=env, check=True).stdout)["jobs"]]

    def run_dirs() -> list[str]:
        runs = Path(env["LLAMAJOBS_HOME"]) / "runs"
        return sorted(d.name for d in runs.iterdir() if not d.name.startswith(".")) if runs.is_dir() else []

    ids_before, dirs_before = ids(), run_dirs()
    result = run_cli("submit", *TWO_NODES, "--gpus-per-node", "9", "--max-steps", "2", env=env)
    # Refused before sbatch (whose own "Requested node configuration is not available" names no value),
    # from the partition's nodes as the real controller reports them.
    assert result.returncode == 2
    assert "--gpus-per-node 9" in result.stderr and "at most 8 GPUs each" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # the refused job is registered nowhere and leaves no run dir behind
    assert ids() == ids_before and run_dirs() == dirs_before


def test_dry_run_asks_sbatch_and_registers_nothing(env):
    before = json.loads(run_cli("status", "--json", "--all", env=env, check=True).stdout)["jobs"]
    result = run_cli("submit", *TWO_NODES, "--dry-run", env=env, check=True)
    assert "#SBATCH --nodes=2" in result.stdout
    assert "sbatch --test-only: sbatch: Job" in result.stderr and "to start at" in result.stderr
    assert json.loads(run_cli("status", "--json", "--all", env=env, check=True).stdout)["jobs"] == before


def test_twenty_concurrent_submits_and_status_calls_lose_nothing(env):
    """20 `submit --hold` (queued, never started) and 5 `status` at once against one runs directory."""
    import concurrent.futures
    import subprocess

    def one_submit(i: int):
        return run_cli("submit", *TWO_NODES, "--max-steps", "2", "--hold", "--name", f"held{i}", "--json", env=env)

    with concurrent.futures.ThreadPoolExecutor(max_workers=25) as pool:
        submits = [pool.submit(one_submit, i) for i in range(20)]
        statuses = [pool.submit(run_cli, "status", "--json", env=env) for _ in range(5)]
        results = [f.result() for f in submits]
        for f in statuses:
            assert f.result().returncode == 0, f.result().stderr
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results if r.returncode]
    jobs = [json.loads(r.stdout) for r in results]
    assert len({j["id"] for j in jobs}) == 20 and len({j["run_dir"] for j in jobs}) == 20
    assert len({j["cluster_job_id"] for j in jobs}) == 20
    listed = {j["id"]: j for j in json.loads(run_cli("status", "--json", "--all", env=env, check=True).stdout)["jobs"]}
    for j in jobs:
        assert listed[j["id"]]["state"] == "PENDING" and listed[j["id"]]["run_dir"] == j["run_dir"]
    subprocess.run(["scancel", *[j["cluster_job_id"] for j in jobs]], check=True)
