"""What keeping packed documents apart costs: the worker's training step on the same documents
batched three ways, one device, one run.

    python bench/packing.py                # one GPU: 1.1B-shape full fine-tune and 7B-shape LoRA, seq 2048
    python bench/packing.py --cpu          # the tiny shape on the CPU (the CI smoke)

    unpacked   one document per row, right-padded to seq_len (plain causal attention)
    packed     documents packed greedily into rows, attending across each other (plain causal: SDPA's
               flash kernel), as llamajobs packed before
    isolated   the same rows, each document attending only to itself: positions restart per document
               and the block-diagonal causal mask is built on the device (llamajobs/worker/packing.py)

The documents are instruction-sized (log-normal lengths, median about seq_len / 8), the same for all
three; rows come from the worker's own PackedSampler. Each way runs the worker's step
(train.train_step: its strategy, fused AdamW, chunked cross-entropy) on its first micro-batch; the
step time is the median of --repeats timings of --steps steps (CUDA events), and the rate counted is
target tokens per second (padding is no work done). On GPU one more step runs under CUDA's sync
debugging: "none" means the step never makes the host wait. --json writes the rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from worker_step import Case, first_host_sync, join_single_process_group, randomize, seconds_per_step  # noqa: E402

from llamajobs.data.instruct import PackedSampler  # noqa: E402
from llamajobs.data.sampler import IGNORE_INDEX  # noqa: E402
from llamajobs.spec import JobSpec  # noqa: E402
from llamajobs.worker import model as model_lib  # noqa: E402
from llamajobs.worker import kernels, train  # noqa: E402

WAYS = ("unpacked", "packed", "isolated")


GPU_CASES = (Case("1.1b full", "tinyllama-1.1b", "full", 2048, 4), Case("7b lora r8 q/v", "7b", "lora", 2048, 2))
CPU_CASES = (Case("tiny full", "tiny", "full", 256, 2),)


@dataclass
class Row:
    case: str
    way: str
    micro_batch: int
    seq_len: int
    documents: int = 0  # in the micro-batch
    target_tokens: int = 0  # labels that count in the micro-batch
    step_s: float = math.nan
    target_tokens_per_s: float = math.nan
    host_sync: str = "-"
    error: str = ""
    vs_packed: float | None = None  # isolated (or unpacked) target tokens/s over packed's


class Documents:
    """What PackedSampler reads of a token store: lengths, tokens and loss masks (every token but BOS)."""

    def __init__(self, lengths: np.ndarray, vocab: int) -> None:
        rng = np.random.default_rng(0)
        self.docs = [np.concatenate([[1], rng.integers(3, vocab, n - 1)]).astype(np.int64) for n in lengths]

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.docs[i]

    def lengths(self) -> np.ndarray:
        return np.array([len(d) for d in self.docs], np.int64)

    def loss_mask(self, i: int) -> np.ndarray:
        mask = np.ones(len(self.docs[i]), np.uint8)
        mask[0] = 0
        return mask


def documents(seq_len: int, vocab: int, n: int = 512) -> Documents:
    rng = np.random.default_rng(1)
    lengths = np.clip(rng.lognormal(math.log(seq_len / 8), 0.8, n), 16, seq_len).astype(np.int64)
    return Documents(lengths, vocab)


def micro_batch(way: str, docs: Documents, case: Case) -> tuple[tuple[torch.Tensor, ...], int]:
    """The way's first micro-batch and how many documents it holds."""
    if way == "unpacked":
        rows = []
        for tokens in docs.docs[:case.micro_batch]:
            n = min(len(tokens), case.seq_len)
            inputs = np.full(case.seq_len, 2, np.int64)
            labels = np.full(case.seq_len, IGNORE_INDEX, np.int64)
            inputs[:n] = tokens[:n]
            labels[:n - 1] = tokens[1:n]
            rows.append((inputs, labels))
        return tuple(torch.from_numpy(np.stack(c)) for c in zip(*rows)), case.micro_batch
    sampler = PackedSampler(docs, seq_len=case.seq_len, global_batch=case.micro_batch,
                            micro_batch=case.micro_batch, rank=0, world_size=1, seed=0, pad_id=2)
    batch = next(sampler)[0]
    if way == "packed":  # without the positions the worker builds no document mask: rows cross-attend
        batch = batch[:2]
    _, starts = sampler.packing(0)
    return batch, int(starts[case.micro_batch] - starts[0])


