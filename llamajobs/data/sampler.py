"""In-memory documents and the window sampler: each epoch, every document once, one random window.

The users' recipe: each epoch visits every document once in a seeded random order and takes one
random window of seq_len + 1 tokens from it; shorter documents are right-padded and the padding is
masked out of the loss. Orders and windows are functions of (seed, epoch, document) only, so the
sample stream is the same whatever the world size, and a position in it is two integers.
"""

from __future__ import annotations

import math
from typing import Iterable, Iterator

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # labels with this value do not count in the loss (torch's cross_entropy default)

# (input_ids, labels) or, for packed rows whose documents are kept apart, (input_ids, labels, position_ids);
# each [micro_batch, seq_len] int64 (llamajobs/worker/packing.py turns positions into the attention mask).
MicroBatch = tuple[torch.Tensor, ...]


def tokenize_documents(texts: Iterable[str], tokenizer: PreTrainedTokenizerBase) -> list[np.ndarray]:
    """Each document as bos + tokens + eos (int32: a LLaMA vocabulary fits)."""
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    from llamajobs.data.encoder import document_start

    bos, eos = document_start(tokenizer), tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; a causal LM's tokenizer has one")
    return [np.array([bos, *doc, eos], dtype=np.int32) for doc in ids]


def steps_per_epoch(n_docs: int, global_batch: int, seq_len: int, tokens_per_epoch: int | None = None) -> int:
    """Optimizer steps in one epoch: every document once (the last partial batch runs into the next
    epoch), or the user's token budget per epoch when given."""
    if tokens_per_epoch:
        return max(1, tokens_per_epoch // (global_batch * seq_len))
    return max(1, n_docs // global_batch)


def total_steps(max_steps: int | None, epochs: float, steps_in_epoch: int) -> int:
    return max_steps or max(1, math.ceil(epochs * steps_in_epoch))


class BatchStream:
    """What both samplers share: a stream of examples (windows, or packed rows) cut into global
    batches; global batch b is examples [b * global_batch, (b + 1) * global_batch) and rank r takes
    the r-th contiguous 1/world_size of it, as micro-batches. `position` (the index of the next
    batch's first example) is the whole state; subclasses say what example i is."""

    def __init__(self, n_docs: int, *, seq_len: int, global_batch: int, micro_batch: int, rank: int,
                 world_size: int, seed: int, pad_id: int) -> None:
        if not n_docs:
            raise ValueError("the corpus has no documents")
        per_rank, rest = divmod(global_batch, world_size)
        if rest or per_rank % micro_batch:
            raise ValueError(
                f"--global-batch {global_batch} must be a multiple of --micro-batch {micro_batch} x "
                f"world size {world_size} = {micro_batch * world_size}")
        self.n_docs = n_docs
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.micro_batch = micro_batch
        self.rank = rank
        self.per_rank = per_rank
        self.seed = seed
        self.pad_id = pad_id
        self.position = 0

    def example(self, index: int) -> tuple[np.ndarray, ...]:
        """Example `index` of the stream as (input_ids, labels[, position_ids]), seq_len each."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        return self

    def __next__(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next global batch."""
        first = self.position + self.rank * self.per_rank
        rows = [self.example(first + i) for i in range(self.per_rank)]
        columns = [torch.from_numpy(np.stack(column)) for column in zip(*rows)]
        self.position += self.global_batch
        return list(zip(*(column.split(self.micro_batch) for column in columns)))

    def check_state(self, state: dict[str, int]) -> None:
        if state["n_docs"] != self.n_docs or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for {state['n_docs']} documents and seed {state['seed']}, but this run has "
                f"{self.n_docs} documents and seed {self.seed}; resume with the same data and --seed")


class WindowSampler(BatchStream):
    """Pretraining: the stream of samples is epoch 0's documents in its order, then epoch 1's, and
    so on, one window each, so a batch may straddle two epochs and no document is dropped."""

    def __init__(self, docs: list[np.ndarray], **batching: int) -> None:
        super().__init__(len(docs), **batching)
        self.docs = docs
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, 0, epoch]).permutation(len(self.docs))}
        return self._orders[epoch]

    def document_at(self, sample: int) -> tuple[int, int]:
        """(epoch, document index) of a sample of the stream."""
        epoch, position = divmod(sample, len(self.docs))
        return epoch, int(self._order(epoch)[position])

    def window_at(self, sample: int) -> np.ndarray:
        """The sample's tokens: seq_len + 1 of them, or the whole document when it is shorter."""
        epoch, doc = self.document_at(sample)
        tokens = self.docs[doc]
        span = self.seq_len + 1
        if len(tokens) <= span:
            return tokens
        start = int(np.random.default_rng([self.seed, 1, epoch, doc]).integers(0, len(tokens) - span + 1))
        return tokens[start:start + span]

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        window = self.window_at(index).astype(np.int64)
        inputs = np.full(self.seq_len, self.pad_id, np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, np.int64)
        n = len(window) - 1
        inputs[:n] = window[:-1]
        labels[:n] = window[1:]
        return inputs, labels

    def state_dict(self) -> dict[str, int]:
        epoch, position = divmod(self.position, len(self.docs))
        return {"epoch": epoch, "position": position, "seed": self.seed, "n_docs": len(self.docs)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.check_state(state)
        self.position = state["epoch"] * len(self.docs) + state["position"]
