"""A chat run end to end, as a user makes one: conversations prepared with a chat template and an eval
split; a LoRA fine-tune of a base model as a local job of two worker processes, with --eval-every-steps
(packed rows, documents isolated); then lm-evaluation-harness as a job on the run's final/.

Validation: the val_loss in metrics.jsonl, TensorBoard, `status` (table, detail, --json) and `plot`,
and the last val_loss recomputed here, in one process, from final/ (base plus adapter). lm-eval: a
task YAML over a local JSON-lines file, no Hub; results in the run dir and in `status`; bad flags."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from llamajobs.data.prepare import PrepareConfig, prepare
from tests.conftest import metrics_rows, run_cli

STEPS, EVERY = 12, 4

TASK_YAML = """task: local_colours
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

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
    """One local LoRA training job shared by the tests below, on a tiny random base model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamajobs.catalog import SIZES

    tmp = tmp_path_factory.mktemp("chat-run")
    torch.manual_seed(0)
    base = tmp / "base"
    LlamaForCausalLM(LlamaConfig(**SIZES["tiny"].hf_config())).save_pretrained(base)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, base / f.name)
    data = tmp / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in conversations(160)))
    meta = prepare(PrepareConfig(inputs=(data,), tokenizer=tokenizer_dir, out=tmp / "store", format="messages",
                                 chat_template="chatml", eval_fraction=0.2))
    assert meta["eval"]["documents"] > 10
    env = {"LLAMAJOBS_HOME": str(tmp / "home"), "XDG_CACHE_HOME": str(tmp / "cache"), "LLAMAJOBS_RUNS": "",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp / "hf-datasets")}
    submitted = run_cli("submit", "--model-path", str(base), "--mode", "lora", "--lora-r", "16",
                        "--lora-targets", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                        "--strategy", "fsdp", "--cluster", "local", "--data", str(tmp / "store"),
                        "--max-steps", str(STEPS), "--eval-every-steps", str(EVERY),
                        "--seq-len", "128", "--global-batch", "4", "--micro-batch", "1", "--lr", "1e-2",
                        "--warmup-ratio", "0", "--checkpoint-every-minutes", "600", "--wait", "--json",
                        env=env, check=True, timeout=600)
    job = json.loads(submitted.stdout)
    final = Path(job["run_dir"]) / "final"
    assert (final / "adapter_config.json").is_file() and not (final / "config.json").is_file()
    return {"env": env, "job": job, "run_dir": Path(job["run_dir"]), "final": final, "store": tmp / "store",
            "tmp": tmp}


def test_val_loss_every_n_steps_and_at_the_end(run):
    rows = metrics_rows(run["run_dir"])
    validated = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    assert [s for s, _ in validated] == list(range(EVERY, STEPS + 1, EVERY))
    print("\nvalidation curve (step, val_loss):", [(s, round(v, 4)) for s, v in validated])
    assert validated[-1][1] < validated[0][1]  # it learns, and the split it is measured on says so
    assert all(r["val_loss"] is None for r in rows if r["step"] % EVERY)


def test_the_last_val_loss_is_the_eval_splits_mean_token_loss_of_final(run, single_rank_group):
    """Two ranks shared the split in the job; one process over the whole split gets the same number."""
    from llamajobs.data.store import TokenStore
    from llamajobs.evaluate import load_model
    from llamajobs.spec import JobSpec
    from llamajobs.worker.parallel import Dist, Fsdp
    from llamajobs.worker.validate import Validator, eval_stream

    spec = JobSpec.load(run["run_dir"] / "spec.json")
    from llamajobs.worker import kernels

    model, _ = load_model(run["final"], device="cpu")  # the base plus the run's adapter
    # with the worker's loss forward, which validation calls (logits only where generation needs them)
    kernels.apply(model.get_base_model() if hasattr(model, "get_base_model") else model, kernels.choose(spec, "cpu"))
    env = Dist(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), hosts=("here",))
    stream = eval_stream(spec, TokenStore(run["store"]), pad_id=2)
    validator = Validator(stream, every=None, total=1, micro_batch=3, env=env, strategy=Fsdp(spec, env))
    loss_sum, tokens = validator.run(model)
    logged = [r for r in metrics_rows(run["run_dir"]) if r.get("val_loss") is not None][-1]["val_loss"]
    assert abs(loss_sum / tokens - logged) < 1e-4, (loss_sum / tokens, logged)


def test_status_plot_and_tensorboard_show_it(run):
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


# --- lm-evaluation-harness on the run's final/ ---


def tasks(folder: Path) -> Path:
    """A folder with one lm-eval task: a YAML over a local JSON-lines file."""
    rows = [{"question": f"Which colour is {w}?", "choices": [w, "grey", "black"], "answer": 0}
            for w in ("red", "green", "blue", "amber", "violet", "white")]
    (folder / "colours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "colours.yaml").write_text(TASK_YAML.format(data=folder / "colours.jsonl"))
    return folder


def test_harness_job_on_a_lora_runs_final(run, cli, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))  # the in-process run below
    env = run["env"]
    done = json.loads(run_cli("eval", "--harness", "local_colours", "--tasks-dir", str(tasks(tmp_path)), "--model",
                              str(run["job"]["id"]), "--cluster", "local", "--batch-size", "4", "--wait", "--json",
                              env=env, check=True, timeout=600).stdout)
    assert done["state"] == "COMPLETED"
    run_dir = Path(done["run_dir"])
    summary = json.loads((run_dir / "eval.json").read_text())
    acc = summary["tasks"]["local_colours"]["acc"]
    print(f"\nlm-eval job {done['id']}: local_colours acc {acc:.4f} over {summary['tasks']['local_colours']['n']} "
          f"questions ({summary['seconds']} s)")
    assert 0 <= acc <= 1 and summary["tasks"]["local_colours"]["n"] == 6 and summary["accuracy"] == acc
    results = json.loads((run_dir / "harness.json").read_text())
    assert results["results"]["local_colours"]["acc,none"] == acc
    assert str(run["final"]) in str(results["config"]["model_args"])  # the adapter was loaded (peft=final/)
    assert "peft" in str(results["config"]["model_args"])
    listed = json.loads(run_cli("status", "--json", env=env, check=True).stdout)["jobs"]
    row = next(j for j in listed if j["id"] == done["id"])
    assert row["accuracy"] == pytest.approx(acc) and row["kind"] == "eval" and row["strategy"] == "harness"
    detail = run_cli("status", str(done["id"]), env=env, check=True).stdout
    assert "lm-eval local_colours" in detail and "local_colours" in detail and "harness.json" in detail
    # In process, on the same final/ by its path: the same numbers.
    code, out, err = cli("eval", "--harness", "local_colours", "--tasks-dir", str(tasks(tmp_path)), "--model",
                         str(run["final"]), "--batch-size", "4", "--json")
    assert code == 0, err
    assert json.loads(out)["tasks"]["local_colours"]["acc"] == acc


@pytest.mark.parametrize("args, message", [
    (["--harness", "hellaswag"], "--harness hellaswag: no such task in --tasks-dir"),
    (["--harness", "local_colours", "--task", "medqa"], "--task is for the built-in eval"),
    (["--harness", "local_colours", "--nodes", "2", "--cluster", "local"], "--nodes 2: an lm-eval job runs one process"),
])
def test_bad_harness_flags_exit_2_and_queue_nothing(run, cli, home, tmp_path, args, message):
    pytest.importorskip("lm_eval")
    code, out, err = cli("eval", "--model", str(run["final"]), "--tasks-dir", str(tasks(tmp_path)), *args)
    assert code == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1 and not (home / "runs").exists()
