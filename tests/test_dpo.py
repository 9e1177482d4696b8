"""Preference tuning (DPO): the pairs' store, the pair sampler, the loss against TRL's, and a run.

Data: `data prepare --format preference` in both layouts (strings; UltraFeedback's message lists),
from JSON lines and parquet, rendered with the chat template (or as plain text without one), the
mask on the answers only, pairs kept together, truncation keeping the prompt's end, bad records by
PATH:LINE. The loss: the worker's DPO step (worker/dpo.py) against TRL's DPOTrainer's own loss and
log-probability code on the same tiny model and batch, in fp32: loss, reward accuracy and every
gradient within 1e-5, sigmoid and IPO, full and LoRA. The run: a LoRA DPO job through the worker
under fsdp and ds-zero2, two processes each in one torchrun launch of this file (its __main__).
"""

from __future__ import annotations

import gc
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llamajobs.data.prepare import PrepareConfig, prepare
from llamajobs.data.store import TokenStore
from llamajobs.errors import SpecError
from tests.families import make_model_dir

PROMPTS = ["Which organ pumps blood?", "Where is bile made?", "What filters the blood?", "What do lungs hold?",
           "Name a bone of the arm.", "Which cells carry oxygen?", "What is the skin's outer layer?",
           "Where is insulin made?"]


def string_pairs(n: int) -> list[dict]:
    """{"prompt", "chosen", "rejected"} strings; the chosen answer is always "yes ...", the rejected "no ..."."""
    return [{"prompt": PROMPTS[i % len(PROMPTS)] + f" ({i})", "chosen": f"yes, the answer is {i % 5}.",
             "rejected": f"no idea {i % 3}"} for i in range(n)]


