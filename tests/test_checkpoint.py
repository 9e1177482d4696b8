"""Checkpoints, resume, the stop request and the final export's additions (--merge, --init-from):
the bookkeeping as units, then real torchrun launches on this CPU (2 processes, gloo, the tiny model,
seq 64), each shared between assertions through a module fixture.

The launches (about 4 s each on 2 cores; the tokenizer is trained once and copied into each run):
  full:  an uninterrupted reference; one run stopped (stop request) at 3, relaunched and crashed at
         6, relaunched past a planted incomplete checkpoint to the end; the reference's last
         checkpoint resumed on one rank
  lora:  an uninterrupted reference with --merge; one run stopped at 1 and relaunched; a run
         --init-from the reference's final/
  a two-rank torchrun of this file: micro-batches of 2 accumulated twice vs micro-batches of 4

On the CPU in fp32 a resumed run is bitwise the uninterrupted one: losses compare with ==, weights
with torch.equal.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from llamajobs import events
from llamajobs.catalog import SIZES
from llamajobs.data import read_texts
from llamajobs.data.sampler import IGNORE_INDEX, WindowSampler, tokenize_documents
from llamajobs.data.tokenizer import load_tokenizer
from llamajobs.spec import DebugSpec, JobSpec
from llamajobs.worker import checkpoint, kernels, parallel, rng
from llamajobs.worker import model as model_lib
from llamajobs.worker.checkpoint import Checkpointer
from llamajobs.worker.metrics import MetricsLogger
from llamajobs.worker.parallel import Dist
from tests.conftest import assert_exit_0, assert_same_tensors, metrics_rows, set_fault, torchrun

# Measured on this CPU (fp32, 2 ranks, 4 steps): micro-batches of 2 x 2 vs 4 x 1 differ by at most
# 1.6e-7 relative in the loss (a different summation order in the matmuls, carried through AdamW).
MICRO_BATCH_RTOL = 1e-5
BASE = dict(size="tiny", cluster="local", procs_per_node=2, seq_len=64, global_batch=8, micro_batch=2, lr=3e-3)


# --- the checkpoints on disk ---


def _fake_checkpoint(root: Path, step: int, meta: str | None = '{"complete": true}') -> Path:
    folder = root / f"step-{step}"
    folder.mkdir(parents=True)
    (folder / "__0_0.distcp").write_bytes(b"shards")
    if meta is not None:
        (folder / checkpoint.META).write_text(meta)
    return folder


def test_only_checkpoints_with_complete_metadata_count_and_latest_is_only_a_hint(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, '{"complete": false}')
    _fake_checkpoint(tmp_path, 8, '{"complete": tr')  # torn: its writer died mid-file
    _fake_checkpoint(tmp_path, 10, None)  # the save died before the metadata
    (tmp_path / ".tmp-step-12-99").mkdir()
    (tmp_path / checkpoint.LATEST).write_text("step-10\n")
    assert checkpoint.complete_steps(tmp_path) == [2, 4]
    assert checkpoint.newest_complete_step(tmp_path) == 4
    assert "names 'step-10', not the newest complete checkpoint; resuming from step-4" in capsys.readouterr().out
    assert checkpoint.newest_complete_step(tmp_path / "none") is None


def test_commit_moves_the_checkpoint_into_place_then_prune_keeps_the_newest(tmp_path: Path) -> None:
    stale = _fake_checkpoint(tmp_path, 6, None)  # an incomplete leftover of the same step
    for step in (2, 4, 6):
        tmp = tmp_path / f".tmp-step-{step}-1"
        tmp.mkdir()
        (tmp / "__0_0.distcp").write_bytes(b"shards")
        final = checkpoint.commit(tmp_path, tmp, step, {"step": step, "world_size": 2})
        assert final == tmp_path / f"step-{step}" and not tmp.exists()
        assert checkpoint.read_meta(final) == {"step": step, "world_size": 2, "complete": True}
        assert (tmp_path / checkpoint.LATEST).read_text() == f"step-{step}\n"
    assert stale.is_dir() and checkpoint.complete_steps(tmp_path) == [2, 4, 6]
    _fake_checkpoint(tmp_path, 9, None)
    (tmp_path / ".tmp-step-7-old").mkdir()
    checkpoint.prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-4", "step-6"]


def test_checkpointer_saves_on_steps_minutes_and_stop_requests(single_rank_group, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    spec = JobSpec(checkpoint_every_steps=5, checkpoint_every_minutes=1.0)
    env = Dist(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    checkpointer = Checkpointer(tmp_path, spec, env, state=None, strategy=parallel.Fsdp(spec, env),
                                clock=lambda: now[0])
    saved = []

    def save(how: str, step: int) -> None:
        saved.append((step, how))
        checkpointer.last_save = now[0]
    monkeypatch.setattr(checkpointer, "save", lambda step: save("sync", step))
    monkeypatch.setattr(checkpointer, "save_in_background", lambda step: save("background", step))
    assert not checkpointer.after_step(1) and saved == []
    now[0] = 59.0
    checkpointer.after_step(2)
    now[0] = 60.0  # a minute since the start of training
    checkpointer.after_step(3)
    now[0] = 100.0
    checkpointer.after_step(4)
    checkpointer.after_step(5)  # every 5 steps
    assert saved == [(3, "background"), (5, "background")]  # periodic saves: in the background
    (tmp_path / "stop-request").write_text("timeout\n")
    assert checkpointer.after_step(6) and saved[-1] == (6, "sync")  # a stop's save: synchronous
    assert not (tmp_path / "stop-request").exists()
    assert (tmp_path / "stop-request.done-step-6").read_text() == "timeout\n"
    assert [(e["event"], e["step"]) for e in events.read(tmp_path)] == [("stopped", 6)]


def test_a_checkpoint_of_the_other_mode_is_refused_by_flag(single_rank_group, tmp_path: Path) -> None:
    _fake_checkpoint(tmp_path / "checkpoints", 4, '{"complete": true, "mode": "lora"}')
    env = Dist(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    checkpointer = Checkpointer(tmp_path, JobSpec(mode="full"), env, state=None,
                                strategy=parallel.Fsdp(JobSpec(mode="full"), env))
    with pytest.raises(ValueError, match="saved by a --mode lora run; resume it with --mode lora, or turn resume off"):
        checkpointer.resume(4)


def test_metrics_past_the_resumed_step_are_discarded(tmp_path: Path) -> None:
    logger = MetricsLogger(tmp_path, enabled=True, total_steps=9, steps_per_epoch=9, tokens_per_step=1,
                           flops_per_token=1.0, world_size=1, device=torch.device("cpu"))
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in (1, 2, 3, 4, 5)] + ['{"step": 6, "lo']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    logger.discard_after(3)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    logger.discard_after(0)  # a run that starts over keeps nothing of an earlier attempt
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path: Path) -> None:
    rng.seed_all(3, rank=1)
    torch.save(rng.get_state(torch.device("cpu")), tmp_path / "rng.pt")
    first = (np.random.rand(), torch.rand(3), __import__("random").random())
    rng.seed_all(4, rank=0)
    rng.set_state(torch.load(tmp_path / "rng.pt", weights_only=True), torch.device("cpu"))
    again = (np.random.rand(), torch.rand(3), __import__("random").random())
    assert first[0] == again[0] and torch.equal(first[1], again[1]) and first[2] == again[2]


# --- --init-from: what it may hold ---


def _adapter_dir(tmp_path: Path, **provenance: object) -> Path:
    folder = tmp_path / "final"
    folder.mkdir()
    adapter = {"r": 8, "lora_alpha": 32, "target_modules": ["v_proj", "q_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(adapter))
    if provenance:
        (folder / model_lib.PROVENANCE).write_text(json.dumps(provenance))
    return folder


@pytest.mark.parametrize("changes, named", [
    ({"mode": "full"}, "holds a LoRA adapter: continue it with --mode lora"),
    ({"mode": "lora", "lora_r": 16}, "pass --lora-r 8 --lora-alpha 32 --lora-targets q_proj,v_proj"),
    ({"mode": "lora", "seed": 1}, r"random init of --size tiny --seed 0 \(no --model-path\); pass the same"),
])
def test_an_adapter_init_from_that_cannot_continue_is_refused_by_flag(tmp_path: Path, changes: dict,
                                                                     named: str) -> None:
    folder = _adapter_dir(tmp_path, base_weights=None, size="tiny", seed=0)
    model_lib.check_init_from(JobSpec(mode="lora", init_from=str(folder)))  # the same base: accepted
    with pytest.raises(ValueError, match=named):
        model_lib.check_init_from(JobSpec(**{"init_from": str(folder), **changes}))


def test_init_from_must_hold_an_adapter_or_a_full_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a LoRA adapter"):
        model_lib.check_init_from(JobSpec(init_from=str(tmp_path)))
    LlamaConfig(**SIZES["tiny"].hf_config()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert model_lib.weights_path(JobSpec(init_from=str(tmp_path))) == str(tmp_path)
    with pytest.raises(ValueError, match="replaces --model-path; leave --model-path out"):
        model_lib.check_init_from(JobSpec(init_from=str(tmp_path), model_path=str(tmp_path)))


# --- launches ---


@pytest.fixture(scope="module")
def new_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    """A run dir with spec.json and the bundled tokenizer already trained (as a requeued run has it)."""
    def make(name: str, **spec: object) -> Path:
        run_dir = tmp_path_factory.mktemp(name)
        shutil.copytree(tokenizer_dir, run_dir / "tokenizer")
        (run_dir / "spec.json").write_text(JobSpec(**{**BASE, **spec}).to_json())
        return run_dir
    return make


def _work(run_dir: Path, fault: str | None = None, nproc: int = 2) -> subprocess.CompletedProcess:
    set_fault(run_dir, fault)
    return torchrun("-m", "llamajobs.worker", str(run_dir), nproc=nproc)


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics_rows(run_dir)]


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


FULL = dict(max_steps=6, checkpoint_every_steps=2)  # checkpoints at 2, 4, 6; keep_checkpoints 2
SLOW_WRITE_S = 3.0  # a background write's wait: longer than two steps of the tiny model here (~0.2 s each)


@pytest.fixture(scope="module")
def full_reference(new_run) -> Path:
    run_dir = new_run("full-reference", **FULL)
    assert_exit_0(_work(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def full_interrupted(new_run) -> SimpleNamespace:
    """Stopped by a stop request at 3; relaunched, crashed when step 6 starts (checkpoint at 4, step 5
    logged); a newer incomplete checkpoint planted with `latest` naming it; relaunched to the end."""
    run_dir = new_run("full-interrupted", **FULL)
    ckpt = run_dir / "checkpoints"
    stop = _work(run_dir, "stop:3")
    assert_exit_0(stop)
    after_stop = SimpleNamespace(files=_listing(run_dir), checkpoints=_listing(ckpt), losses=_losses(run_dir))
    crash = _work(run_dir, "crash:6")
    after_crash = SimpleNamespace(checkpoints=_listing(ckpt), losses=_losses(run_dir))
    _fake_checkpoint(ckpt, 9, None)
    (ckpt / "latest").write_text("step-9\n")
    last = _work(run_dir)
    assert_exit_0(last)
    return SimpleNamespace(run_dir=run_dir, stop=stop, crash=crash, last=last, after_stop=after_stop,
                           after_crash=after_crash)


@pytest.mark.slow
def test_a_stop_request_saves_that_step_and_exits_0_without_final(full_interrupted: SimpleNamespace) -> None:
    after = full_interrupted.after_stop
    assert "final" not in after.files and "stop-request" not in after.files
    assert "stop-request.done-step-3" in after.files  # consumed: the requeued attempt does not stop again
    assert after.checkpoints == ["latest", "step-2", "step-3"] and [s for s, _ in after.losses] == [1, 2, 3]
    assert "stop request: saved step 3; exiting" in full_interrupted.stop.stdout


@pytest.mark.slow
def test_resumed_runs_repeat_the_uninterrupted_losses_and_weights_bitwise(full_reference: Path,
                                                                          full_interrupted: SimpleNamespace) -> None:
    reference = _losses(full_reference)
    assert [s for s, _ in reference] == list(range(1, 7))
    assert full_interrupted.after_crash.losses == reference[:5]  # steps 4 and 5: resumed from the stop at 3
    assert _losses(full_interrupted.run_dir) == reference  # no step twice: the crashed attempt's 5 was redone
    assert_same_tensors(load_file(full_reference / "final" / "model.safetensors"),
                         load_file(full_interrupted.run_dir / "final" / "model.safetensors"))


@pytest.mark.slow
def test_a_crash_resumes_from_the_newest_complete_checkpoint_past_an_incomplete_one(
        full_interrupted: SimpleNamespace) -> None:
    assert full_interrupted.crash.returncode != 0 and "injected fault at step 6" in full_interrupted.crash.stderr
    assert full_interrupted.after_crash.checkpoints == ["latest", "step-3", "step-4"]
    assert "names 'step-9', not the newest complete checkpoint; resuming from step-4" in full_interrupted.last.stdout
    recorded = [(e["event"], e.get("step")) for e in events.read(full_interrupted.run_dir)
                if e["event"] != "checkpointed"]
    assert recorded == [("started", None), ("stopped", 3), ("started", None), ("resumed", 3),
                        ("started", None), ("resumed", 4), ("finished", 6)]
    ckpt = full_interrupted.run_dir / "checkpoints"  # the incomplete step-9 went with the next save's cleanup
    assert _listing(ckpt) == ["latest", "step-4", "step-6"] and (ckpt / "latest").read_text() == "step-6\n"


@pytest.mark.slow
def test_periodic_saves_written_in_the_background_resume_bitwise_and_a_stop_saves_synchronously(
        full_reference: Path, full_interrupted: SimpleNamespace, tmp_path: Path) -> None:
    """The reference's periodic saves (2, 4, 6) were asynchronous (DCP's async_save, committed at a
    later step boundary or at the end); its step-4 checkpoint resumed gives the uninterrupted run's
    losses and weights bitwise, as the synchronous save of the stop request at 3 does."""
    def saves(run_dir: Path) -> list[tuple[int, bool]]:
        return [(e["step"], e["background"]) for e in events.read(run_dir) if e["event"] == "checkpointed"]
    assert saves(full_reference) == [(2, True), (4, True), (6, True)]
    assert saves(full_interrupted.run_dir)[:2] == [(2, True), (3, False)]  # 3: the stop request's
    run_dir = tmp_path / "from-step-4"
    shutil.copytree(full_reference, run_dir, ignore=shutil.ignore_patterns("final", "events", "step-6"))
    (run_dir / "checkpoints" / "latest").write_text("step-4\n")
    assert_exit_0(_work(run_dir))
    assert _losses(run_dir) == _losses(full_reference)
    assert_same_tensors(load_file(full_reference / "final" / "model.safetensors"),
                        load_file(run_dir / "final" / "model.safetensors"))


@pytest.mark.slow
def test_training_goes_on_while_a_periodic_save_is_written(new_run, full_reference: Path) -> None:
    """A slow filesystem (each rank's write of a background save waits 3 s first): steps 3 and 4 are
    trained and logged while step 2's checkpoint is still being written, which is committed only
    later; the losses are the reference's, bitwise."""
    run_dir = new_run("slow-writes", **FULL, debug=DebugSpec(slow_checkpoint_write_s=SLOW_WRITE_S))
    assert_exit_0(_work(run_dir))
    rows = {r["step"]: r for r in metrics_rows(run_dir)}
    saves = {e["step"]: e for e in events.read(run_dir) if e["event"] == "checkpointed"}
    assert sorted(saves) == [2, 4, 6] and all(e["background"] for e in saves.values())
    # Step 2's save was still being written after step 3's boundary, and after step 4 was logged: the
    # boundary of step 4, which starts the next save, waited for it and committed it.
    assert rows[4]["time"] < saves[2]["time"] < saves[4]["time"]
    assert saves[2]["written_s"] >= SLOW_WRITE_S
    assert _losses(run_dir) == _losses(full_reference)
    assert checkpoint.complete_steps(run_dir / "checkpoints") == [4, 6]  # (keep_checkpoints 2)


@pytest.mark.slow
def test_checkpoints_are_recorded_and_only_the_newest_two_kept(full_reference: Path) -> None:
    ckpt = full_reference / "checkpoints"
    assert _listing(ckpt) == ["latest", "step-4", "step-6"]
    assert _listing(ckpt / "step-6") == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json", "rng-rank0.pt",
                                          "rng-rank1.pt", "train_state.json"]
    meta = json.loads((ckpt / "step-6" / "meta.json").read_text())
    assert (meta["step"], meta["world_size"], meta["device"], meta["complete"]) == (6, 2, "cpu", True)
    saves = [e for e in events.read(full_reference) if e["event"] == "checkpointed"]
    assert [e["step"] for e in saves] == [2, 4, 6]
    assert all(e["bytes"] > 1e6 and 0 < e["seconds"] < 30 for e in saves)  # ~2.3 MB: weights + 2 Adam moments


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_world_size_with_fresh_random_streams(full_reference: Path,
                                                                              tmp_path: Path) -> None:
    """The reference's last checkpoint (2 ranks) into 1 rank: DCP reshards the weights exactly; the
    RNG states have no rank to go to and are reseeded (with a warning). Nothing is left to train, so
    final/ is the checkpoint's weights."""
    run_dir = tmp_path / "one-rank"
    shutil.copytree(full_reference, run_dir, ignore=shutil.ignore_patterns("final", "events", "step-4"))
    result = _work(run_dir, nproc=1)
    assert_exit_0(result)
    assert "saved by 2 cpu processes, this run has 1 cpu; random streams (dropout) are reseeded" in result.stdout
    assert_same_tensors(load_file(full_reference / "final" / "model.safetensors"),
                         load_file(run_dir / "final" / "model.safetensors"))
    assert [(e["event"], e.get("step")) for e in events.read(run_dir)] == [("started", None), ("resumed", 6),
                                                                           ("finished", 6)]


