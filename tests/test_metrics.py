"""The worker's metrics: where the step time goes (waiting for data, saving checkpoints), the same
rows in TensorBoard and an offline wandb run, and `status JOB` pointing at a slow input pipeline.

One real run of the worker's train() in this process (a gloo group of one rank: tokenizer, model,
FSDP2, optimizer, checkpoints, final/), whose only change is its input: the real sampler, with each
batch arriving SLOW_S late, as from a token store on a slow filesystem."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llamajobs import events, registry
from llamajobs.monitor import SLOW_INPUT_FRAC
from llamajobs.registry import Job
from llamajobs.spec import JobSpec
from llamajobs.worker import train as train_module
from llamajobs.worker.parallel import Dist

SLOW_S = 0.1
STEPS = 6
SECRET = "wandb_key_do_not_write_me_0451"
SPEC = JobSpec(size="tiny", cluster="local", procs_per_node=1, seq_len=32, global_batch=4, micro_batch=2, lr=1e-3,
               max_steps=STEPS, checkpoint_every_steps=3, wandb="llamajobs-tests")


class SlowInput:
    """The real sampler behind a slow filesystem: every batch arrives SLOW_S late."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def __iter__(self):
        return self

    def __next__(self):
        time.sleep(SLOW_S)
        return next(self.sampler)

    def __getattr__(self, name: str):  # state_dict and the rest, for the checkpoints
        return getattr(self.sampler, name)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    run_dir = runs / "1-slow"
    run_dir.mkdir()
    (run_dir / "spec.json").write_text(SPEC.to_json())
    real_build_data = train_module.build_data

    def slow_build_data(*args):
        sampler, steps_in_epoch = real_build_data(*args)
        return SlowInput(sampler), steps_in_epoch

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "build_data", slow_build_data)
        # An API key in the environment and offline mode: wandb writes a local run, never the key.
        patch.setenv("WANDB_API_KEY", SECRET)
        patch.setenv("WANDB_MODE", "offline")
        dist.init_process_group("gloo", store=dist.FileStore(str(runs / "store"), 1), rank=0, world_size=1)
        try:
            env = Dist(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
            train_module.train(run_dir, SPEC, env)
        finally:
            dist.destroy_process_group()
    # Registered as a finished local job, so that `status` can show it.
    registry.write_job_file(Job(id=1, name="slow", run_dir=run_dir, cluster="local", cluster_job_id="999999999",
                                submitted_at=time.time()))
    return run_dir


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rows_hold_the_data_wait_per_step_and_its_share(run_dir: Path) -> None:
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert SLOW_S <= r["data_wait_s"] < r["step_time_s"]
        assert r["data_wait_frac"] == pytest.approx(r["data_wait_s"] / r["step_time_s"])
        assert r["mem_gib"] > 0


def test_rows_hold_the_checkpoint_time_of_their_interval(run_dir: Path) -> None:
    """Saved after steps 3 and 6 (after their rows), in the background: step 4's row holds the first
    save's copy to host memory, and the row of the step boundary that committed it (4, or a later one
    when the write was not done yet) the wait and the commit; the event's seconds are the two."""
    saves = {e["step"]: e for e in events.read(run_dir) if e["event"] == "checkpointed"}
    assert sorted(saves) == [3, 6] and saves[3]["background"]
    rows = {r["step"]: r for r in metrics(run_dir)}
    assert rows[4]["checkpoint_s"] > 0 and rows[4]["step_time_s"] > rows[4]["checkpoint_s"]
    assert sum(rows[s]["checkpoint_s"] for s in (4, 5, 6)) >= saves[3]["seconds"] > 0
    assert saves[3]["written_s"] >= saves[3]["seconds"]
    assert all(rows[s]["checkpoint_s"] == 0 for s in (1, 2, 3))


def test_tensorboard_event_file_holds_the_same_scalars(run_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(run_dir / "tensorboard"))
    board.Reload()
    rows = metrics(run_dir)
    assert {"loss", "lr", "tokens_per_s", "mfu", "mem_gib", "data_wait_s", "data_wait_frac",
            "checkpoint_s"} <= set(board.Tags()["scalars"])
    assert [(e.step, e.value) for e in board.Scalars("loss")] == [(r["step"], pytest.approx(r["loss"])) for r in rows]


def wandb_records(path: Path):
    """The records of a wandb transaction log (run-ID.wandb): a 7-byte header, then LevelDB's log
    format: 32 KiB blocks of records, each with a 7-byte header (CRC, length, type), split across
    blocks as FIRST/MIDDLE.../LAST (type 1 is a FULL record; a block's tail under 7 bytes is padding)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def wandb_history(run_dir: Path) -> list[dict]:
    [log] = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            for record in wandb_records(log) if record.WhichOneof("record_type") == "history"]


def test_offline_wandb_run_holds_the_history_and_no_key(run_dir: Path) -> None:
    history = wandb_history(run_dir)
    rows = metrics(run_dir)
    assert [h["step"] for h in history] == [r["step"] for r in rows]
    assert [h["loss"] for h in history] == pytest.approx([r["loss"] for r in rows])
    assert all(h["data_wait_s"] >= SLOW_S for h in history)
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"{path} holds the wandb key"


def test_status_shows_the_slow_input(cli, run_dir: Path) -> None:
    code, stdout, stderr = cli("status", "1", "--runs-dir", str(run_dir.parent), "--json")
    assert code == 0, stderr
    row = json.loads(stdout)
    assert row["state"] == "COMPLETED"
    assert row["data_wait_s"] >= SLOW_S and row["data_wait_frac"] > SLOW_INPUT_FRAC
    assert row["checkpoints"] == 2 and row["checkpoint_s"] > 0 and row["mem_gib"] > 0
    code, stdout, stderr = cli("status", "1", "--runs-dir", str(run_dir.parent))
    assert code == 0, stderr
    assert "slow input: each step waits" in stdout and "checkpoints 2, the last in" in stdout


def test_the_worker_runs_without_tensorboard_and_refuses_wandb_without_it(tmp_path: Path, monkeypatch, capsys) -> None:
    """As on a node where neither is installed (a None in sys.modules makes the import fail)."""
    from llamajobs.worker import sinks

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert sinks.open_sinks(tmp_path, JobSpec(), start=0) == []
    assert "tensorboard is not installed" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="--wandb my-project: the wandb package is not installed"):
        sinks.open_sinks(tmp_path, JobSpec(wandb="my-project"), start=0)