def ultrafeedback(n: int) -> list[dict]:
    """UltraFeedback-binarized rows: prompt a string, chosen/rejected the whole conversation."""
    rows = []
    for pair in string_pairs(n):
        user = {"role": "user", "content": pair["prompt"]}
        rows.append({"prompt": pair["prompt"], "prompt_id": pair["prompt"],
                     "chosen": [user, {"role": "assistant", "content": pair["chosen"]}],
                     "rejected": [user, {"role": "assistant", "content": pair["rejected"]}]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama 3 with its fast tokenizer and chat template (tests/families.py)."""
    return make_model_dir("llama", tmp_path_factory.mktemp("dpo") / "model")


def decoded_answers(store: TokenStore, tokenizer, doc: int) -> tuple[str, str]:
    """(the document's text before its first target token, the target tokens' text)."""
    tokens, mask = store[doc].tolist(), store.loss_mask(doc)
    start = int(np.argmax(mask))
    assert mask[start:].all(), "the targets are one span at the end"
    return tokenizer.decode(tokens[:start]), tokenizer.decode(tokens[start:])


# --- the store ---


def test_pairs_are_stored_chosen_then_rejected_with_only_the_answers_as_targets(tmp_path, model_dir):
    from llamajobs.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    rows = string_pairs(12)
    meta = prepare(PrepareConfig(inputs=(write_jsonl(tmp_path / "p.jsonl", rows),), tokenizer=model_dir,
                                 out=tmp_path / "s", format="preference"))
    assert meta["documents"] == 24 and meta["pairs"] == {"max_length": 512, "truncated": 0}
    assert meta["chat"]["template"] == "tokenizer"  # the model's Llama-3 template
    store = TokenStore(tmp_path / "s")
    for k, row in enumerate(rows):
        (prompt_c, chosen), (prompt_r, rejected) = (decoded_answers(store, tokenizer, 2 * k + j) for j in (0, 1))
        assert prompt_c == prompt_r and row["prompt"] in prompt_c and "<|start_header_id|>assistant" in prompt_c
        end = "<|eot_id|><|end_of_text|>"  # the turn's end, and the EOS the store adds (as for `messages`)
        assert chosen == row["chosen"] + end and rejected == row["rejected"] + end
    # UltraFeedback's layout (the conversation in chosen/rejected) is the same pairs, token for token.
    prepare(PrepareConfig(inputs=(write_jsonl(tmp_path / "u.jsonl", ultrafeedback(12)),), tokenizer=model_dir,
                          out=tmp_path / "u", format="preference"))
    other = TokenStore(tmp_path / "u")
    assert all(np.array_equal(store[i], other[i]) and np.array_equal(store.loss_mask(i), other.loss_mask(i))
               for i in range(24))


def test_parquet_pairs_equal_json_lines_and_no_template_is_plain_text(tmp_path, model_dir, tokenizer_dir):
    import datasets

    from llamajobs.data.tokenizer import load_tokenizer

    rows = ultrafeedback(10)
    datasets.Dataset.from_list(rows).to_parquet(tmp_path / "u.parquet")
    for name, path in (("j", write_jsonl(tmp_path / "u.jsonl", rows)), ("p", tmp_path / "u.parquet")):
        prepare(PrepareConfig(inputs=(path,), tokenizer=model_dir, out=tmp_path / name, format="preference"))
    a, b = TokenStore(tmp_path / "j"), TokenStore(tmp_path / "p")
    assert len(a) == len(b) == 20 and all(np.array_equal(a[i], b[i]) for i in range(20))
    # The bundled tokenizer has no chat template: BOS, the prompt's text, a newline, the answer, EOS.
    tokenizer = load_tokenizer(tokenizer_dir)
    assert not getattr(tokenizer, "chat_template", None)
    meta = prepare(PrepareConfig(inputs=(tmp_path / "u.jsonl",), tokenizer=tokenizer_dir, out=tmp_path / "plain",
                                 format="preference"))
    assert "chat" not in meta
    plain = TokenStore(tmp_path / "plain")
    prompt, answer = decoded_answers(plain, tokenizer, 1)
    assert rows[0]["prompt"] in prompt and answer.strip().startswith(rows[0]["rejected"][-1]["content"])


def test_long_prompts_lose_their_beginning_and_are_counted(tmp_path, model_dir, cli):
    from llamajobs.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    rows = string_pairs(6)
    for row in rows[:2]:
        row["prompt"] = "filler words " * 40 + "THE QUESTION END"
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    code, out, err = cli("data", "prepare", str(path), "--tokenizer", str(model_dir), "--out", str(tmp_path / "s"),
                         "--format", "preference", "--max-length", "64")
    assert code == 0, err
    assert "6 preference pairs (chosen and rejected answers); 2 truncated to --max-length 64" in out
    store = TokenStore(tmp_path / "s")
    assert store.meta["pairs"]["truncated"] == 2 and int(store.lengths().max()) <= 64
    for doc in range(4):
        tokens = store[doc].tolist()
        assert tokens[0] == tokenizer.bos_token_id
        prompt, answer = decoded_answers(store, tokenizer, doc)
        row = rows[doc // 2]
        assert "THE QUESTION END" in prompt and answer.startswith(row["chosen" if doc % 2 == 0 else "rejected"])
    assert decoded_answers(store, tokenizer, 4)[0].count("<|start_header_id|>") == 2  # untouched pairs whole


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, 'fields "chosen" and "rejected" are the same answer'),
    ({"prompt": "p", "chosen": " ", "rejected": "b"}, 'field "chosen" is an empty answer'),
    ({"prompt": "p", "chosen": "a"}, 'missing field "rejected"'),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     'field "chosen" does not end with an assistant message'),
])
def test_a_broken_pair_names_its_file_and_line(tmp_path, model_dir, cli, row, reason):
    path = write_jsonl(tmp_path / "p.jsonl", [*string_pairs(2), row])
    code, _, err = cli("data", "prepare", str(path), "--tokenizer", str(model_dir), "--out", str(tmp_path / "s"),
                       "--format", "preference")
    assert code == 2 and f"{path}:3: {reason}" in err, err


def test_the_sampler_keeps_pairs_whole_and_a_preference_store_needs_dpo(tmp_path, model_dir):
    from llamajobs import spec as spec_mod
    from llamajobs.data.preference import PairSampler
    from llamajobs.data.sampler import IGNORE_INDEX

    prepare(PrepareConfig(inputs=(write_jsonl(tmp_path / "p.jsonl", string_pairs(10)),), tokenizer=model_dir,
                          out=tmp_path / "s", format="preference"))
    store = TokenStore(tmp_path / "s")
    seen = []
    for rank in (0, 1):
        sampler = PairSampler(store, seq_len=64, global_batch=4, micro_batch=1, rank=rank, world_size=2, seed=0,
                              pad_id=0)
        batches = next(sampler)
        assert len(batches) == 2 and all(t.shape == (1, 2, 64) for mb in batches for t in mb)
        for inputs, labels in batches:
            pair = sampler.pair_at(sampler.position - 4 + rank * 2 + len(seen) % 2)
            for j in (0, 1):  # the row is the store's document, its labels the next answer token
                doc = store[2 * pair + j]
                assert inputs[0, j, :len(doc)].tolist() == doc.tolist()
                targets = labels[0, j][labels[0, j] != IGNORE_INDEX]
                mask = store.loss_mask(2 * pair + j)
                assert targets.tolist() == doc[1:][mask[1:] == 1].tolist()
            seen.append(pair)
    assert len(set(seen)) == 4  # four different pairs in the global batch, none split
    with pytest.raises(ValueError, match="--seq-len 8 is shorter than the store's longest"):
        PairSampler(store, seq_len=8, global_batch=4, micro_batch=1, rank=0, world_size=2, seed=0, pad_id=0)
    common = {"model_path": str(model_dir), "data": str(tmp_path / "s"), "cluster": "local", "device": "cpu",
              "procs_per_node": 2, "global_batch": 4, "micro_batch": 1}
    from llamajobs.ops import checked_spec

    with pytest.raises(SpecError, match="holds preference pairs: train on it with --objective dpo"):
        checked_spec(spec_mod.build(common), tmp_path)
    with pytest.raises(SpecError, match="implemented for the fsdp strategies, not yet --strategy ds-zero3"):
        spec_mod.build({**common, "objective": "dpo", "strategy": "ds-zero3"})
    with pytest.raises(SpecError, match="--objective dpo trains --mode lora or full, not --mode prefix"):
        spec_mod.build({**common, "objective": "dpo", "mode": "prefix"})
    with pytest.raises(SpecError, match="--beta 0.0 must be a positive finite number"):
        spec_mod.build({**common, "objective": "dpo", "mode": "lora", "beta": 0.0})
    with pytest.raises(SpecError, match="--beta 0.5: only with --objective dpo"):
        spec_mod.build({**common, "beta": 0.5})
    with pytest.raises(SpecError, match="validation of preference pairs is not implemented yet"):
        spec_mod.build({**common, "objective": "dpo", "mode": "lora", "eval_every_steps": 2})
    dpo = spec_mod.build({**common, "objective": "dpo", "mode": "lora", "loss": "ipo", "beta": 0.5})
    assert checked_spec(dpo, tmp_path) == dpo and dpo.rows_per_example == 2
    plain = tmp_path / "plain"
    prepare(PrepareConfig(inputs=(write_jsonl(tmp_path / "t.jsonl", [{"text": "a b c"}] * 4),), tokenizer=model_dir,
                          out=plain))
    with pytest.raises(SpecError, match="is not a preference store; prepare one with"):
        checked_spec(spec_mod.build({**common, "objective": "dpo", "mode": "lora", "data": str(plain)}), tmp_path)


# --- the loss against TRL's ---

TOLERANCE = 1e-5  # fp32, absolute: on losses near ln 2 and gradients of order 1e-2


def store_batch(tmp_path: Path, model_dir: Path, n_pairs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n pairs from a preference store as the sampler gives them: (input_ids, labels) [n, 2, seq] and
    TRL's completion mask for the same rows (the store's loss mask, padded with 0)."""
    from llamajobs.data.preference import PairSampler

    rows = string_pairs(n_pairs)
    for row in rows[1::2]:  # the longer answer rejected in every other pair: rewards that order both ways
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    prepare(PrepareConfig(inputs=(write_jsonl(tmp_path / "p.jsonl", rows),), tokenizer=model_dir,
                          out=tmp_path / "s", format="preference"))
    store = TokenStore(tmp_path / "s")
    sampler = PairSampler(store, seq_len=64, global_batch=n_pairs, micro_batch=n_pairs, rank=0, world_size=1,
                          seed=0, pad_id=0)
    inputs, labels = next(sampler)[0]
    completion = torch.zeros(inputs.shape, dtype=torch.int64)
    for i in range(n_pairs):
        pair = sampler.pair_at(i)
        for j in (0, 1):
            mask = torch.from_numpy(store.loss_mask(2 * pair + j).astype(np.int64))
            completion[i, j, :len(mask)] = mask
    return inputs, labels, completion


def trl_step(model, ref_model, model_dir: Path, tmp_path: Path, inputs: torch.Tensor, completion: torch.Tensor,
             lengths: torch.Tensor, *, loss: str) -> tuple[float, float]:
    """TRL's DPOTrainer._compute_loss on the batch, backward included: (loss, reward accuracy). Its rows are
    the chosen answers then the rejected ones, padded on the right, with an attention mask."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from llamajobs.data.tokenizer import load_tokenizer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, loss_type=[loss], use_cpu=True, bf16=False,
                     report_to=[], per_device_train_batch_size=len(inputs), max_length=64)
    tiny = Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}])  # (batches are given below)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=tiny,
                         processing_class=load_tokenizer(model_dir))
    if "ref" in getattr(trainer.model, "peft_config", {}):
        # TRL takes a PeftModel for an adapter trained before and keeps its copy as the reference; ours
        # is a new adapter (B = 0 at step 0), whose reference is the base: TRL's disabled adapters.
        trainer.model.delete_adapter("ref")
    rows = inputs.transpose(0, 1).flatten(0, 1)
    attention = (torch.arange(rows.shape[1]) < lengths.transpose(0, 1).flatten()[:, None]).long()
    batch = {"input_ids": rows, "attention_mask": attention, "completion_mask": completion.transpose(0, 1).flatten(0, 1)}
    trainer.model.train()
    value = trainer._compute_loss(trainer.model, batch, return_outputs=False)
    value.backward()
    return value.item(), trainer._metrics["train"]["rewards/accuracies"][-1]


@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_the_loss_reward_accuracy_and_gradients_are_trl_s(tmp_path, model_dir, mode, loss):
    """Two micro-batches of 3 pairs (the accumulation) against TRL's one batch of 6. After one step of
    random LoRA weights, so that the policy differs from the reference (at step 0 they are equal and the
    reward accuracy is 0 for both: no pair's rewards differ)."""
    import copy
    from types import SimpleNamespace
    import contextlib

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llamajobs.worker import kernels
    from llamajobs.worker.dpo import Dpo

    inputs, labels, completion = store_batch(tmp_path, model_dir, 6)
    lengths = (completion.flip(-1).cumsum(-1) > 0).sum(-1)  # up to the last answer token: the row's length
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if mode == "lora":
        base = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False))  # random B: the policy is not the base
        reference = None
    else:
        reference = copy.deepcopy(base).eval().requires_grad_(False)
        with torch.no_grad():  # move the policy away from its reference
            for p in base.parameters():
                p.add_(torch.randn_like(p) * 0.02)
    ours, theirs = copy.deepcopy(base), base
    kernels.apply(ours.get_base_model() if mode == "lora" else ours,
                  kernels.Kernels(liger=False, fused_loss=False, fp8=False))  # the worker's forward
    ours.train()
    objective = Dpo(beta=0.1, loss=loss, disabled_adapters=(lambda m: m.disable_adapter()) if mode == "lora" else None,
                    reference_model=reference)
    strategy = SimpleNamespace(autocast=contextlib.nullcontext, set_gradient_sync=lambda model, sync: None,
                               backward=lambda model, value: value.backward())
    stats = objective.forward_backward(ours, [(inputs[:3], labels[:3]), (inputs[3:], labels[3:])], 1, strategy)
    trl_loss, trl_accuracy = trl_step(theirs, copy.deepcopy(reference) if reference is not None else None,
                                      model_dir, tmp_path, inputs, completion, lengths, loss=loss)
    assert abs(stats[0].item() - trl_loss) < TOLERANCE and stats[0].item() > 0
    assert stats[1].item() == trl_accuracy and 0 < trl_accuracy < 1  # some pairs each way: a miscount shows
    grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    theirs_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert grads.keys() == theirs_grads.keys() and len(grads) > 0
    worst = max((grads[n] - theirs_grads[n]).abs().max().item() for n in grads)
    difference = abs(stats[0].item() - trl_loss)
    print(f"{mode} {loss}: loss {stats[0].item():.6f} vs TRL {trl_loss:.6f} (difference {difference:.1e}), "
          f"accuracy {trl_accuracy}, "
          f"max gradient difference {worst:.2e}")
    assert worst < TOLERANCE and max(g.abs().max().item() for g in grads.values()) > 100 * TOLERANCE



# --- estimates ---


def test_estimates_count_two_rows_per_pair_and_the_reference_s_forward():
    """A DPO step trains both rows of every pair and runs the reference's forward on them: twice the
    tokens, each costing the reference's forward (2N + 4·L·d·s, the causal half skipped) on top; the
    activations and logits of both rows; MFU counting the reference's FLOPs too."""
    from llamajobs import catalog
    from llamajobs import spec as spec_mod
    from llamajobs.estimate import timing
    from llamajobs.estimate.memory import activation_bytes, memory, model_state_bytes
    from llamajobs.estimate.plan import Plan

    common = {"size": "7b", "mode": "lora", "strategy": "fsdp", "cluster": "slurm", "nodes": 1, "gpus_per_node": 8,
              "global_batch": 64, "micro_batch": 4, "seq_len": 1024, "kernels": "none"}
    sft, dpo = (Plan.from_spec(spec_mod.build({**common, **extra})) for extra in ({}, {"objective": "dpo"}))
    assert (sft.rows_per_example, dpo.rows_per_example) == (1, 2) and dpo.tokens_per_step == 2 * sft.tokens_per_step
    shape, seq = sft.shape, sft.seq_len
    extra = catalog.reference_flops_per_token(shape, seq) - 2 * shape.n_layers * shape.dim * seq
    assert timing.spent_flops_per_token(dpo) == timing.spent_flops_per_token(sft) + extra
    gpu = catalog.GPUS["h100"]
    times = {name: timing.step_time(plan, gpu) for name, plan in (("sft", sft), ("dpo", dpo))}
    assert times["sft"]["compute_s"] > times["sft"]["host_floor_s"]  # (compute-bound: the ratio below holds)
    ratio = 2 * timing.spent_flops_per_token(dpo) / timing.spent_flops_per_token(sft)
    assert times["dpo"]["compute_s"] == pytest.approx(ratio * times["sft"]["compute_s"], rel=1e-12)
    assert activation_bytes(dpo) == 2 * activation_bytes(sft)
    rates = {name: timing.throughput(plan, gpu) for name, plan in (("sft", sft), ("dpo", dpo))}
    flops = catalog.objective_flops_per_token(shape, seq, "lora", "dpo")
    assert flops == catalog.flops_per_token(shape, seq, "lora") + catalog.reference_flops_per_token(shape, seq)
    assert rates["dpo"]["mfu"] == pytest.approx(flops * rates["dpo"]["tokens_per_s_per_gpu"] / gpu.peak_bf16_flops)
    assert memory(dpo, gpu)["gpu_mem_gib"] > memory(sft, gpu)["gpu_mem_gib"]
    # A full fine-tune also holds the frozen reference: its fp32 weights, sharded over the 8 GPUs.
    full = {name: Plan.from_spec(spec_mod.build({**common, "mode": "full", "micro_batch": 1, **extra}))
            for name, extra in (("sft", {}), ("dpo", {"objective": "dpo"}))}
    states = {name: model_state_bytes(plan)["state_gpu"] for name, plan in full.items()}
    assert states["dpo"] - states["sft"] == 4 * shape.params / 8

# --- a run through the worker ---

STEPS = 6
RUN = {"cluster": "local", "device": "cpu", "procs_per_node": 2, "mode": "lora", "lora_dropout": 0.0, "lora_r": 8,
       "lora_targets": "q_proj,k_proj,v_proj,o_proj", "objective": "dpo", "seq_len": 64, "global_batch": 8,
       "micro_batch": 2, "max_steps": STEPS, "lr": 2e-2, "warmup_ratio": 0.0, "log_every_steps": 1, "seed": 0,
       "checkpoint_every_steps": 3}
# name: (strategy, the fault of the first launch). Each rank holds 2 micro-batches of 2 pairs per step.
RUNS = {"fsdp": ("fsdp", None), "ds-zero2": ("ds-zero2", None),
        "full-fsdp": ("fsdp", None),  # --mode full: the reference a frozen sharded copy
        "fsdp-resumed": ("fsdp", "crash:5")}  # last: its crash ends the first launch


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory, model_dir) -> dict[str, Path]:
    """The runs of RUNS in one two-process torchrun launch; then the crashed one resumed in another."""
    from llamajobs import spec as spec_mod
    from tests.conftest import set_fault, torchrun
    from tests.test_deepspeed import extensions_env

    root = tmp_path_factory.mktemp("dpo-runs")
    prepare(PrepareConfig(inputs=(write_jsonl(root / "p.jsonl", string_pairs(32)),), tokenizer=model_dir,
                          out=root / "store", format="preference", max_length=64))
    runs = {}
    for name, (strategy, fault) in RUNS.items():
        runs[name] = root / name
        runs[name].mkdir()
        mode = {"mode": "full", "lr": 1e-3} if name.startswith("full") else {}
        flags = {k: v for k, v in RUN.items() if not (mode and k.startswith("lora"))}
        spec = spec_mod.build({**flags, **mode, "strategy": strategy, "model_path": str(model_dir),
                               "data": str(root / "store")})
        (runs[name] / "spec.json").write_text(spec.to_json())
        set_fault(runs[name], fault)
    first = torchrun(str(Path(__file__)), *map(str, runs.values()), env=extensions_env(), timeout=900)
    assert first.returncode != 0 and "injected fault at step 5" in first.stdout + first.stderr, first.stderr[-4000:]
    set_fault(runs["fsdp-resumed"], None)
    second = torchrun(str(Path(__file__)), str(runs["fsdp-resumed"]), env=extensions_env(), timeout=900)
    assert second.returncode == 0, second.stderr[-6000:]
    return runs


