"""Preference pairs for the worker (DPO): a store of `--format preference` served pair by pair.

The store holds each pair as two consecutive documents, chosen then rejected (pair k is documents
2k and 2k + 1), each BOS + prompt + answer + EOS with the loss mask on the answer. A pair is the
unit of everything here: the stream of examples is epoch 0's pairs in a seeded order, then epoch
1's, global batch b is pairs [b * G, (b + 1) * G) and rank r takes the r-th contiguous 1/world_size
of it (as WindowSampler does with documents), so a pair is never split across ranks or
micro-batches. Nothing is packed: each answer has a row of its own, padded after its EOS (a causal
model's real tokens never see the padding after them, so no attention mask is needed), and its
labels are the next token where the mask marks an answer token, -100 elsewhere.
"""

from __future__ import annotations

import numpy as np

from llamajobs.data.sampler import IGNORE_INDEX, BatchStream
from llamajobs.data.store import TokenStore


def is_preference_store(store: object) -> bool:
    return isinstance(store, TokenStore) and bool(store.meta.get("pairs"))


class PairSampler(BatchStream):
    """Global batches of pairs, this rank's slice as micro-batches of (input_ids, labels), each
    [micro_batch, 2, seq_len]: [:, 0] the chosen answers, [:, 1] the rejected ones."""

    def __init__(self, store: TokenStore, **batching: int) -> None:
        if len(store) % 2:
            raise ValueError(f"{store.path}: {len(store)} documents, not pairs; prepare it with --format preference")
        super().__init__(len(store) // 2, **batching)
        self.store = store
        self.n_pairs = len(store) // 2
        longest = int(store.lengths().max())
        if longest > self.seq_len:  # cutting here would drop an answer's end (prepare cuts the prompt's start)
            raise ValueError(f"--seq-len {self.seq_len} is shorter than the store's longest answer with its prompt "
                             f"({longest} tokens); submit with --seq-len {longest} or more, or prepare the store "
                             f"with --max-length {self.seq_len}")
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng([self.seed, 3, epoch]).permutation(self.n_pairs)}
        return self._orders[epoch]

    def pair_at(self, index: int) -> int:
        epoch, position = divmod(index, self.n_pairs)
        return int(self._order(epoch)[position])

    def row(self, doc: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = self.store[doc].astype(np.int64)
        mask = self.store.loss_mask(doc)
        inputs = np.full(self.seq_len, self.pad_id, np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, np.int64)
        n = len(tokens)
        inputs[:n] = tokens
        labels[:n - 1] = np.where(mask[1:] != 0, tokens[1:], IGNORE_INDEX)
        return inputs, labels

    def example(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        pair = self.pair_at(index)
        (chosen, chosen_labels), (rejected, rejected_labels) = self.row(2 * pair), self.row(2 * pair + 1)
        return np.stack([chosen, rejected]), np.stack([chosen_labels, rejected_labels])

    def state_dict(self) -> dict[str, int]:
        epoch, position = divmod(self.position, self.n_pairs)
        return {"epoch": epoch, "position": position, "seed": self.seed, "n_docs": self.n_pairs}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.check_state(state)
        self.position = state["epoch"] * self.n_pairs + state["position"]


def steps_per_epoch(sampler: PairSampler, tokens_per_epoch: int | None = None) -> int:
    """Optimizer steps in an epoch: the pairs over the global batch (a token budget counts both rows
    of a pair)."""
    if tokens_per_epoch:
        return max(1, tokens_per_epoch // (2 * sampler.global_batch * sampler.seq_len))
    return max(1, sampler.n_pairs // sampler.global_batch)
