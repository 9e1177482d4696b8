"""Time limits and preemption are pauses: a run interrupted twice ends exactly like one never
interrupted (CPU: bitwise losses and weights). Real submitit, real torchrun, real SLURM."""

from __future__ import annotations

import json
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


def wait(env, job_id: int, until, timeout: float = 300) -> dict:
    deadline = time.time() + timeout
    while not until(row := status(env, job_id)):
        assert time.time() < deadline, f"job {job_id}: {row}"
        time.sleep(0.3)
    return row


def interrupted_twice(env, cluster_args: list[str], second_interrupt) -> tuple[dict, dict]:
    """Submit, interrupt with `llamajobs requeue`, then with `second_interrupt`, let it finish;
    also run the same spec uninterrupted. Returns both final rows."""
    reference = json.loads(run_cli("submit", *cluster_args, *TINY, "--name", "straight", "--json", env=env,
                                   check=True).stdout)
    wait(env, reference["id"], lambda r: r["state"] not in ("PENDING", "RUNNING"))
    job = json.loads(run_cli("submit", *cluster_args, *TINY, "--name", "twice", "--json", env=env, check=True).stdout)
    wait(env, job["id"], lambda r: (r["step"] or 0) >= 10)
    run_cli("requeue", str(job["id"]), env=env, check=True)
    wait(env, job["id"], lambda r: r["state"] == "RUNNING" and (r["step"] or 0) > _stopped_at(job, 0) + 10)
    second_interrupt(job)
    row = wait(env, job["id"], lambda r: r["state"] not in ("PENDING", "RUNNING", "REQUEUED"), timeout=400)
    return status(env, reference["id"]), row


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


@pytest.mark.slurm
def test_slurm_run_interrupted_twice_ends_as_if_never_interrupted(slurm, tmp_path):
    env = {"LLAMAJOBS_HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache")}

    def time_limit(job: dict) -> None:
        # The signal SLURM sends ahead of the time limit, without waiting for one.
        subprocess.run(["scancel", "--signal=USR2", job["cluster_job_id"]], check=True)

    reference, row = interrupted_twice(env, ["--cluster", "slurm", "--nodes", "2", "--gpus-per-node", "8",
                                             "--time", "00:20:00"], time_limit)
    check_identical(reference, row)
    starts = [e for e in events.read(Path(row["run_dir"])) if e["event"] == "started"]
    assert len(starts) == 3 and all(e["world_size"] == 4 for e in starts)
