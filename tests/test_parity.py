"""Parity with the reference trainer: the worker and transformers.Trainer (+ peft for LoRA) train the
same tiny Llama-3-shaped model from the same weights on the same batches, and their per-step losses
agree within 1e-5 for every strategy (fp32 on the CPU).

What is shared, and what is not. Both start from one saved model directory (--model-path); a LoRA
run's initial adapter is the one the worker's rank 0 draws (model._full_state_dict_rank0). The
batches are read from the worker's own samplers (WindowSampler, PackedSampler) as one process would
see the whole global batch, in the worker's order; Trainer gets each step's global batch as one
forward (no accumulation), so a worker run with several micro-batches per rank, and two ranks with
different numbers of real tokens, must reproduce the single big batch (a worker that averaged each
rank's own token mean instead was off by 2.4e-3 here, 5.4e-3 on the chat store: tried by hand).
Everything else is Trainer's own: eager attention, its loss (mean over the label tokens, labels
shifted by the model), its AdamW and grouping of weight decay, its clipping, and its cosine schedule
(see trainer_args: its warmup is compared on a run that is warmup throughout).

Chat data: the reference's labels come from the chat template itself, through transformers'
apply_chat_template(..., return_assistant_tokens_mask=True) on the family's template with
{% generation %} around the assistant turns, not from llamajobs/data/chat.py. Packed rows: the
reference trains on the documents of each packed row one by one, each in a row of its own
(right-padded); and test_a_packed_row_s_loss_is_its_documents_losses_unpacked checks single rows.

Launches: every two-process run in one torchrun launch of this file (its __main__ trains each run
dir in turn in one process group), pp in one one-process launch. Time on 2 cores shared with other
work: 4 to 7 minutes of wall time (the module had 0.35-0.45 of a core on average), 120-155 s of CPU,
once DeepSpeed's CPU Adam is compiled (minutes, once, into TORCH_EXTENSIONS_DIR). The largest
differences measured (max over 12 steps): 4.8e-7 fsdp, fsdp-offload and accumulation; 9.5e-7 warmup,
ds-zero2, ds-zero3, pp, chat and packed; 1.4e-6 LoRA; 1.9e-6 and 2.4e-6 the offloaded ZeRO
strategies (DeepSpeed's CPU Adam).
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import sys
from pathlib import Path

import pytest
import torch

from llamajobs import spec as spec_mod
from llamajobs.spec import JobSpec
from tests.conftest import assert_exit_0, metrics_rows, torchrun
from tests.families import LLAMA3_CHAT, make_model_dir

pytestmark = pytest.mark.slow

STEPS = 12
TOLERANCE = 1e-5  # absolute, on losses near ln(400) = 6: fp32 reduction order, nothing more
COMMON = {"cluster": "local", "device": "cpu", "max_steps": STEPS, "lr": 3e-3, "warmup_ratio": 0.0,
          "weight_decay": 0.1, "grad_clip": 1.0, "log_every_steps": 1, "seed": 0}
TEXT = {"seq_len": 32, "global_batch": 8, "micro_batch": 4}      # 2 ranks x 1 micro-batch of 4
# 2 ranks x 1 micro-batch of 2 rows, each holding one or two of the 90-150-token documents
PACKED = {"seq_len": 256, "global_batch": 4, "micro_batch": 2}

# name: (data, extra flags, processes). The sharded strategies on two ranks; pp is one process.
RUNS = {
    "fsdp": ("text", {"strategy": "fsdp"}, 2),
    # Warmup over all 12 steps (ceil(0.95 * 12)): Trainer's warmup is the worker's (trainer_args).
    "fsdp-warmup": ("text", {"strategy": "fsdp", "warmup_ratio": 0.95}, 2),
    "fsdp-offload": ("text", {"strategy": "fsdp-offload"}, 2),
    "ds-zero2": ("text", {"strategy": "ds-zero2"}, 2),
    "ds-zero2-offload": ("text", {"strategy": "ds-zero2-offload"}, 2),
    "ds-zero3": ("text", {"strategy": "ds-zero3"}, 2),
    "ds-zero3-offload": ("text", {"strategy": "ds-zero3-offload"}, 2),
    "pp": ("text", {"strategy": "pp"}, 1),  # one process: 2 micro-batches of 4 per step
    # Accumulation: 4 micro-batches of 1 on each rank against Trainer's one batch of 8.
    "fsdp-accumulation": ("text", {"strategy": "fsdp", "micro_batch": 1}, 2),
    "ds-zero3-accumulation": ("text", {"strategy": "ds-zero3", "micro_batch": 1}, 2),
    "lora-fsdp": ("text", {"strategy": "fsdp", "mode": "lora"}, 2),
    "lora-ds-zero3": ("text", {"strategy": "ds-zero3", "mode": "lora"}, 2),
    "chat-fsdp": ("chat", {"strategy": "fsdp"}, 2),
    "instruct-ds-zero2": ("instruct", {"strategy": "ds-zero2"}, 2),
}

# The family's Llama-3 template with the assistant turns (content and end-of-turn) marked for
# transformers' assistant mask; it must render exactly what LLAMA3_CHAT renders (checked below).
LLAMA3_CHAT_GENERATION = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ m['content'] }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


# --- the data and the model, made once ---


def _texts(n: int, longest: int = 40) -> list[str]:
    """Documents of very different lengths (2 to `longest` words; this tokenizer makes ~4 tokens of a
    word): some shorter than a window, so ranks and micro-batches hold different numbers of real
    tokens and the loss normalisation matters."""
    from llamajobs.data import read_texts

    texts = []
    for i, text in enumerate(read_texts()):
        if len(texts) == n:
            break
        words = text.split()
        texts.append(" ".join(words[: 2 + (i * 11) % longest]))
    return texts


def _conversations(n: int) -> list[list[dict]]:
    """Two assistant turns each, after a system prompt and between user turns."""
    rng = random.Random(0)
    words = ["heart", "lung", "liver", "kidney", "blood", "cell"]
    out = []
    for _ in range(n):
        a, b = rng.choice(words), rng.choice(words)
        out.append([{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": f"Name the {a}."},
                    {"role": "assistant", "content": f"The {a} {a}."},
                    {"role": "user", "content": f"And {b}?"},
                    {"role": "assistant", "content": f"{b} cells."}])
    return out


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model directory (tiny Llama 3 with its tokenizer and chat template) and three stores."""
    from llamajobs.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("parity")
    model_dir = make_model_dir("llama", root / "model")
    inputs = {
        "text": ("text", [{"text": t} for t in _texts(40)]),
        "chat": ("messages", [{"id": f"c{i}", "messages": m} for i, m in enumerate(_conversations(40))]),
        "instruct": ("alpaca", [{"instruction": f"Name organ {i}.", "input": "", "output": t}
                                for i, t in enumerate(_texts(30, longest=8))]),
    }
    paths = {"model": model_dir, "root": root}
    for name, (fmt, records) in inputs.items():
        paths[name] = root / f"store-{name}"
        prepare(PrepareConfig(inputs=(_write_jsonl(root / f"{name}.jsonl", records),), tokenizer=model_dir,
                              out=paths[name], format=fmt))
    return paths


