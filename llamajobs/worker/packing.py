"""Packed rows whose documents do not see each other: the model inputs of a micro-batch.

A packed instruction row (llamajobs/data/instruct.py) carries position ids that restart at 0 with
every document (and with the padding after the last one). Positions alone give each document its
own rotary positions; the attention must also stop at the document's start. transformers 5 finds
packed rows from position ids itself (masking_utils.find_packed_sequence_indices), but only for the
attentions it builds masks for, and its test `(mask[:, -1] == 0).all()` in every forward is a Python
`if` on a GPU tensor: a host sync per layer stack. The worker's attention (model.CAUSAL_SDPA) builds
no mask, so the block-diagonal causal mask is built here, on the device, from the position ids, with
tensor operations only (no sync), and handed to SDPA as a 4-D boolean mask, which transformers
passes through unchanged. SDPA then runs its memory-efficient kernel (a masked one) instead of the
causal flash kernel: bench/worker_step.py measures what that costs.
"""

from __future__ import annotations

from typing import Any

import torch


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Per token, the index of its document in the row: a new document wherever positions restart at 0."""
    return (position_ids == 0).cumsum(-1)


def document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """[batch, 1, seq, seq] boolean: query q may attend to key k when both are in the same document
    and k <= q."""
    doc = document_ids(position_ids)
    n = position_ids.shape[-1]
    causal = torch.ones(n, n, dtype=torch.bool, device=position_ids.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def model_inputs(input_ids: torch.Tensor, *positions: torch.Tensor) -> dict[str, Any]:
    """The forward's keyword arguments for a micro-batch (input_ids, labels[, position_ids]): with
    position ids, each document attends only to itself; without, plain causal attention."""
    if not positions:
        return {"input_ids": input_ids}
    return {"input_ids": input_ids, "position_ids": positions[0], "attention_mask": document_mask(positions[0])}
