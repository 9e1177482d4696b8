"""The `--json` documents of estimate hours (flags, grid, a job's measured throughput), estimate
memory, data prepare and eval, frozen as they were before their results became dataclasses
(tests/snapshots/results.json). CLI.md calls these shapes a contract: a change to one must be a
deliberate edit of the snapshot, never a side effect of a refactor.

Values that depend on the clock or the machine (seconds, rates, paths under tmp) are masked; every
other key, its order and its value are compared as text. To record the snapshot anew (only for an
intended change of a document): LLAMAJOBS_WRITE_SNAPSHOTS=1 pytest tests/test_result_snapshots.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fake_runs import make_runs

SNAPSHOT = Path(__file__).parent / "snapshots" / "results.json"

# Keys whose values are measured on this machine or name this test's temporary paths.
MASKED = {"seconds", "questions_per_s", "path", "workdir", "out", "model", "data", "elapsed_s", "created",
          "created_at", "tokenizer", "prepared_at", "merge_seconds", "time"}


def _masked(value):
    if isinstance(value, dict):
        return {k: "<masked>" if k in MASKED else _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def _document(cli, *args: str, tmp: Path | None = None) -> str:
    code, stdout, stderr = cli(*args)
    assert code == 0, (args, stderr)
    document = json.loads(stdout.replace(json.dumps(str(tmp))[1:-1], "<tmp>") if tmp else stdout)
    return json.dumps(_masked(document), indent=1)


def _check(name: str, text: str) -> None:
    recorded = json.loads(SNAPSHOT.read_text()) if SNAPSHOT.exists() else {}
    if os.environ.get("LLAMAJOBS_WRITE_SNAPSHOTS"):
        recorded[name] = text
        SNAPSHOT.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    assert name in recorded, f"{SNAPSHOT} has no {name!r}: record it with LLAMAJOBS_WRITE_SNAPSHOTS=1"
    assert text == recorded[name], f"`{name}` --json changed"


ESTIMATES = {
    "hours-7b-fsdp": ("estimate", "hours", "--size", "7b", "--strategy", "fsdp", "--nodes", "1", "--gpus-per-node",
                      "8", "--gpu", "a100-80g", "--tokens", "2.5B"),
    "hours-13b-lora-zero3-offload-2nodes": ("estimate", "hours", "--size", "13b", "--mode", "lora", "--strategy",
                                            "ds-zero3-offload", "--nodes", "2", "--gpu", "a100-40g"),
    "hours-grid": ("estimate", "hours", "--size", "7b,13b", "--strategy", "all", "--gpu", "h100", "--tokens",
                   "800M"),
    "hours-starting-grid": ("estimate", "hours"),
    "memory-13b-a100-40g": ("estimate", "memory", "--size", "13b", "--gpu", "a100-40g", "--nodes", "1",
                            "--gpus-per-node", "8"),
    "memory-7b-lora-micro-4": ("estimate", "memory", "--size", "7b", "--mode", "lora", "--micro-batch", "4"),
    "memory-grid": ("estimate", "memory", "--size", "all", "--gpu", "a100-80g"),
}


@pytest.mark.parametrize("name", list(ESTIMATES))
def test_estimate_json_is_unchanged(cli, name):
    _check(name, _document(cli, *ESTIMATES[name], "--json"))


def test_measured_hours_json_is_unchanged(cli, tmp_path):
    make_runs(tmp_path / "runs", 1, 1, metrics_lines=20)
    for tokens in ([], ["--tokens", "1B"]):
        name = "hours-job" + "".join(tokens)
        _check(name, _document(cli, "estimate", "hours", "1", "--runs-dir", str(tmp_path / "runs"), *tokens, "--json"))


def test_data_prepare_json_is_unchanged(cli, tokenizer_dir, tmp_path):
    text = tmp_path / "docs.jsonl"
    text.write_text("".join(json.dumps({"text": f"document {i} about the liver and the heart " * (i + 1)}) + "\n"
                            for i in range(40)) + "{not json\n")
    medqa = tmp_path / "medqa.jsonl"
    medqa.write_text("".join(json.dumps({"sent1": f"Q{i}?", "ending0": "a", "ending1": "b", "ending2": "c",
                                         "ending3": "d", "label": i % 4}) + "\n" for i in range(8)))
    for name, args in {"prepare-text": (str(text), "--skip-bad-lines", "--eval-fraction", "0.2"),
                       "prepare-medqa": (str(medqa), "--format", "medqa")}.items():
        _check(name, _document(cli, "data", "prepare", *args, "--tokenizer", str(tokenizer_dir), "--out",
                               str(tmp_path / name), "--json", tmp=tmp_path))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer_dir):
    """A randomly initialised tiny LLaMA (seeded, so its choices are the same on every run)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llamajobs.catalog import SIZES
    from llamajobs.data.tokenizer import load_tokenizer

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("snapshot-model")
    LlamaForCausalLM(LlamaConfig(**SIZES["tiny"].hf_config())).save_pretrained(folder)
    load_tokenizer(tokenizer_dir).save_pretrained(folder)
    return folder


def test_eval_json_is_unchanged(cli, tiny_model, tmp_path):
    files = {
        "medqa": [{"sent1": f"Q{i}?", "ending0": "a", "ending1": "b", "ending2": "c", "ending3": "d", "label": i % 4}
                  for i in range(6)],
        "medmcqa": [{"question": f"Q{i}?", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 1 + i % 4}
                    for i in range(6)],
        "pubmedqa": [{"question": f"Q{i}?", "context": "C.", "final_decision": ("yes", "no", "maybe")[i % 3]}
                     for i in range(6)],
    }
    for task, records in files.items():
        path = tmp_path / f"{task}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        for mode, extra in {"mcq": (), "generate": ("--generate", "--max-new-tokens", "2")}.items():
            _check(f"eval-{task}-{mode}", _document(cli, "eval", "--model", str(tiny_model), "--task", task, "--data",
                                                    str(path), "--batch-size", "2", *extra, "--json"))


def test_an_eval_json_reads_back_as_the_result_it_was_and_a_damaged_one_as_none():
    """A job's eval.json is read back typed (status JOB, eval --wait): the document round-trips, and
    what is not one (damaged, lm-eval's summary, a number no float holds) is no result, not a crash."""
    from llamajobs.evaluate import EvalResult

    result = EvalResult(task="medmcqa", data="q.jsonl", model="m", adapter=None, shots=0, mode="loglik-letter", n=3,
                        n_labelled=2, correct=1, accuracy=0.5, choices={"A": 2, "B": 1}, gold={"A": 1, "B": 1},
                        truncated=0, seconds=1.5, questions_per_s=2.0, notes=("medmcqa: cop only took values 1-3",),
                        world_size=2)
    written = json.loads(json.dumps(result.to_json()))
    assert list(written)[-2:] == ["notes", "world_size"]
    assert EvalResult.from_json(written) == result
    in_process = {k: v for k, v in written.items() if k != "world_size"}
    assert EvalResult.from_json(in_process).world_size is None
    for damaged in ({**written, "accuracy": 10**400}, {**written, "n": "3"}, {**written, "choices": [2, 1]},
                    {k: v for k, v in written.items() if k != "gold"}, ["not", "a", "result"],
                    {"harness": ["mmlu"], "tasks": {}, "accuracy": 0.3}):
        assert EvalResult.from_json(damaged) is None, damaged
