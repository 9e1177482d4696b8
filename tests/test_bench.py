"""bench/worker_step.py: the worker's real training step against a plain transformers(+peft) loop.
On the CPU it runs the tiny shape (what CI can afford); the GPU cases run where a GPU is."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

BENCH = REPO / "bench" / "worker_step.py"


# The device machine has torch, transformers and peft, not the rest: the bench runs with these unimportable.
WITHOUT = ("submitit", "deepspeed", "click", "rich", "sentencepiece", "wandb", "tensorboard", "matplotlib")
RUN_WITHOUT = """
import importlib.abc, importlib.machinery, runpy, sys
class Refuse(importlib.abc.Loader):
    def create_module(self, spec): return None
    def exec_module(self, module): raise ImportError(f"{module.__name__} is not on the device machine")
class Finder:  # found (so availability checks pass), but importing fails
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in WITHOUT: return importlib.machinery.ModuleSpec(name, Refuse())
sys.meta_path.insert(0, Finder())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _bench(tmp_path: Path, *args: str, timeout: int) -> list[dict]:
    out = tmp_path / "rows.json"
    code = f"WITHOUT = {WITHOUT!r}" + RUN_WITHOUT
    result = subprocess.run([sys.executable, "-c", code, str(BENCH), *args, "--json", str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tokens/s" in result.stdout and "/plain" in result.stdout  # the printed table
    return json.loads(out.read_text())


def _check_rows(rows: list[dict], vocab: int) -> None:
    for row in rows:
        assert not row["error"], row
        assert row["tokens_per_s"] > 0 and row["mfu"] > 0, row
        # Random weights predict nearly uniformly: both loops really compute a loss over the vocabulary.
        assert row["first_loss"] == pytest.approx(math.log(vocab), rel=0.15), row
        if row["loop"] == "worker":
            assert row["vs_plain"] > 0, row


def test_cpu_bench_times_the_worker_step_against_the_plain_loop(tmp_path: Path) -> None:
    rows = _bench(tmp_path, "--cpu", "--repeats", "2", timeout=300)
    assert {(r["case"], r["loop"]) for r in rows} == {
        ("tiny lora r8 q/v", "plain"), ("tiny lora r8 q/v", "worker"), ("tiny full", "plain"), ("tiny full", "worker")}
    _check_rows(rows, vocab=512)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bench_runs_every_case(tmp_path: Path) -> None:
    rows = _bench(tmp_path, timeout=900)
    assert {(r["case"], r["loop"], r["compiled"]) for r in rows} >= {
        ("7b lora r8 q/v", "plain", False), ("7b lora r8 q/v", "plain", True),
        ("7b lora r8 q/v", "worker", False), ("7b lora r8 q/v", "worker", True), ("1.1b full", "worker", False)}
    _check_rows(rows, vocab=32000)
    assert all(r["host_sync"] == "none" for r in rows if r["loop"] == "worker"), rows  # the step never waits
