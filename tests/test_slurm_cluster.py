"""The local SLURM test cluster itself, checked for real: nodes, fake GPUs, accounting, submitit.

Needs root and apt-get (else skipped); see tests/slurm/cluster.sh.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.slurm.fixture import SlurmCluster

# The cluster is conftest.py's session fixture `slurm`: one start serves every test.
pytestmark = pytest.mark.slurm

def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def wait_until(what: str, probe: Callable[[], object], timeout: float = 60, every: float = 0.5):
    """Poll probe() until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def sacct_state(job_id: str) -> str:
    """The job's State from the accounting DB ('' until slurmdbd has the record)."""
    out = run("sacct", "-j", job_id, "-n", "-X", "-P", "-o", "State", check=False).stdout.split()
    return out[0] if out else ""


def test_sinfo_lists_the_nodes_with_gpus(slurm: SlurmCluster):
    assert slurm.nodes == ["n1", "n2"]
    assert slurm.gpus_per_node == 8
    out = run("sinfo", "-h", "-N", "-o", "%N %T %c %G").stdout
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()}
    assert set(rows) == {"n1", "n2"}, out
    for state, cpus, gres in rows.values():
        assert (state, cpus, gres) == ("idle", "8", "gpu:8"), out


def test_sbatch_two_nodes_eight_gpus_completes(slurm: SlurmCluster, tmp_path: Path):
    out = tmp_path / "job-%j.out"
    sub = run("sbatch", "--parsable", "--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1",
              "--time=5", f"--output={out}", "--wrap", "hostname; echo $CUDA_VISIBLE_DEVICES")
    job_id = sub.stdout.strip().split(";")[0]
    assert job_id.isdigit(), sub.stdout
    # sacct lags squeue a little (slurmctld sends records to slurmdbd asynchronously)
    state = wait_until(f"job {job_id} COMPLETED in sacct",
                       lambda: (s := sacct_state(job_id)) in ("COMPLETED", "FAILED", "CANCELLED",
                                                              "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY") and s)
    log = Path(str(out).replace("%j", job_id))
    assert state == "COMPLETED", log.read_text() if log.exists() else f"no {log}"
    lines = log.read_text().split()
    assert lines[-1] == "0,1,2,3,4,5,6,7", lines
    alloc = run("sacct", "-j", job_id, "-n", "-X", "-P", "-o", "NNodes,AllocTRES").stdout
    assert alloc.startswith("2|"), alloc
    assert "gres/gpu=16" in alloc, alloc
    # sacct's NodeList reads just the batch host (n1) for about 2 s after COMPLETED, then n[1-2]
    wait_until("sacct NodeList n[1-2]",
               lambda: run("sacct", "-j", job_id, "-n", "-X", "-o", "NodeList").stdout.strip() == "n[1-2]",
               timeout=20)


def test_more_gpus_than_a_node_has_is_refused_at_submit(slurm: SlurmCluster):
    res = run("sbatch", "--nodes=1", "--gpus-per-node=9", "--wrap", "true", check=False)
    assert res.returncode != 0, res.stdout
    assert "Requested node configuration is not available" in res.stderr, res.stderr


def test_submitit_job_returns_its_value(slurm: SlurmCluster, tmp_path: Path):
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    # slurm_partition deliberately unset: the cluster's default partition takes the job
    executor.update_parameters(timeout_min=5, nodes=1, tasks_per_node=1, gpus_per_node=2,
                               cpus_per_task=1, name="lj-test")

    def where(x: int) -> dict:  # nested: cloudpickle ships it by value, no import in the job
        import os

        import submitit as s
        env = s.JobEnvironment()
        return {"x2": 2 * x, "job_id": env.job_id, "hostnames": env.hostnames,
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}

    job = executor.submit(where, 21)
    wait_until(f"submitit job {job.job_id} done", lambda: job.done(force_check=True), timeout=90)
    value = job.result()
    assert value == {"x2": 42, "job_id": job.job_id, "hostnames": [value["hostnames"][0]], "gpus": "0,1"}
    assert value["hostnames"][0] in slurm.nodes


def test_submitit_cancelled_job_reads_cancelled(slurm: SlurmCluster, tmp_path: Path):
    import submitit

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(timeout_min=5, nodes=1, tasks_per_node=1, cpus_per_task=1)

    def nap() -> None:
        import time as t
        t.sleep(300)

    job = executor.submit(nap)
    wait_until(f"submitit job {job.job_id} RUNNING",
               lambda: job.get_info(mode="force").get("State") == "RUNNING", timeout=60)
    job.cancel(check=True)
    state = wait_until(f"submitit job {job.job_id} CANCELLED",
                       lambda: (s := job.get_info(mode="force").get("State", "")).startswith("CANCELLED") and s)
    assert state.startswith("CANCELLED"), state  # "CANCELLED by 0"
    assert sacct_state(job.job_id) == "CANCELLED"
    assert job.done(force_check=True)
