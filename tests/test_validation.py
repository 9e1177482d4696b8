"""Validation's parts: when it runs, the row that carries it, what status reads back, --eval-batches
over two gloo ranks, and the ETA with the validations still to come. (tests/test_chat_run.py runs it
end to end in a job.)"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from llamajobs import metrics, monitor, registry, spec as spec_lib
from llamajobs.data import store as st
from llamajobs.data.prepare import PrepareConfig, prepare
from llamajobs.errors import SpecError
from llamajobs.metrics import MetricsRow
from llamajobs.registry import Job
from llamajobs.spec import JobSpec
from llamajobs.worker import kernels, packing
from llamajobs.worker.metrics import MetricsLogger
from llamajobs.worker.parallel import Dist, Fsdp
from llamajobs.worker.validate import Validation, Validator, build_validator, eval_stream

CPU = Dist(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))


def test_due_every_n_steps_and_at_the_last_and_never_without_an_eval_split():
    validator = Validator(object(), every=3, total=10, micro_batch=1, env=CPU, strategy=Fsdp(JobSpec(), None))
    assert [s for s in range(1, 11) if validator.due(s)] == [3, 6, 9, 10]
    at_end = Validator(object(), every=None, total=10, micro_batch=1, env=CPU, strategy=Fsdp(JobSpec(), None))
    assert [s for s in range(1, 11) if at_end.due(s)] == [10]
    none = Validator(None, every=3, total=10, micro_batch=1, env=CPU, strategy=Fsdp(JobSpec(), None))
    assert not any(none.due(s) for s in range(1, 11))
    assert eval_stream(JobSpec(), None, pad_id=2) is None  # no --data: the sample corpus has no eval split


def test_the_row_carries_val_loss_and_its_time_is_not_step_time(tmp_path):
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=4, steps_per_epoch=4, tokens_per_step=100,
                           flops_per_token=1.0, world_size=1, device=torch.device("cpu"))
    plain = logger.log(1, 2.0, 1e-3, 1.0)
    time.sleep(0.2)
    validated = logger.log(2, 1.5, 1e-3, 1.0, validation=Validation(loss=1.25, tokens=50, seconds=0.2))
    assert plain.val_loss is None and validated.val_loss == 1.25 and validated.val_s == 0.2
    assert validated.step_time_s < 0.1  # the 0.2 s of validation is left out
    rows = metrics.read(tmp_path).rows
    assert [r.val_loss for r in rows] == [None, 1.25]
    assert json.loads((tmp_path / metrics.METRICS_FILE).read_text().splitlines()[0])["val_loss"] is None
    assert monitor.latest_val_loss(rows) == 1.25 and monitor.latest_val_loss(rows[:1]) is None


# --- --eval-batches: the first N micro-batches on each rank, the loss still over every rank ---

SEQ_LEN, CAP, WORLD = 64, 2, 2


def tiny_model(vocab_size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=SEQ_LEN))
    kernels.apply(model, kernels.Kernels(liger=False, fused_loss=False, fp8=False))  # the worker's summed loss
    return model


def _validate_on_rank(rank: int, data: str, out: str) -> None:
    torch.set_num_threads(1)  # as a DataLoader's forked worker: no thread pool inherited from the parent
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=WORLD)
    try:
        env = Dist(rank=rank, local_rank=rank, world_size=WORLD, local_world_size=WORLD, device=torch.device("cpu"))
        model = tiny_model(st.TokenStore(data).vocab_size)
        forwards = []
        model.model.register_forward_hook(lambda *_: forwards.append(1))
        results = {}
        for cap in (CAP, None):
            spec = JobSpec(data=data, seq_len=SEQ_LEN, micro_batch=1, eval_batches=cap)
            forwards.clear()
            loss_sum, tokens = build_validator(spec, env, Fsdp(spec, None), total=1, pad_id=2).run(model)
            results[str(cap)] = {"loss_sum": loss_sum, "tokens": tokens, "forwards": len(forwards)}
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def eval_store(tmp_path_factory, tokenizer_dir) -> Path:
    tmp = tmp_path_factory.mktemp("evalsplit")
    records = [{"instruction": f"Question {i} about item {i * 7}?", "input": "", "output": f"Answer {i}. " * (1 + i % 4)}
               for i in range(80)]
    (tmp / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare(PrepareConfig(inputs=(tmp / "a.jsonl",), tokenizer=tokenizer_dir, out=tmp / "s", format="alpaca",
                          eval_fraction=0.5))
    return tmp / "s"


def test_eval_batches_caps_each_rank_and_the_loss_is_over_both_ranks(tmp_path, eval_store):
    # Forked, not spawned: the ranks start with everything imported (an import costs seconds on 2 cores).
    mp.start_processes(_validate_on_rank, args=(str(eval_store), str(tmp_path)), nprocs=WORLD, start_method="fork")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    stream = eval_stream(JobSpec(seq_len=SEQ_LEN), st.TokenStore(eval_store), pad_id=2)
    rows = stream.rows_in_epoch(0)
    assert rows > 2 * CAP * WORLD  # the cap leaves most of the split out
    model = tiny_model(st.TokenStore(eval_store).vocab_size)

    def one_process(n: int) -> tuple[float, int]:  # the first n rows, in one process
        loss, tokens = 0.0, 0
        with torch.no_grad():
            for i in range(n):
                inputs, labels, positions = (torch.from_numpy(a)[None] for a in stream.example(i))
                loss += model(**packing.model_inputs(inputs, positions), labels=labels).loss.item()
                tokens += int((labels != -100).sum())
        return loss, tokens

    for cap, n in (("2", CAP * WORLD), ("None", rows)):
        expected_loss, expected_tokens = one_process(n)
        assert all(r[cap]["forwards"] == (CAP if cap == "2" else -(-rows // WORLD)) for r in ranks), ranks
        # Every rank holds the all-reduced totals: both ranks' examples, not its own.
        assert all(r[cap]["tokens"] == expected_tokens for r in ranks)
        assert all(r[cap]["loss_sum"] == pytest.approx(expected_loss, rel=1e-5) for r in ranks)


def test_eval_batches_must_be_positive(cli):
    with pytest.raises(SpecError, match="--eval-batches 0 must be positive"):
        JobSpec(eval_batches=0)
    code, _, err = cli("submit", "--cluster", "local", "--eval-batches", "-1", "--dry-run")
    assert code == 2 and "--eval-batches -1 must be positive" in err, err


# --- the ETA counts the validations still to come ---

def _fake_run(tmp_path: Path, every: int | None, validations: dict[int, float]) -> Job:
    """A running job at step 40 of 100, 2 s a step; rows at `validations` steps carry a val_loss that took
    the given seconds."""
    run_dir = tmp_path / f"1-run-{every}"
    (run_dir / "events").mkdir(parents=True)
    (run_dir / "spec.json").write_text(spec_lib.build({"cluster": "local", "max_steps": 100,
                                                        "eval_every_steps": every}).to_json())
    now = time.time()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, 41):
            val_s = validations.get(step)
            f.write(MetricsRow(step=step, total_steps=100, epoch=step / 100, loss=2.0, lr=1e-4, grad_norm=1.0,
                               tokens=step * 1000, tokens_per_s=500.0, tokens_per_s_per_gpu=500.0, mfu=0.1, peak="a100-80g",
                               peak_flops=312e12, step_time_s=2.0, elapsed_s=2.0 * step, time=now - (40 - step) * 2.0,
                               mem_gib=1.0, val_loss=1.5 if val_s else None, val_s=val_s or 0.0).to_json() + "\n")
    job = Job(id=1, name="run", run_dir=run_dir, cluster="local", cluster_job_id="1", submitted_at=now - 100)
    registry.write_job_file(job)
    return job


def test_the_eta_counts_the_validations_still_to_come_at_their_measured_time(tmp_path):
    now = time.time()
    plain = monitor.row(_fake_run(tmp_path / "a", None, {}), state="RUNNING", now=now)
    assert plain.eta_s == pytest.approx(60 * 2.0, abs=0.5)  # 60 steps left, no validation measured
    # Every 10 steps, measured at 7, 9 and 11 s (median 9): steps 50, 60, ..., 100 are still due: 6 of them.
    every = monitor.row(_fake_run(tmp_path / "b", 10, {20: 7.0, 30: 9.0, 40: 11.0}), state="RUNNING", now=now)
    assert every.eta_s - plain.eta_s == pytest.approx(6 * 9.0, abs=0.5)
    # Every 30 steps, one measured (20 s): 60, 90 and the one after the last step, 100.
    at_end = monitor.row(_fake_run(tmp_path / "c", 30, {30: 20.0}), state="RUNNING", now=now)
    assert at_end.eta_s - plain.eta_s == pytest.approx(3 * 20.0, abs=0.5)  # 60, 90 and 100
    assert monitor.validations_after(40, 100, None) == 1 and monitor.validations_after(100, 100, 10) == 0