@pytest.mark.slow
def test_a_lora_dpo_run_starts_at_log_2_logs_its_rewards_and_resumes_exactly(dpo_runs):
    from llamajobs.metrics import MetricsRow
    from tests.conftest import metrics_rows

    for name in ("fsdp", "ds-zero2", "full-fsdp"):
        rows = [MetricsRow.from_mapping(r) for r in metrics_rows(dpo_runs[name])]
        assert [r.step for r in rows] == list(range(1, STEPS + 1))
        # Step 0's policy is its reference (LoRA's B starts at 0; a full fine-tune's copy is the start):
        # every reward is 0, no pair is ranked.
        assert abs(rows[0].loss - math.log(2)) < 1e-6 and rows[0].reward_margin == 0 and rows[0].reward_accuracy == 0
        assert all(r.reward_accuracy is not None and r.chosen_logp < 0 and r.rejected_logp < 0 for r in rows)
        print(name, [(round(r.loss, 4), r.reward_accuracy) for r in rows])
        assert rows[-1].loss < math.log(2) and rows[-1].reward_margin > 0 and rows[-1].reward_accuracy > 0.5
        final = "model.safetensors" if name.startswith("full") else "adapter_model.safetensors"
        assert (dpo_runs[name] / "final" / final).is_file()
    # The crashed run resumed from its step-3 checkpoint: its rows are the uninterrupted run's, bit for bit.
    keys = ("step", "loss", "grad_norm", "reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")
    resumed, whole = metrics_rows(dpo_runs["fsdp-resumed"]), metrics_rows(dpo_runs["fsdp"])
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in whole]