def measure(case: Case, way: str, device: torch.device, env, args: argparse.Namespace) -> Row:
    spec = JobSpec(size=case.size, mode=case.mode, seq_len=case.seq_len, micro_batch=case.micro_batch,
                   global_batch=case.micro_batch, warmup_ratio=0.0, device=device.type, cluster="local",
                   procs_per_node=1, lora_targets=("q_proj", "v_proj"))
    docs = documents(case.seq_len, spec.shape.vocab_size)
    batch, n_docs = micro_batch(way, docs, case)
    row = Row(case.name, way, case.micro_batch, case.seq_len, n_docs, int((batch[1] != IGNORE_INDEX).sum()))
    batch = tuple(t.to(device) for t in batch)
    try:
        strategy = train.build_strategy(spec, env)
        model = strategy.build_model(model_lib.model_config(spec), load_weights=False,
                                     chosen=kernels.choose(spec, env.device.type))
        randomize(model)
        optimizer, scheduler = train.build_optimizer(model, spec, strategy, total=10**6)
        model, optimizer = strategy.wrap(model, optimizer)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]

        def step() -> torch.Tensor:
            return train.train_step(model, optimizer, scheduler, [batch], strategy=strategy, params=params,
                                    max_norm=1.0, world_size=1)[0]
        row.step_s, _, _ = seconds_per_step(step, device, warmup=args.warmup, steps=args.steps, repeats=args.repeats)
        if device.type == "cuda":
            row.host_sync = first_host_sync(step)
        row.target_tokens_per_s = row.target_tokens / row.step_s
    except torch.OutOfMemoryError:
        row.error = "out of memory"
    finally:
        model = optimizer = step = None  # noqa: F841  (free the card before the next row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="The tiny shape on the CPU (the CI smoke).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed steps first (default 3 GPU, 1 CPU).")
    parser.add_argument("--steps", type=int, default=None, help="Steps per timed repeat (default 5 GPU, 2 CPU).")
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats; the median is reported.")
    parser.add_argument("--only", default=None, help="Only the cases whose name starts with this (e.g. 1.1b, 7b).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    args = parser.parse_args()
    args.warmup = args.warmup or (1 if args.cpu else 3)
    args.steps = args.steps or (2 if args.cpu else 5)
    device = torch.device("cpu" if args.cpu else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu")
    cases = [c for c in (CPU_CASES if args.cpu else GPU_CASES) if not args.only or c.name.startswith(args.only)]
    env = join_single_process_group(JobSpec(device=device.type, cluster="local", procs_per_node=1))
    rows = []
    for case in cases:
        measured = {way: measure(case, way, device, env, args) for way in WAYS}
        for way, row in measured.items():
            if way != "packed" and measured["packed"].target_tokens_per_s > 0:
                row.vs_packed = row.target_tokens_per_s / measured["packed"].target_tokens_per_s
            rows.append(row)
            print(f"{row.case:16} {row.way:9} mb {row.micro_batch} seq {row.seq_len}: {row.documents:3} docs, "
                  f"{row.target_tokens:6,} target tokens, {row.step_s * 1000:8.1f} ms/step, "
                  f"{row.target_tokens_per_s:10,.0f} target tok/s"
                  + (f" ({row.vs_packed:.2f}x packed)" if row.vs_packed else "")
                  + f", host sync {row.host_sync}" + (f" {row.error}" if row.error else ""), flush=True)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")


if __name__ == "__main__":
    main()
