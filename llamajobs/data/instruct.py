"""Instruction data for the worker: documents of a store with a loss mask, packed into rows.

Each epoch visits every document once in a seeded order and packs them greedily, in that order,
into rows of seq_len tokens (a document that does not fit starts the next row; one longer than
seq_len is cut to seq_len). Labels are the next token where the store's loss mask marks it a
target (the response and its EOS), and -100 everywhere else: the prompt, the padding, and the last
position of every document, so no document is trained to predict its neighbour. Each document keeps
its own single BOS and its own positions, restarting at 0, which the worker turns into a
block-diagonal causal mask (llamajobs/worker/packing.py): a document attends only to itself, and its
logits are those it has alone. (The prompt-learning modes, whose virtual tokens come before the whole
row, are refused on packed data: rules.validate_packing.)

The stream of rows is epoch 0's rows, then epoch 1's; global batch b is rows [b * G, (b + 1) * G)
and rank r takes the r-th contiguous 1/world_size of it, as WindowSampler does, so the position
in the stream (two integers) is the whole state.
"""

from __future__ import annotations

import numpy as np

from llamajobs.data.sampler import IGNORE_INDEX, BatchStream
from llamajobs.data.sampler import steps_per_epoch as sampler_steps_per_epoch
from llamajobs.data.store import TokenStore


class PackedSampler(BatchStream):
    """Global batches of packed rows, this data-parallel rank's slice as micro-batches."""

    def __init__(self, store: TokenStore, **batching: int) -> None:
        super().__init__(len(store), **batching)
        self.store = store
        self.lengths = np.minimum(store.lengths(), self.seq_len)
        self._rows_per_epoch: list[int] = []
        self._packing: tuple[int, np.ndarray, np.ndarray] | None = None  # (epoch, order, row starts)

    # --- packing ---

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 2, epoch]).permutation(len(self.store))

    def packing(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's document order and, per row, the position in that order where it starts
        (plus the end): row k holds order[starts[k]:starts[k + 1]]."""
        if self._packing is None or self._packing[0] != epoch:
            order = self._order(epoch)
            starts = [0]
            used = 0
            for position, length in enumerate(self.lengths[order].tolist()):
                if used + length > self.seq_len:
                    starts.append(position)
                    used = 0
                used += length
            starts.append(len(order))
            self._packing = (epoch, order, np.array(starts, np.int64))
        return self._packing[1], self._packing[2]

    def rows_in_epoch(self, epoch: int) -> int:
        while len(self._rows_per_epoch) <= epoch:
            self._rows_per_epoch.append(len(self.packing(len(self._rows_per_epoch))[1]) - 1)
        return self._rows_per_epoch[epoch]

    def row_at(self, row: int) -> tuple[int, int]:
        """(epoch, row within the epoch) of a row of the stream."""
        epoch = 0
        while row >= self.rows_in_epoch(epoch):
            row -= self.rows_in_epoch(epoch)
            epoch += 1
        return epoch, row

    def example(self, row: int) -> tuple[np.ndarray, ...]:
        """The row's (input_ids, labels[, position_ids]), seq_len each, int64. The padding after the
        last document counts as one more document (its own positions from 0)."""
        epoch, k = self.row_at(row)
        order, starts = self.packing(epoch)
        inputs = np.full(self.seq_len, self.pad_id, np.int64)
        labels = np.full(self.seq_len, IGNORE_INDEX, np.int64)
        positions = np.zeros(self.seq_len, np.int64)
        at = 0
        for doc in order[starts[k]:starts[k + 1]]:
            tokens = self.store[doc][:self.seq_len].astype(np.int64)
            mask = self.store.loss_mask(doc)[:self.seq_len]
            n = len(tokens)
            inputs[at:at + n] = tokens
            labels[at:at + n - 1] = np.where(mask[1:] != 0, tokens[1:], IGNORE_INDEX)
            positions[at:at + n] = np.arange(n)
            at += n
        positions[at:] = np.arange(self.seq_len - at)
        return inputs, labels, positions

    # --- resume ---

    def state_dict(self) -> dict[str, int]:
        epoch, row = self.row_at(self.position)
        return {"epoch": epoch, "row": row, "seed": self.seed, "n_docs": len(self.store)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.check_state(state)
        self.position = sum(self.rows_in_epoch(e) for e in range(state["epoch"])) + state["row"]


def steps_per_epoch(sampler: PackedSampler, tokens_per_epoch: int | None = None) -> int:
    """Optimizer steps in an epoch: epoch 0's rows (or the token budget) over the global batch."""
    return sampler_steps_per_epoch(sampler.rows_in_epoch(0), sampler.global_batch, sampler.seq_len, tokens_per_epoch)
