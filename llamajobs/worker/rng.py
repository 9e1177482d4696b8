"""Random number generators of one rank: seeding, and the state a checkpoint saves and restores.

What draws from them in training: dropout (LoRA's, and any the model config sets). The sampler has
its own generators (functions of seed, epoch and document) and the weights are initialised on rank 0
under a forked generator, so these states are the only randomness a resume has to carry over.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_all(seed: int, rank: int, step: int = 0) -> None:
    """Seed python, numpy and torch (CPU and CUDA) for this rank: ranks differ (dropout masks must),
    and a run reseeded at step N (a resume on another world size) gets fresh, reproducible streams."""
    value = int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)  # also seeds every CUDA device


def get_state(device: torch.device) -> dict[str, Any]:
    """Everything torch.load(weights_only=True) can read back: tuples, ints, floats and tensors."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_state(state: dict[str, Any], device: torch.device) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda":  # (the caller restores only states saved on the same kind of device)
        torch.cuda.set_rng_state(state["cuda"], device)