@pytest.mark.slow
def test_status_shows_the_dpo_statistics(dpo_runs, cli, home):
    """`status JOB` on the fsdp run (registered here as a local job): the objective and the last step's
    reward accuracy, margin and log-probabilities; `--json` carries the loss as for SFT."""
    import shutil

    from llamajobs import registry
    from llamajobs.metrics import MetricsRow
    from llamajobs.registry import Job
    from tests.conftest import metrics_rows

    run_dir = home / "runs" / "1-dpo"
    shutil.copytree(dpo_runs["fsdp"], run_dir)
    registry.write_job_file(Job(id=1, name="dpo", run_dir=run_dir, cluster="local", cluster_job_id="1",
                                submitted_at=0.0))
    last = MetricsRow.from_mapping(metrics_rows(run_dir)[-1])
    code, out, err = cli("status", "1")
    assert code == 0, err
    assert "objective dpo, loss sigmoid, beta 0.1" in out
    assert (f"dpo       step {STEPS}: reward accuracy {last.reward_accuracy:.3f}  margin {last.reward_margin:.4f}  "
            f"log-prob chosen {last.chosen_logp:.3f} rejected {last.rejected_logp:.3f}") in out, out
    code, out, _ = cli("status", "1", "--json")
    assert code == 0 and json.loads(out)["loss"] == pytest.approx(last.loss)

if __name__ == "__main__":
    # `torchrun --nproc-per-node 2 tests/test_dpo.py RUN_DIR...`: each run dir trained in turn in this
    # process group, as `python -m llamajobs.worker RUN_DIR` would.
    from llamajobs.spec import JobSpec
    from llamajobs.worker import parallel
    from llamajobs.worker.train import train

    run_dirs = [Path(arg).resolve() for arg in sys.argv[1:]]
    env = parallel.init_distributed(JobSpec.load(run_dirs[0] / "spec.json"))
    try:
        for run_dir in run_dirs:
            train(run_dir, JobSpec.load(run_dir / "spec.json"), env)
            gc.collect()
    finally:
        parallel.teardown()
