"""SIGKILL at random points while checkpoints are being written never costs more than the steps
since the last complete checkpoint: `latest` and the newest complete checkpoint stay loadable, and a
relaunch resumes from it. Real torchrun, real DCP saves (one every step, so kills land in saves)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamajobs.catalog import TINY_VOCAB
from llamajobs.data import read_texts
from llamajobs.data.tokenizer import train_tokenizer
from llamajobs.monitor import descendants, exited
from llamajobs.spec import JobSpec
from llamajobs.worker.checkpoint import complete_steps, newest_complete_step

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
KILLS = 3
STEPS = 120


def launch(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("LLAMAJOBS_INJECT_FAULT", None)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "llamajobs.worker", str(run_dir)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_during_saves_keeps_the_last_complete_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(train_tokenizer(read_texts(), TINY_VOCAB, tmp_path / "tokenizer"), run_dir / "tokenizer")
    spec = JobSpec(size="tiny", seq_len=64, global_batch=8, micro_batch=2, max_steps=STEPS, lr=3e-3,
                   checkpoint_every_steps=1, keep_checkpoints=2, procs_per_node=2)
    (run_dir / "spec.json").write_text(spec.to_json())
    rng = random.Random(0)
    survived = []
    for _ in range(KILLS):
        before = newest_complete_step(run_dir / "checkpoints") or 0
        process = launch(run_dir)
        deadline = time.time() + 120
        while (newest_complete_step(run_dir / "checkpoints") or 0) < before + 2:  # resumed and saving again
            assert process.poll() is None and time.time() < deadline, "the worker did not resume and save"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))  # lands inside a save most of the time: one per 40 ms step
        # torchrun's workers live in sessions of their own: kill the whole tree, as SLURM does.
        tree = [process.pid, *descendants(process.pid)]
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        process.wait()
        while not all(exited(p) for p in tree):
            time.sleep(0.05)
        root = run_dir / "checkpoints"
        newest = newest_complete_step(root)
        assert newest is not None and newest >= before + 2
        assert json.loads((root / f"step-{newest}" / "meta.json").read_text())["complete"] is True
        latest = (root / "latest").read_text().strip()
        assert int(latest.removeprefix("step-")) in complete_steps(root)  # never names a broken one
        survived.append(newest)
    # The last relaunch resumes from the newest complete checkpoint and runs to the end.
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "llamajobs.worker", str(run_dir)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # no step lost or logged twice
    resumed = [json.loads(line)["step"] for p in (run_dir / "events").glob("*.jsonl")
               for line in p.read_text().splitlines() if json.loads(line)["event"] == "resumed"]
    assert sorted(resumed) == sorted(survived)
    assert (run_dir / "final" / "config.json").exists()