# --- LoRA: resume, --merge, --init-from ---


LORA = dict(mode="lora", merge=True, max_steps=4, checkpoint_every_steps=2)  # dropout 0.1: RNG state matters


@pytest.fixture(scope="module")
def lora_reference(new_run) -> Path:
    run_dir = new_run("lora-reference", **LORA)
    assert_exit_0(_work(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def lora_interrupted(new_run) -> Path:
    run_dir = new_run("lora-interrupted", **LORA)
    assert_exit_0(_work(run_dir, "stop:1"))
    assert_exit_0(_work(run_dir))
    return run_dir


@pytest.mark.slow
def test_lora_resume_is_exact_and_its_checkpoint_holds_only_the_adapters(lora_reference: Path,
                                                                         lora_interrupted: Path) -> None:
    assert _losses(lora_interrupted) == _losses(lora_reference)
    assert_same_tensors(load_file(lora_reference / "final" / "adapter_model.safetensors"),
                         load_file(lora_interrupted / "final" / "adapter_model.safetensors"))
    saved = dcp.FileSystemReader(lora_reference / "checkpoints" / "step-4").read_metadata().state_dict_metadata
    weights = [k for k in saved if k.startswith("model.")]
    assert len(weights) == 8 and all("lora_A" in k or "lora_B" in k for k in weights)  # 2 layers x q, v x A, B
    assert any(k.startswith("optimizer.state.") and k.endswith("exp_avg_sq") for k in saved)


def _random_base(seed: int = 0) -> LlamaForCausalLM:
    """The tiny random init the worker uses without --model-path (rank 0, seeded with --seed)."""
    config = LlamaConfig(**SIZES["tiny"].hf_config())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


@pytest.mark.slow
def test_merge_writes_a_full_model_with_the_adapters_folded_in(lora_reference: Path) -> None:
    merged = LlamaForCausalLM.from_pretrained(lora_reference / "final" / "merged").state_dict()
    base = _random_base().state_dict()
    adapter = load_file(lora_reference / "final" / "adapter_model.safetensors")
    scale = 32 / 8  # lora_alpha / r
    assert merged.keys() == base.keys()
    for name, weight in merged.items():
        prefix = "base_model.model." + name.removesuffix(".weight")
        if prefix + ".lora_A.weight" in adapter:
            delta = scale * adapter[prefix + ".lora_B.weight"] @ adapter[prefix + ".lora_A.weight"]
            assert delta.abs().max() > 0 and torch.allclose(weight, base[name] + delta, atol=1e-6), name
        else:
            assert torch.equal(weight, base[name]), name
    assert load_tokenizer(lora_reference / "final" / "merged")("Methods").input_ids[0] == 1


@pytest.fixture(scope="module")
def lora_continued(new_run, lora_reference: Path) -> Path:
    run_dir = new_run("lora-continued", mode="lora", init_from=str(lora_reference / "final"), lora_dropout=0.0,
                      max_steps=1)
    assert_exit_0(_work(run_dir))
    return run_dir


def _first_batch_loss(model: torch.nn.Module, tokenizer_dir: Path) -> float:
    """The mean token loss of a run's first global batch (seed 0, global batch 8, seq 64)."""
    docs = tokenize_documents(read_texts(), load_tokenizer(tokenizer_dir))
    sampler = WindowSampler(docs, seq_len=64, global_batch=8, micro_batch=8, rank=0, world_size=1, seed=0, pad_id=2)
    [(inputs, labels)] = next(sampler)
    with torch.no_grad():
        logits = model(input_ids=inputs).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX).item()


@pytest.mark.slow
def test_init_from_a_lora_final_continues_from_its_adapter(lora_reference: Path, lora_continued: Path) -> None:
    [(step, loss)] = _losses(lora_continued)
    merged = LlamaForCausalLM.from_pretrained(lora_reference / "final" / "merged")
    expected = _first_batch_loss(merged, lora_reference / "final")
    assert step == 1 and loss == pytest.approx(expected, rel=1e-5)
    untrained = _first_batch_loss(_random_base(), lora_reference / "final")
    assert abs(untrained - expected) > 1e-3  # so the check above can tell a loaded adapter from a fresh one
    provenance = json.loads((lora_continued / "final" / "llamajobs.json").read_text())
    assert provenance["init_from"] == str(lora_reference / "final") and provenance["base_weights"] is None


@pytest.mark.slow
def test_init_from_a_full_final_reads_its_weights_like_a_model_path(full_reference: Path) -> None:
    spec = JobSpec(init_from=str(full_reference / "final"))
    config = model_lib.model_config(spec)
    assert config._attn_implementation == model_lib.CAUSAL_SDPA and config.hidden_size == SIZES["tiny"].dim
    assert_same_tensors(model_lib._full_state_dict_rank0(spec, config),
                         load_file(full_reference / "final" / "model.safetensors"))


# --- gradient accumulation: micro-batches of 2 twice == micro-batches of 4 once ---


def accumulation_check(tokenizer_dir: Path) -> dict:
    """In a 2-rank group: the per-step losses of 4 optimizer steps with global batch 8 as 2 ranks x 2
    micro-batches of 2 and as 2 ranks x 1 micro-batch of 4, on the sample papers cut to 10..100
    tokens (seq 64: many rows padded), through the worker's own model, optimizer and loop."""
    from llamajobs.worker import parallel
    from llamajobs.worker.train import build_optimizer, build_strategy, train_loop

    lengths = np.random.default_rng(0).integers(10, 100, size=80)
    docs = [doc[:n] for doc, n in zip(tokenize_documents(read_texts(), load_tokenizer(tokenizer_dir)), lengths)]
    env = parallel.init_distributed(JobSpec(**BASE))
    results: dict = {}
    for micro_batch in (2, 4):
        spec = JobSpec(**{**BASE, "micro_batch": micro_batch, "max_steps": 4})
        sampler = WindowSampler(docs, seq_len=64, global_batch=8, micro_batch=micro_batch, rank=env.rank,
                                world_size=env.world_size, seed=0, pad_id=2)
        strategy = build_strategy(spec, env)
        model = strategy.build_model(model_lib.model_config(spec), load_weights=True,
                                     chosen=kernels.choose(spec, env.device.type))
        optimizer, scheduler = build_optimizer(model, spec, strategy, total=4)
        losses: list[float] = []
        metrics = SimpleNamespace(start_clock=lambda step: None,
                                  log=lambda step, loss, lr, norm, **timings: losses.append(loss))
        no_checkpoints = SimpleNamespace(after_step=lambda step: False, seconds_saving=0.0)
        train_loop(model, optimizer, scheduler, sampler, metrics, no_checkpoints, spec=spec, env=env, start=0, total=4,
                   strategy=strategy, validator=None)
        results[micro_batch] = losses
    first = WindowSampler(docs, seq_len=64, global_batch=8, micro_batch=8, rank=0, world_size=1, seed=0, pad_id=2)
    labels = next(first)[0][1]
    results["padded_fraction"] = (labels == IGNORE_INDEX).float().mean().item()
    return results


@pytest.fixture(scope="module")
def accumulation(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> dict:
    out = tmp_path_factory.mktemp("accumulation") / "losses.json"
    assert_exit_0(torchrun(str(Path(__file__)), "accumulation-check", str(tokenizer_dir), str(out)))
    return json.loads(out.read_text())


@pytest.mark.slow
def test_two_accumulated_micro_batches_of_2_give_the_losses_of_one_micro_batch_of_4(accumulation: dict) -> None:
    assert accumulation["padded_fraction"] > 0.1  # (0.2) the batches hold padding, masked out of the loss
    two, four = accumulation["2"], accumulation["4"]
    assert len(two) == len(four) == 4 and two[-1] < two[0] - 0.05  # it learns: the steps' gradients count
    assert two == pytest.approx(four, rel=MICRO_BATCH_RTOL)
    print("micro-batch 2 x 2 vs 4 x 1, largest relative loss difference:",
          max(abs(a - b) / b for a, b in zip(two, four)))


if __name__ == "__main__":
    # `torchrun --nproc-per-node 2 tests/test_checkpoint.py accumulation-check TOKENIZER_DIR OUT.json`
    from llamajobs.worker import parallel

    assert sys.argv[1] == "accumulation-check"
    try:
        result = accumulation_check(Path(sys.argv[2]))
        if dist.get_rank() == 0:
            Path(sys.argv[3]).write_text(json.dumps(result))
    finally:
        parallel.teardown()  # (collects the FSDP models first: see there)
