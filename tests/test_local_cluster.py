"""End to end on the local cluster: real submitit, real torchrun, real FSDP2 workers, real SQLite."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import debug_section, run_cli, status

pytestmark = pytest.mark.slow

SECRET = "hf_do_not_write_me_0451"
TINY = ["--cluster", "local", "--size", "tiny", "--strategy", "fsdp", "--procs-per-node", "2", "--seq-len", "64",
        "--global-batch", "8", "--micro-batch", "2", "--lr", "3e-3", "--warmup-ratio", "0.1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("local-cluster")
    (root / "home").mkdir()
    (root / "home" / "site.yaml").write_text("env: [HF_TOKEN]\n")
    # Secrets in the submitting environment, passed through by name: they must never land on disk.
    # (With the API key, wandb would go online; WANDB_MODE keeps --wandb runs offline here.)
    return {"LLAMAJOBS_HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "cache"), "HF_TOKEN": SECRET,
            "WANDB_API_KEY": SECRET, "WANDB_MODE": "offline"}


@pytest.fixture(scope="module")
def completed(env) -> dict:
    """One tiny fine-tune, shared by the assertions below (each torchrun launch costs seconds).
    Watched while it runs, so its ETA can be checked against when it really ended."""
    submitted = json.loads(run_cli("submit", *TINY, "--max-steps", "200", "--name", "ok", "--wandb", "llamajobs-tests",
                                   "--json", env=env, check=True).stdout)
    deadline = time.time() + 180
    while (row := status(env, submitted["id"]))["step"] is None or row["step"] < 40:
        assert row["state"] == "RUNNING" and time.time() < deadline, row
        time.sleep(0.2)
    watched_at = time.time()
    predicted_end = watched_at + row["eta_s"] if row["state"] == "RUNNING" else None
    while (row := status(env, submitted["id"]))["state"] == "RUNNING":
        assert time.time() < deadline, row
        time.sleep(0.5)
    return {**submitted, "state": row["state"], "predicted_end": predicted_end, "watched_at": watched_at}


def test_submit_json_prints_the_ids(completed):
    assert completed["id"] == 1 and completed["state"] == "COMPLETED"
    assert completed["cluster_job_id"].isdigit() and Path(completed["run_dir"]).is_dir()


def test_eta_of_a_running_job_is_near_its_real_end(completed):
    from llamajobs import events

    assert completed["predicted_end"] is not None, "the job ended before it could be watched"
    ended = next(e["time"] for e in events.read(Path(completed["run_dir"])) if e["event"] == "finished")
    # The last 160 steps take a few seconds here: within 3 s or half the time that really remained
    # when the ETA was read (not the time after the prediction, which is negative when the ETA ran long).
    assert abs(completed["predicted_end"] - ended) < max(3.0, 0.5 * (ended - completed["watched_at"]))


def test_status_reports_the_finished_run(env, completed):
    row = status(env, completed["id"])
    assert row["state"] == "COMPLETED"
    assert (row["step"], row["total_steps"]) == (200, 200)
    assert row["tokens_per_s"] > 0 and row["tokens_per_s_per_gpu"] > 0 and row["mfu"] > 0
    metrics = [json.loads(line) for line in (Path(row["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"]
    table = json.loads(run_cli("status", "--json", env=env, check=True).stdout)
    assert [j["id"] for j in table["jobs"]] == [completed["id"]]


def test_run_dir_holds_no_secret_and_nothing_world_writable(completed):
    for path in Path(completed["run_dir"]).rglob("*"):
        assert not path.stat().st_mode & 0o002, f"{path} is world-writable"
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"{path} holds the secret"


def test_worker_wrote_tensorboard_and_an_offline_wandb_run(completed):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.test_metrics import wandb_history

    run_dir = Path(completed["run_dir"])
    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    assert [e.step for e in board.Scalars("loss")] == list(range(1, 201))
    assert [h["step"] for h in wandb_history(run_dir)] == list(range(1, 201))


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


def test_stalled_then_cancelled(env):
    """A worker stopped with SIGSTOP turns the job STALLED; cancel then ends it as CANCELLED."""
    from llamajobs.cluster.local import cmdline, descendants, exited

    submitted = json.loads(run_cli("submit", *TINY, "--max-steps", "100000", "--name", "long", "--json",
                                   env=env, check=True).stdout)
    deadline = time.time() + 120
    while (row := status(env, submitted["id"]))["step"] is None:
        assert row["state"] == "RUNNING", row
        assert time.time() < deadline, "no step logged within 120 s"
        time.sleep(0.5)
    pid = int(submitted["cluster_job_id"])
    workers = [p for p in descendants(pid)
               if b"llamajobs.worker" in cmdline(p) and b"torch.distributed.run" not in cmdline(p)]
    assert len(workers) == 2
    for p in workers:
        os.kill(p, signal.SIGSTOP)
    time.sleep(3)
    row = json.loads(run_cli("status", str(submitted["id"]), "--json", env={**env, "LLAMAJOBS_STALL_S": "2"},
                             check=True).stdout)
    assert row["state"] == "STALLED" and row["last_metric_age_s"] > 2
    table = run_cli("status", env={**env, "LLAMAJOBS_STALL_S": "2"}, check=True).stdout
    assert "STALLED, no metric for 0:0" in table  # with the age of its last metric
    assert status(env, submitted["id"])["state"] == "RUNNING"  # the default threshold is minutes
    run_cli("cancel", str(submitted["id"]), env=env, check=True)
    assert status(env, submitted["id"])["state"] == "CANCELLED"
    assert all(exited(p) for p in [pid, *workers])


@pytest.mark.parametrize("fault, state, rank, says, log_says", [
    ("crash:3", "FAILED", 0, "injected fault at step 3", "injected fault at step 3"),
    ("oom:3", "OUT_OF_MEMORY", 0, "injected fault at step 3", "injected fault at step 3"),
    # The last rank exits with no Python error (as one killed by the OOM killer): torchrun stops the
    # other, and status names the rank that died first, not the one stopped after it.
    ("die:3", "FAILED", 1, "the process exited with code 1 without a Python error", "rank 1 exits after step 3"),
])
def test_failing_worker_shows_why_and_names_the_log(env, tmp_path, fault, state, rank, says, log_says):
    config = tmp_path / "fault.yaml"  # (JSON is YAML) the run's debug section, as spec.json will hold it
    config.write_text(json.dumps({"debug": debug_section(fault)}))
    result = run_cli("submit", *TINY, "--max-steps", "6", "--name", fault.split(":")[0], "--config", str(config),
                     "--wait", "--json", env=env)
    assert result.returncode == 1
    job_id = json.loads(result.stdout)["id"]
    row = status(env, job_id)
    assert row["state"] == state
    assert row["error"].startswith(f"rank {rank} on {os.uname().nodename}: ") and says in row["error"], row["error"]
    detail = run_cli("status", str(job_id), env=env, check=True).stdout
    log = Path(detail.split("first error's log: ")[1].split()[0])
    assert log_says in log.read_text()
    if state == "OUT_OF_MEMORY":
        assert "lower --micro-batch" in detail


def test_logs_by_rank(env, completed):
    assert "tokens per step" in run_cli("logs", str(completed["id"]), "--rank", "0", env=env, check=True).stdout
    assert "Job completed successfully" in run_cli("logs", str(completed["id"]), env=env, check=True).stdout
    missing = run_cli("logs", str(completed["id"]), "--rank", "7", env=env)
    assert missing.returncode == 1 and "no log yet" in missing.stderr


def test_init_from_a_finished_job_starts_from_its_weights(env, completed):
    result = run_cli("submit", *TINY, "--max-steps", "4", "--name", "second-stage", "--init-from", str(completed["id"]),
                     "--wait", "--json", env=env, check=True)
    second = json.loads(result.stdout)
    assert second["state"] == "COMPLETED"
    first_losses = [json.loads(line)["loss"] for line in (Path(completed["run_dir"]) / "metrics.jsonl").open()]
    second_losses = [json.loads(line)["loss"] for line in (Path(second["run_dir"]) / "metrics.jsonl").open()]
    assert second_losses[0] < first_losses[0] - 0.5  # it starts where the first run ended, not from chance
    spec = json.loads((Path(second["run_dir"]) / "spec.json").read_text())
    assert spec["init_from"] == str(Path(completed["run_dir"]) / "final")
    bad = run_cli("submit", *TINY, "--init-from", "/nonexistent", env=env)
    assert bad.returncode == 2 and "holds neither a model" in bad.stderr


def test_instruction_store_trains_end_to_end(env, tmp_path):
    """tokenizer train -> data prepare (alpaca) -> submit --data: the packed, prompt-masked path."""
    from llamajobs.catalog import TINY_VOCAB
    from llamajobs.data import SAMPLE_CORPUS, read_texts

    tokenizer = tmp_path / "tokenizer"
    run_cli("tokenizer", "train", str(SAMPLE_CORPUS), "--vocab-size", str(TINY_VOCAB), "--out", str(tokenizer),
            env=env, check=True)
    records = [{"instruction": "Summarise the finding in one sentence.", "input": text[:300],
                "output": text.split(". ")[0] + "."} for text in read_texts()]
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(records))
    store = tmp_path / "store"
    run_cli("data", "prepare", str(data), "--format", "alpaca", "--tokenizer", str(tokenizer), "--out", str(store),
            env=env, check=True)
    result = run_cli("submit", *TINY, "--max-steps", "6", "--name", "alpaca", "--data", str(store), "--wait", "--json",
                     env=env, check=True)
    assert json.loads(result.stdout)["state"] == "COMPLETED"
    missing = run_cli("submit", *TINY, "--data", str(tmp_path / "nowhere"), env=env)
    assert missing.returncode == 2 and "nowhere" in missing.stderr


def test_plot_writes_a_readable_png(env, completed, tmp_path):
    out = tmp_path / "curves.png"
    run_cli("plot", str(completed["id"]), "-o", str(out), env=env, check=True)
    header = out.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (900, 900) and out.stat().st_size > 20_000
