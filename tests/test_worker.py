"""The training worker: tokenizer, sampler, schedule and loss normalisation as units; then real
torchrun launches on this CPU (2 processes, gloo), shared between assertions by module fixtures.

This file is also a torchrun script (see the bottom): the two-rank gradient check runs it.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import sentencepiece as spm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from llamajobs import catalog, events
from llamajobs import spec as spec_mod
from llamajobs.catalog import SIZES, TINY_VOCAB
from llamajobs.data import read_texts
from llamajobs.data.sampler import IGNORE_INDEX, WindowSampler, steps_per_epoch, total_steps
from llamajobs.data.tokenizer import train_tokenizer
from llamajobs.errors import SpecError
from llamajobs.spec import DebugSpec, JobSpec
from llamajobs.worker import kernels
from llamajobs.worker import model as model_lib
from llamajobs.worker import parallel
from llamajobs.worker.kernels import token_loss_sum
from llamajobs.worker.train import (ENGINES, build_optimizer, build_strategy, check_supported, forward_backward,
                                    train_loop, train_step)
from tests.conftest import assert_exit_0, metrics_rows, torchrun



# --- tokenizer ---


def test_tokenizer_has_the_tiny_vocab_and_round_trips_text(tokenizer_dir: Path) -> None:
    tokenizer = LlamaTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == TINY_VOCAB
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    text = "Patients (n = 1,204) aged 75+ had  two spaces,\na new line, and ünïcode: 漢字 → µg/mL."
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte fallback: nothing is lost
    assert tokenizer.tokenize("2024") == ["▁", "2", "0", "2", "4"]  # split_digits, like LLaMA


def test_tokenizer_training_is_deterministic(tokenizer_dir: Path, tmp_path: Path) -> None:
    again = train_tokenizer(read_texts(), TINY_VOCAB, tmp_path)
    first, second = (spm.SentencePieceProcessor(model_file=str(d / "tokenizer.model")) for d in (tokenizer_dir, again))
    pieces = [[(p.id_to_piece(i), p.get_score(i)) for i in range(p.get_piece_size())] for p in (first, second)]
    assert pieces[0] == pieces[1]  # (the files differ only in the recorded output path)
    assert (tokenizer_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


# --- sampler ---


def _docs(n: int = 23) -> list[np.ndarray]:
    """Documents of varied lengths (some shorter than a window), each token unique to its document."""
    return [np.arange(1000 * d, 1000 * d + 5 + 13 * d, dtype=np.int32) for d in range(n)]


def _sampler(world_size: int = 2, rank: int = 0, seed: int = 0, docs: list[np.ndarray] | None = None,
             micro_batch: int = 2) -> WindowSampler:
    return WindowSampler(docs or _docs(), seq_len=16, global_batch=8, micro_batch=micro_batch, rank=rank,
                         world_size=world_size, seed=seed, pad_id=2)


def _rows(micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in micro_batches]), torch.cat([y for _, y in micro_batches])


def test_sampler_is_deterministic_and_seeded() -> None:
    a, b, c = _sampler(seed=0), _sampler(seed=0), _sampler(seed=1)
    for _ in range(5):
        xa, xb, xc = _rows(next(a))[0], _rows(next(b))[0], _rows(next(c))[0]
        assert torch.equal(xa, xb)
    assert not torch.equal(xa, xc)


def test_every_epoch_visits_every_document_once_in_a_new_order() -> None:
    sampler, n = _sampler(), 23
    orders = [[sampler.document_at(epoch * n + i) for i in range(n)] for epoch in range(3)]
    for epoch, order in enumerate(orders):
        assert {e for e, _ in order} == {epoch}
        assert sorted(d for _, d in order) == list(range(n))
    assert orders[0] != orders[1] != orders[2]
    # The stream of batches follows the same order: the first token of each row names its document.
    first_tokens = _rows(next(_sampler(world_size=1)))[0][:, 0]
    assert [int(t) // 1000 for t in first_tokens] == [d for _, d in orders[0][:8]]


def test_ranks_get_disjoint_contiguous_slices_whatever_the_world_size() -> None:
    single = _sampler(world_size=1, micro_batch=2)
    ranks = [_sampler(world_size=2, rank=r) for r in range(2)]
    for _ in range(4):
        micro_batches = [next(s) for s in ranks]
        assert all(len(mb) == 2 and mb[0][0].shape == (2, 16) for mb in micro_batches)  # 8 / 2 ranks / 2 per micro
        together = [torch.cat(parts) for parts in zip(*(_rows(mb) for mb in micro_batches))]
        expected = _rows(next(single))
        assert torch.equal(together[0], expected[0]) and torch.equal(together[1], expected[1])
        docs = [{int(t) // 1000 for t in _rows(mb)[0][:, 0]} for mb in micro_batches]
        assert not docs[0] & docs[1]


def test_windows_are_shifted_labels_and_short_documents_are_padded_and_masked() -> None:
    docs = [np.arange(100, 107, dtype=np.int32), np.arange(200, 300, dtype=np.int32)]  # 7 and 100 tokens
    sampler = WindowSampler(docs, seq_len=16, global_batch=2, micro_batch=2, rank=0, world_size=1, seed=0, pad_id=2)
    inputs, labels = _rows(next(sampler))
    short = 0 if inputs[0, 0] == 100 else 1
    assert inputs[short].tolist() == list(range(100, 106)) + [2] * 10
    assert labels[short].tolist() == list(range(101, 107)) + [IGNORE_INDEX] * 10
    long = 1 - short
    assert torch.equal(labels[long], inputs[long] + 1)  # a full window of seq_len + 1 consecutive tokens
    assert (labels[long] != IGNORE_INDEX).all()


def test_sampler_state_resumes_to_the_identical_next_batch() -> None:
    original = _sampler(rank=1)
    for _ in range(4):  # 32 samples: past the first epoch of 23 documents
        next(original)
    state = json.loads(json.dumps(original.state_dict()))  # survives a checkpoint's JSON
    assert (state["epoch"], state["position"]) == (1, 9)
    resumed = _sampler(rank=1)
    resumed.load_state_dict(state)
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(_rows(next(original)), _rows(next(resumed))))
    with pytest.raises(ValueError, match="--seed"):
        _sampler(seed=5).load_state_dict(state)


def test_steps_per_epoch_and_total_steps() -> None:
    assert steps_per_epoch(80, 8, 64) == 10
    assert steps_per_epoch(5, 8, 64) == 1  # fewer documents than a batch: still a step
    assert steps_per_epoch(80, 8, 64, tokens_per_epoch=8 * 64 * 25 + 3) == 25
    assert total_steps(None, 1.5, 10) == 15 and total_steps(7, 1.5, 10) == 7 and total_steps(None, 0.01, 10) == 1


def test_batch_arithmetic_errors_name_the_settings() -> None:
    with pytest.raises(ValueError, match="--global-batch 8 must be a multiple of --micro-batch 3"):
        _sampler(micro_batch=3)


# --- schedule, refusals, fault injection ---


def test_every_strategy_is_built_by_its_engines_class() -> None:
    assert set(ENGINES) == {info.engine for info in catalog.STRATEGY.values()}
    cpu = parallel.Dist(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    for name, info in catalog.STRATEGY.items():
        assert type(build_strategy(JobSpec(strategy=name), cpu)) is ENGINES[info.engine]


def test_the_strategy_builds_the_optimizer_adamw_unless_zero_offloads_it() -> None:
    cpu = parallel.Dist(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    groups = [{"params": list(nn.Linear(2, 2).parameters()), "weight_decay": 0.0}]
    for name in ("fsdp", "fsdp-offload", "ds-zero2", "ds-zero3", "pp"):
        assert type(build_strategy(JobSpec(strategy=name, lr=0.5), cpu).build_optimizer(groups)) is torch.optim.AdamW
    # (ds-*-offload's DeepSpeedCPUAdam compiles an extension: tests/test_deepspeed.py runs it)


def test_lr_warms_up_linearly_then_decays_by_cosine_to_a_tenth() -> None:
    spec = JobSpec(lr=2.0, warmup_ratio=0.1, weight_decay=0.1)
    cpu = parallel.Dist(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    optimizer, scheduler = build_optimizer(nn.Linear(4, 4), spec, parallel.Fsdp(spec, cpu), total=12)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]  # no decay on the bias
    lrs = []
    for _ in range(12):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[:2] == pytest.approx([1.0, 2.0])  # ceil(0.1 * 12) = 2 warmup steps
    cosine = [2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 9))) for k in range(10)]
    assert lrs[2:] == pytest.approx(cosine)  # from the peak at step 2 to a tenth of it at the last step
    assert lrs[-1] == pytest.approx(0.2)


@pytest.mark.parametrize("changes, named", [
    ({"mode": "prefix", "merge": True}, "--merge folds LoRA adapters into the base; --mode prefix has none"),
    ({"strategy": "pp", "compile": True}, "--compile is implemented for fsdp and fsdp-offload; leave it out with "
                                          "--strategy pp"),
])
def test_unsupported_settings_are_refused_by_the_spec_the_worker_reads(changes: dict, named: str) -> None:
    with pytest.raises(SpecError, match=named):
        JobSpec(**changes)


def test_a_missing_token_store_is_refused_before_training() -> None:
    with pytest.raises(ValueError, match="/data/pmc"):
        check_supported(JobSpec(data="/data/pmc"))


def test_a_model_vocabulary_smaller_than_the_tokenizer_is_refused(tokenizer_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"vocabulary \(100 tokens\) is smaller than the tokenizer's \(512\)"):
        model_lib.check_vocab(LlamaConfig(vocab_size=100), LlamaTokenizer.from_pretrained(tokenizer_dir))


def test_injected_fault_raises_when_its_step_starts() -> None:
    fake_metrics = SimpleNamespace(start_clock=lambda step: None)
    spec = JobSpec(debug=DebugSpec(fault="crash", fault_step=2))
    with pytest.raises(RuntimeError, match="injected fault at step 2"):  # the first step of a run resumed at 1
        train_loop(nn.Linear(2, 2), None, None, iter(()), fake_metrics, None, spec=spec, env=None,
                   start=1, total=3, strategy=parallel.Fsdp(spec, None), validator=None)
    assert spec.debug.describe() == "debug: inject crash at step 2"  # (what rank 0 prints at start-up)
    with pytest.raises(SpecError, match="debug.fault 'boom': expected one of crash, oom, stop, die, hang, fsize"):
        spec_mod.from_mapping({"debug": {"fault": "boom", "fault_step": 2}})  # refused as spec.json is read


# --- loss normalisation: accumulated, sharded gradients == one pass over the global batch ---


def gradient_check(mode: str) -> dict[str, float]:
    """In an initialised process group: this rank's share of a fixed global batch of 8 rows (uneven
    padding), in micro-batches of 2, through the worker's FSDP model and forward_backward; against
    one unsharded forward/backward of the mean token loss over all 8 rows."""
    spec = JobSpec(size="tiny", mode=mode, lora_dropout=0.0, seq_len=16, global_batch=8, micro_batch=2)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    config = model_lib.model_config(spec)
    model = model_lib.build_meta_model(spec, config, torch.float32, kernels.choose(spec, "cpu"))
    parallel.parallelize(model, spec, torch.device("cpu"))
    model_lib.materialize(model, torch.device("cpu"), torch.device("cpu"))
    model_lib.load_weights(model, spec, config, rank)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(3, TINY_VOCAB, (8, 16), generator=generator)
    labels = torch.randint(3, TINY_VOCAB, (8, 16), generator=generator)
    for row in range(8):  # row r has 16 - 2r real labels: ranks and micro-batches hold unequal counts
        labels[row, 16 - 2 * row:] = IGNORE_INDEX
    if mode == "lora":  # lora_B starts at 0, which would leave lora_A's gradient 0: make it checkable
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.full_like(p, 0.01))
    mine = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    model.train()
    share = forward_backward(model, list(zip(inputs[mine].split(2), labels[mine].split(2))), world_size,
                             parallel.Fsdp(spec, None))
    dist.all_reduce(share)
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    weights = {n: p.full_tensor().detach() for n, p in model.named_parameters()}

    reference = model_lib.build_meta_model(spec, config, torch.float32, kernels.choose(spec, "cpu"))
    model_lib.materialize(reference, torch.device("cpu"), torch.device("cpu"))
    reference.load_state_dict(weights)
    reference.train()
    logits = reference(input_ids=inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)  # mean over tokens
    loss.backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads.keys() == expected.keys()
    return {
        "loss": share.item(),
        "reference_loss": loss.item(),
        "max_abs_error": max((grads[n] - expected[n]).abs().max().item() for n in grads),
        "max_abs_grad": max(g.abs().max().item() for g in expected.values()),
        "allclose": all(torch.allclose(grads[n], expected[n], rtol=1e-4, atol=1e-6) for n in grads),
    }


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_accumulated_gradient_equals_the_global_batch_mean_loss_gradient(single_rank_group, mode: str) -> None:
    result = gradient_check(mode)
    assert result["allclose"], result
    assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-5)


def test_chunked_loss_equals_the_whole_cross_entropy_in_value_and_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 11, generator=generator, requires_grad=True)
    labels = torch.randint(0, 11, (3, 7), generator=generator)
    labels[0, 4:] = IGNORE_INDEX
    whole = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    (expected,) = torch.autograd.grad(whole, logits)
    chunked = token_loss_sum(logits, labels, chunk=4)  # 21 rows: chunks of 4, 4, 4, 4, 4, 1
    (grad,) = torch.autograd.grad(chunked, logits)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-6)
    torch.testing.assert_close(grad, expected)


def test_the_worker_s_attention_skips_transformers_per_forward_packing_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """That check is an `if` on a GPU tensor (a host sync every forward); our attention name skips it
    and gives the same logits as transformers' sdpa."""
    import transformers.masking_utils as masking

    config = model_lib.model_config(JobSpec(size="tiny"))
    assert config._attn_implementation == model_lib.CAUSAL_SDPA
    torch.manual_seed(0)
    ours = LlamaForCausalLM(config)
    reference_config = LlamaConfig(**config.to_dict())
    reference_config._attn_implementation = "sdpa"
    reference = LlamaForCausalLM(reference_config)
    reference.load_state_dict(ours.state_dict())
    inputs = torch.randint(0, TINY_VOCAB, (2, 16))
    expected = reference(input_ids=inputs).logits

    def host_sync(*args, **kwargs):
        raise AssertionError("transformers checked for packed sequences")
    monkeypatch.setattr(masking, "find_packed_sequence_indices", host_sync)
    assert torch.equal(ours(input_ids=inputs).logits, expected)
    with pytest.raises(AssertionError, match="packed sequences"):  # (the check is there for plain sdpa)
        reference(input_ids=inputs)
    assert model_lib.model_config(JobSpec(size="tiny", mode="prefix"))._attn_implementation == "sdpa"


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_one_process_trains_unsharded_with_the_sharded_step_s_numbers(single_rank_group, mode: str) -> None:
    """fsdp with a world of one skips FSDP (nothing to shard with); two steps give what FSDP gives."""
    spec = JobSpec(size="tiny", mode=mode, lora_dropout=0.0, seq_len=16, global_batch=4, micro_batch=2, lr=1e-2)
    env = parallel.Dist(rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randint(3, TINY_VOCAB, (2, 16), generator=generator),
                torch.randint(3, TINY_VOCAB, (2, 16), generator=generator)) for _ in range(2)]
    results = {}
    for sharded in (False, True):
        strategy = parallel.Fsdp(spec, env)
        strategy.sharded = sharded
        model = strategy.build_model(model_lib.model_config(spec), load_weights=True,
                                     chosen=kernels.choose(spec, env.device.type))
        assert isinstance(model, parallel.FSDPModule) == sharded
        optimizer, scheduler = build_optimizer(model, spec, strategy, total=10)
        params = [p for p in model.parameters() if p.requires_grad]
        losses = [train_step(model, optimizer, scheduler, batches, strategy=strategy, params=params, max_norm=1.0,
                             world_size=1)[0].item() for _ in range(2)]
        weights = {n: (p.full_tensor() if sharded else p).detach().clone() for n, p in model.named_parameters()}
        results[sharded] = losses, weights
    (plain_losses, plain_weights), (fsdp_losses, fsdp_weights) = results[False], results[True]
    assert plain_losses == pytest.approx(fsdp_losses, rel=1e-5)
    for name, weight in fsdp_weights.items():
        torch.testing.assert_close(plain_weights[name], weight, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_two_ranks_gradient_equals_the_global_batch_mean_loss_gradient(tmp_path: Path) -> None:
    """FSDP averages gradients over ranks; the worker's world_size factor must undo exactly that."""
    out = tmp_path / "gradient_check.json"
    assert_exit_0(torchrun(str(Path(__file__)), "gradient-check", str(out)))
    for mode, result in json.loads(out.read_text()).items():
        assert result["allclose"], (mode, result)
        assert result["loss"] == pytest.approx(result["reference_loss"], rel=1e-5), (mode, result)


# --- end to end: torchrun, 2 processes ---


def _launch(tmp_path_factory: pytest.TempPathFactory, name: str,
            **spec: object) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp(name)
    (run_dir / "spec.json").write_text(JobSpec(size="tiny", cluster="local", procs_per_node=2, **spec).to_json())
    return run_dir, torchrun("-m", "llamajobs.worker", str(run_dir))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir, result = _launch(tmp_path_factory, "full", seq_len=64, global_batch=8, micro_batch=2, max_steps=12,
                              lr=3e-3, warmup_ratio=0.1)
    assert_exit_0(result)
    return run_dir


@pytest.mark.slow
def test_full_run_logs_every_step_and_learns(full_run: Path) -> None:
    rows = metrics_rows(full_run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["loss"] == pytest.approx(math.log(TINY_VOCAB), abs=0.2)  # a random init starts at chance
    for r in rows:
        assert r["total_steps"] == 12 and r["tokens"] == r["step"] * 8 * 64
        assert r["epoch"] == pytest.approx(r["step"] / 10)  # 80 sample documents / global batch 8
        assert r["tokens_per_s"] > 0 and r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_s"] / 2)
        assert isinstance(r["mfu"], float) and 0 < r["mfu"] < 1
        assert r["peak"] == "cpu-nominal" and r["peak_flops"] > 0
        assert r["step_time_s"] > 0 and r["mem_gib"] > 0 and r["elapsed_s"] > 0 and r["time"] > 1e9
    assert rows[1]["lr"] == pytest.approx(3e-3) and rows[-1]["lr"] == pytest.approx(3e-4)
    kinds = [e["event"] for e in events.read(full_run)]
    assert kinds == ["started", "finished"]
    assert events.read(full_run)[0]["world_size"] == 2


@pytest.mark.slow
def test_full_run_exports_a_model_that_transformers_loads_and_generates_with(full_run: Path) -> None:
    final = full_run / "final"
    assert not (full_run / "final.tmp").exists()
    model = LlamaForCausalLM.from_pretrained(final)
    tokenizer = LlamaTokenizer.from_pretrained(final)
    assert len(tokenizer) == TINY_VOCAB and (final / "tokenizer.model").is_file()
    prompt = tokenizer("Background: Atrial fibrillation", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == prompt.input_ids.shape[1] + 5


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Also the other code paths, in the same launch: CPU offload and activation checkpointing.
    run_dir, result = _launch(tmp_path_factory, "lora", mode="lora", strategy="fsdp-offload",
                              activation_checkpointing=True, seq_len=64, global_batch=8, micro_batch=2,
                              max_steps=6, lr=3e-3, log_every_steps=4)
    assert_exit_0(result)
    return run_dir


@pytest.mark.slow
def test_lora_run_logs_on_its_interval_and_the_last_step(lora_run: Path) -> None:
    assert [r["step"] for r in metrics_rows(lora_run)] == [4, 6]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # inside peft
def test_lora_run_exports_an_adapter_that_peft_loads_onto_a_fresh_model(lora_run: Path) -> None:
    from peft import PeftModel

    final = lora_run / "final"
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in final.iterdir()}
    saved = load_file(final / "adapter_model.safetensors")
    assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
    assert len(saved) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # trained away from B = 0
    base = LlamaForCausalLM(LlamaConfig(**SIZES["tiny"].hf_config()))
    model = PeftModel.from_pretrained(base, final)
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert len(loaded) == len(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key.replace(".weight", ".default.weight")], value)
    tokenizer = LlamaTokenizer.from_pretrained(final)
    out = model.generate(**tokenizer("Methods:", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] > 3


if __name__ == "__main__":
    # `torchrun --nproc-per-node 2 tests/test_worker.py gradient-check OUT.json` (the two-rank test).
    assert sys.argv[1] == "gradient-check"
    dist.init_process_group("gloo")
    try:
        results = {mode: gradient_check(mode) for mode in ("full", "lora")}
        if dist.get_rank() == 0:
            Path(sys.argv[2]).write_text(json.dumps(results))
    finally:
        parallel.teardown()  # (collects the FSDP models first: see there)