def _spec(setup: dict[str, Path], name: str) -> JobSpec:
    data, extra, nproc = RUNS[name]
    flags = {**COMMON, **(PACKED if data != "text" else TEXT), "model_path": str(setup["model"]),
             "data": str(setup[data]), "procs_per_node": nproc, **extra}
    if flags.get("mode") == "lora":
        flags["lora_dropout"] = 0.0  # Trainer's forward must be the worker's: no random masks
    return spec_mod.build(flags)


@pytest.fixture(scope="module")
def trained(setup) -> dict[str, Path]:
    """Every run of RUNS: the two-process ones in one launch, the one-process one (pp) in another."""
    from tests.test_deepspeed import extensions_env

    runs = {}
    for name in RUNS:
        runs[name] = setup["root"] / "runs" / name
        runs[name].mkdir(parents=True)
        (runs[name] / "spec.json").write_text(_spec(setup, name).to_json())
    for nproc in (2, 1):
        names = [name for name, (_, _, n) in RUNS.items() if n == nproc]
        assert_exit_0(torchrun(str(Path(__file__)), *(str(runs[n]) for n in names), nproc=nproc,
                               env=extensions_env(), timeout=900))
    return runs


# --- the reference ---


def _as_hf_rows(inputs: torch.Tensor, labels: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """The worker's (inputs, labels) rows, labels already aligned with their inputs, as a Hugging
    Face causal LM takes them (it shifts the labels itself): one more position at the end, whose
    logits the shift drops (causal attention: nothing before it sees it), and an ignored label first."""
    column = torch.full((inputs.shape[0], 1), pad_id, dtype=inputs.dtype)
    return {"input_ids": torch.cat([inputs, column], 1),
            "labels": torch.cat([torch.full_like(column, -100), labels], 1)}


def _padded(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Documents (ids, labels in Hugging Face's unshifted convention) right-padded into one batch."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), -100)
    for i, (ids, targets) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(ids)] = torch.tensor(targets)
    return {"input_ids": input_ids, "labels": labels}


def window_batches(spec: JobSpec, tokenizer) -> list[dict[str, torch.Tensor]]:
    """Each step's global batch as the worker's WindowSampler makes it, read as one rank of one."""
    from llamajobs.data.sampler import WindowSampler
    from llamajobs.data.store import open_documents

    sampler = WindowSampler(open_documents(spec.data, tokenizer), seq_len=spec.seq_len,
                            global_batch=spec.global_batch, micro_batch=spec.global_batch, rank=0, world_size=1,
                            seed=spec.seed, pad_id=tokenizer.eos_token_id)
    batches = []
    for _ in range(STEPS):
        [(inputs, labels)] = next(sampler)
        batches.append(_as_hf_rows(inputs, labels, tokenizer.eos_token_id))
    return batches


def packed_documents(spec: JobSpec, tokenizer) -> list[list[int]]:
    """Each step's documents (store indices), in the order the worker's PackedSampler packs them
    into the global batch's rows."""
    from llamajobs.data.instruct import PackedSampler
    from llamajobs.data.store import open_documents

    sampler = PackedSampler(open_documents(spec.data, tokenizer), seq_len=spec.seq_len, global_batch=spec.global_batch,
                            micro_batch=spec.global_batch, rank=0, world_size=1, seed=spec.seed,
                            pad_id=tokenizer.eos_token_id)
    steps = []
    for step in range(STEPS):
        docs = []
        for row in range(step * spec.global_batch, (step + 1) * spec.global_batch):
            epoch, k = sampler.row_at(row)
            order, starts = sampler.packing(epoch)
            docs.extend(int(d) for d in order[starts[k]:starts[k + 1]])
        steps.append(docs)
    return steps


def chat_labels(tokenizer) -> list[tuple[list[int], list[int]]]:
    """Each conversation's ids and labels as transformers renders and masks them from the template:
    the assistant turns' tokens are targets, every other label -100. The worker's encoder appends an
    EOS after the last assistant turn and trains on it (as SFT recipes do); so does the reference."""
    out = []
    for messages in _conversations(40):
        assert (tokenizer.apply_chat_template(messages, chat_template=LLAMA3_CHAT_GENERATION, tokenize=False)
                == tokenizer.apply_chat_template(messages, chat_template=LLAMA3_CHAT, tokenize=False))
        encoded = tokenizer.apply_chat_template(messages, chat_template=LLAMA3_CHAT_GENERATION, tokenize=True,
                                                return_dict=True, return_assistant_tokens_mask=True)
        ids = [*encoded["input_ids"], tokenizer.eos_token_id]
        mask = [*encoded["assistant_masks"], 1]
        out.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    return out


def store_labels(spec: JobSpec, tokenizer) -> list[tuple[list[int], list[int]]]:
    """An instruction store's documents with the store's own loss mask (for the packing check alone)."""
    from llamajobs.data.store import open_documents

    store = open_documents(spec.data, tokenizer)
    out = []
    for i in range(len(store)):
        ids = [int(t) for t in store[i][:spec.seq_len]]
        mask = store.loss_mask(i)[:spec.seq_len]
        out.append((ids, [t if m else -100 for t, m in zip(ids, mask)]))
    return out


def reference_batches(setup: dict[str, Path], name: str) -> list[dict[str, torch.Tensor]]:
    from llamajobs.data.tokenizer import load_tokenizer

    spec = _spec(setup, name)
    tokenizer = load_tokenizer(setup["model"])
    data = RUNS[name][0]
    if data == "text":
        return window_batches(spec, tokenizer)
    documents = chat_labels(tokenizer) if data == "chat" else store_labels(spec, tokenizer)
    return [_padded([documents[d] for d in docs], tokenizer.eos_token_id) for docs in packed_documents(spec, tokenizer)]


class _StepBatches(torch.utils.data.Dataset):
    """Item i is step i's whole batch (Trainer's batch size 1; the collator unwraps it)."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.batches[i]


def trainer_args(spec: JobSpec, output_dir: Path):
    """Trainer's settings for the spec's optimizer and schedule.

    Without warmup, the worker's cosine falls from the peak at step 0 to MIN_LR_RATIO of it at the
    last step, progress = step / (total - 1); Trainer's cosine_with_min_lr reaches its floor one step
    after the last (progress = step / total), so its half cycle is stretched by total / (total - 1) to
    end on the same last step. Trainer's cosine_warmup_with_min_lr warms up as the worker does,
    lr = peak * (step + 1) / warmup, but leaves the peak one step sooner (the worker's cosine starts
    at 1 on the first step after warmup); so a run with warmup is compared only where it is warmup
    throughout, and together the two runs cover both halves of the worker's schedule."""
    from transformers import TrainingArguments

    from llamajobs.worker.train import MIN_LR_RATIO

    warmup = math.ceil(spec.warmup_ratio * STEPS)  # as the worker counts it (train.build_optimizer)
    if warmup:
        assert warmup == STEPS, "a run with warmup must be warmup throughout (see above)"
        schedule = {"lr_scheduler_type": "cosine_warmup_with_min_lr", "warmup_steps": warmup,
                    "lr_scheduler_kwargs": {"min_lr_rate": MIN_LR_RATIO}}
    else:
        schedule = {"lr_scheduler_type": "cosine_with_min_lr", "warmup_steps": 0,
                    "lr_scheduler_kwargs": {"min_lr_rate": MIN_LR_RATIO, "num_cycles": 0.5 * STEPS / (STEPS - 1)}}
    return TrainingArguments(
        output_dir=str(output_dir), max_steps=STEPS, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        learning_rate=spec.lr, weight_decay=spec.weight_decay, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8,
        max_grad_norm=spec.grad_clip, optim="adamw_torch", **schedule, train_sampling_strategy="sequential",
        remove_unused_columns=False, dataloader_num_workers=0, use_cpu=True, report_to="none", save_strategy="no",
        logging_steps=1, disable_tqdm=True, seed=spec.seed)


def reference_run(setup: dict[str, Path], name: str, tmp_path: Path) -> tuple[list[float], list[float]]:
    """Trainer's per-step losses and learning rates on the run's batches, single process, fp32."""
    from transformers import AutoModelForCausalLM, Trainer

    spec = _spec(setup, name)
    model = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32, attn_implementation="eager")
    if spec.mode == "lora":
        from peft import LoraConfig, get_peft_model

        from llamajobs.worker import model as model_lib

        model = get_peft_model(model, LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0,
                                                 target_modules=list(spec.lora_targets), task_type="CAUSAL_LM"))
        # The adapter the worker starts from: what its rank 0 draws and broadcasts (base included).
        model.load_state_dict(model_lib._full_state_dict_rank0(spec, model_lib.model_config(spec)), strict=True)
    losses, lrs = [], []

    class Recording(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(loss.item())  # unrounded (Trainer's log rounds to 4 decimals)
            lrs.append(self.lr_scheduler.get_last_lr()[0])  # the lr this step's update uses
            return loss

    batches = _StepBatches(reference_batches(setup, name))
    Recording(model=model, args=trainer_args(spec, tmp_path), train_dataset=batches,
              data_collator=lambda items: items[0]).train()
    return losses, lrs


# --- the checks ---

@pytest.mark.parametrize("name", list(RUNS))
def test_the_worker_s_losses_are_trainer_s(setup, trained, name, tmp_path) -> None:
    rows = metrics_rows(trained[name])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    worker = [r["loss"] for r in rows]
    reference, lrs = reference_run(setup, name, tmp_path)
    assert len(reference) == STEPS
    # The same schedule, step by step (so a loss difference is never the lr's).
    assert [r["lr"] for r in rows] == pytest.approx(lrs, rel=1e-9)
    difference = max(abs(a - b) for a, b in zip(worker, reference))
    print(f"\n{name}: max |worker - Trainer| over {STEPS} steps = {difference:.2e}")
    # Training moved the loss far more than the tolerance, so agreement is not the starting point's.
    assert worker[0] - min(worker) > 100 * TOLERANCE
    assert difference < TOLERANCE, list(zip(worker, reference))


def test_the_chat_store_s_ids_and_mask_are_the_template_s(setup) -> None:
    """The store holds transformers' rendering of each conversation (plus the EOS the worker appends),
    and trains exactly the tokens the template marks as the assistant's: the store's mask at token i
    (the target of position i-1) equals the template's assistant mask."""
    from llamajobs.data.store import TokenStore
    from llamajobs.data.tokenizer import load_tokenizer

    store = TokenStore(setup["chat"])
    reference = chat_labels(load_tokenizer(setup["model"]))
    assert len(store) == len(reference)
    for i, (ids, labels) in enumerate(reference):
        assert [int(t) for t in store[i]] == ids
        assert [int(m) for m in store.loss_mask(i)] == [int(label != -100) for label in labels]
    assert 0 < sum(int(label != -100) for label in reference[0][1]) < len(reference[0][1]) / 2


def test_a_packed_row_s_loss_is_its_documents_losses_unpacked(setup) -> None:
    """The worker's model (its attention and loss forward) on packed rows of the instruction store:
    each row's loss equals the sum of its documents' losses, each computed alone by the reference
    (transformers, eager attention, labels shifted by the model), within 1e-5 per target token (the
    unit of the logged loss: a row's summed loss is ~190, where one fp32 ulp is already 1.5e-5)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from llamajobs.data.instruct import PackedSampler
    from llamajobs.data.store import open_documents
    from llamajobs.data.tokenizer import load_tokenizer
    from llamajobs.worker import kernels
    from llamajobs.worker import model as model_lib
    from llamajobs.worker import packing

    spec = _spec(setup, "instruct-ds-zero2")
    tokenizer = load_tokenizer(setup["model"])
    reference = AutoModelForCausalLM.from_pretrained(setup["model"], dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    worker = model_lib.build_structure(spec, model_lib.model_config(spec), torch.float32,
                                       kernels.choose(spec, "cpu")).eval()
    worker.load_state_dict(reference.state_dict())
    sampler = PackedSampler(open_documents(spec.data, tokenizer), seq_len=spec.seq_len, global_batch=8, micro_batch=8,
                            rank=0, world_size=1, seed=spec.seed, pad_id=tokenizer.eos_token_id)
    [(inputs, labels, positions)] = next(sampler)
    documents = store_labels(spec, tokenizer)
    order, starts = sampler.packing(0)
    differences, leaks = [], []
    with torch.no_grad():
        for k in range(inputs.shape[0]):
            row = inputs[k:k + 1], labels[k:k + 1], positions[k:k + 1]
            n = (row[1] != -100).sum().item()
            packed = worker(**packing.model_inputs(row[0], row[2]), labels=row[1]).loss.item() / n
            alone = 0.0
            for d in order[starts[k]:starts[k + 1]]:
                ids, targets = documents[int(d)]
                logits = reference(input_ids=torch.tensor([ids])).logits[0, :-1]
                alone += F.cross_entropy(logits, torch.tensor(targets[1:]), ignore_index=-100, reduction="sum").item()
            differences.append(abs(packed - alone / n))
            if starts[k + 1] - starts[k] > 1:  # the same row as one causal sequence: documents see each other
                leaks.append(abs(worker(input_ids=row[0], labels=row[1]).loss.item() / n - alone / n))
    print(f"\npacked rows: max |row - its documents alone| per token = {max(differences):.2e}")
    assert max(differences) < TOLERANCE, differences
    # Most rows hold several documents, and without the isolation their loss would be off by more
    # than the tolerance (even on this random model, whose attention is nearly uniform).
    assert len(leaks) >= 4 and min(leaks) > 10 * TOLERANCE, leaks


if __name__ == "__main__":
    # `torchrun --nproc-per-node N tests/test_parity.py RUN_DIR...`: each run dir trained in turn in
    # this process group, as `python -m llamajobs.worker RUN_DIR` would.
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
