"""Validation loss while training, end to end: a chat store with an eval split, a local job of two
worker processes with --eval-every-steps, the val_loss in metrics.jsonl, TensorBoard, `status` (table,
detail, --json) and `plot`; and the last val_loss recomputed here, in one process, from final/."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from llamajobs.data.prepare import PrepareConfig, prepare
from tests.conftest import metrics_rows

STEPS, EVERY = 12, 4

pytestmark = pytest.mark.slow


def conversations(n: int) -> list[dict]:
    """Learnable chats: the answer is the question's colour word repeated, so the loss falls fast."""
    rng = random.Random(0)
    words = ["red", "green", "blue", "amber", "violet", "white"]
    out = []
    for i in range(n):
        word = rng.choice(words)
        out.append({"id": f"c{i}", "messages": [
            {"role": "system", "content": "Answer with the colour."},
            {"role": "user", "content": f"Which colour is {word}?"},
            {"role": "assistant", "content": f"{word} {word} {word}."}]})
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_dir):
    """One local training job shared by the tests below."""
    import os

    from tests.conftest import run_cli

    tmp = tmp_path_factory.mktemp("validation")
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations(160)))
    meta = prepare(PrepareConfig(inputs=(data,), tokenizer=tokenizer_dir, out=tmp / "store", format="messages",
                                 chat_template="chatml", eval_fraction=0.2))
    assert meta["eval"]["documents"] > 10
    env = {"LLAMAJOBS_HOME": str(tmp / "home"), "XDG_CACHE_HOME": str(tmp / "cache")}
    env.pop("LLAMAJOBS_RUNS", None)
    os.environ.pop("LLAMAJOBS_RUNS", None)
    submitted = run_cli("submit", "--size", "tiny", "--strategy", "fsdp", "--cluster", "local", "--data",
                        str(tmp / "store"), "--max-steps", str(STEPS), "--eval-every-steps", str(EVERY),
                        "--seq-len", "128", "--global-batch", "4", "--micro-batch", "1", "--lr", "3e-3",
                        "--warmup-ratio", "0", "--checkpoint-every-minutes", "600", "--wait", "--json",
                        env=env, check=True, timeout=600)
    job = json.loads(submitted.stdout)
    return {"env": env, "job": job, "run_dir": Path(job["run_dir"]), "store": tmp / "store", "tmp": tmp}


def test_val_loss_every_n_steps_and_at_the_end(run):
    rows = metrics_rows(run["run_dir"])
    validated = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    assert [s for s, _ in validated] == list(range(EVERY, STEPS + 1, EVERY))
    print("\nvalidation curve (step, val_loss):", [(s, round(v, 4)) for s, v in validated])
    assert validated[-1][1] < validated[0][1]  # it learns, and the split it is measured on says so
    assert all(r["val_loss"] is None for r in rows if r["step"] % EVERY)


def test_the_last_val_loss_is_the_eval_splits_mean_token_loss_of_final(run, single_rank_group):
    """Two ranks shared the split in the job; one process over the whole split gets the same number."""
    from transformers import AutoModelForCausalLM

    from llamajobs.data.store import TokenStore
    from llamajobs.spec import JobSpec
    from llamajobs.worker.parallel import Dist, Fsdp
    from llamajobs.worker.validate import Validator, eval_stream

    spec = JobSpec.load(run["run_dir"] / "spec.json")
    model = AutoModelForCausalLM.from_pretrained(run["run_dir"] / "final", dtype=torch.float32)
    env = Dist(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), hosts=("here",))
    stream = eval_stream(spec, TokenStore(run["store"]), pad_id=2)
    validator = Validator(stream, every=None, total=1, micro_batch=3, env=env, strategy=Fsdp(spec, env))
    loss_sum, tokens = validator.run(model)
    logged = [r for r in metrics_rows(run["run_dir"]) if r.get("val_loss") is not None][-1]["val_loss"]
    assert abs(loss_sum / tokens - logged) < 1e-4, (loss_sum / tokens, logged)


def test_status_plot_and_tensorboard_show_it(run):
    from tests.conftest import run_cli

    job, env = run["job"], run["env"]
    last = [r for r in metrics_rows(run["run_dir"]) if r.get("val_loss") is not None][-1]["val_loss"]
    listed = json.loads(run_cli("status", "--json", env=env, check=True).stdout)["jobs"]
    assert [j["val_loss"] for j in listed if j["id"] == job["id"]] == [pytest.approx(last)]
    assert json.loads(run_cli("status", str(job["id"]), "--json", env=env, check=True).stdout)["val_loss"] == \
        pytest.approx(last)
    table = run_cli("status", env=env, check=True).stdout
    assert "val loss" in table and f"{last:.4f}" in table
    detail = run_cli("status", str(job["id"]), env=env, check=True).stdout
    assert "val loss" in detail and f"the last at step {STEPS}" in detail
    png = run["tmp"] / "curves.png"
    run_cli("plot", str(job["id"]), "-o", str(png), env=env, check=True)
    assert png.read_bytes()[:4] == b"\x89PNG"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run["run_dir"] / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("val_loss")] == list(range(EVERY, STEPS + 1, EVERY))
