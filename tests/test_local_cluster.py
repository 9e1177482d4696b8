"""End to end on the local cluster: real submitit, real torchrun, real FSDP2 workers, real SQLite."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli

pytestmark = pytest.mark.slow

TINY = ["--cluster", "local", "--size", "tiny", "--strategy", "fsdp", "--procs-per-node", "2", "--seq-len", "64",
        "--global-batch", "8", "--micro-batch", "2", "--lr", "3e-3", "--warmup-ratio", "0.1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("local-cluster")
    return {"LLAMAJOBS_HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "cache")}


def status(env, job_id: int) -> dict:
    return json.loads(run_cli("status", str(job_id), "--json", env=env, check=True).stdout)


@pytest.fixture(scope="module")
def completed(env) -> dict:
    """One tiny fine-tune, shared by the assertions below (each torchrun launch costs seconds)."""
    result = run_cli("submit", *TINY, "--max-steps", "12", "--name", "ok", "--wait", "--json", env=env, check=True)
    return json.loads(result.stdout)


def test_submit_wait_json_prints_the_ids(completed):
    assert completed["id"] == 1 and completed["state"] == "COMPLETED"
    assert completed["cluster_job_id"].isdigit() and Path(completed["run_dir"]).is_dir()


def test_status_reports_the_finished_run(env, completed):
    row = status(env, completed["id"])
    assert row["state"] == "COMPLETED"
    assert (row["step"], row["total_steps"]) == (12, 12)
    assert row["tokens_per_s"] > 0 and row["tokens_per_s_per_gpu"] > 0 and row["mfu"] > 0
    metrics = [json.loads(line) for line in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    table = json.loads(run_cli("status", "--json", env=env, check=True).stdout)
    assert [j["id"] for j in table["jobs"]] == [completed["id"]]


def test_final_model_loads_and_generates(completed):
    import torch
    from transformers import LlamaForCausalLM, LlamaTokenizer

    final = Path(completed["run_dir"]) / "final"
    model = LlamaForCausalLM.from_pretrained(final)
    tokenizer = LlamaTokenizer.from_pretrained(final)
    inputs = tokenizer("Patients with hypertension", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_estimate_from_the_measured_throughput(env, completed):
    result = json.loads(run_cli("estimate", "hours", str(completed["id"]), "--json", env=env, check=True).stdout)
    assert result["source"] == "measured" and result["tokens_per_s"] > 0 and result["hours_per_epoch"] > 0


def test_cancelled_job_shows_cancelled(env):
    submitted = json.loads(run_cli("submit", *TINY, "--max-steps", "100000", "--name", "long", "--json",
                                   env=env, check=True).stdout)
    deadline = time.time() + 120
    while (row := status(env, submitted["id"]))["step"] is None:
        assert row["state"] == "RUNNING", row
        assert time.time() < deadline, "no step logged within 120 s"
        time.sleep(1)
    run_cli("cancel", str(submitted["id"]), env=env, check=True)
    assert status(env, submitted["id"])["state"] == "CANCELLED"
    pid = int(submitted["cluster_job_id"])
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[1][:3]


def test_crashing_worker_shows_failed_and_names_the_log(env):
    result = run_cli("submit", *TINY, "--max-steps", "6", "--name", "crash", "--wait", "--json",
                     env={**env, "LLAMAJOBS_INJECT_FAULT": "crash:3"})
    assert result.returncode == 1
    job_id = json.loads(result.stdout)["id"]
    assert status(env, job_id)["state"] == "FAILED"
    detail = run_cli("status", str(job_id), env=env, check=True).stdout
    log = Path(detail.split("traceback in ")[1].split()[0])
    assert "injected fault at step 3" in log.read_text()


def test_logs_by_rank(env, completed):
    assert "tokens per step" in run_cli("logs", str(completed["id"]), "--rank", "0", env=env, check=True).stdout
    assert "Job completed successfully" in run_cli("logs", str(completed["id"]), env=env, check=True).stdout
    missing = run_cli("logs", str(completed["id"]), "--rank", "7", env=env)
    assert missing.returncode == 1 and "no log yet" in missing.stderr
