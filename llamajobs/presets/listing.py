"""`llamajobs presets`: every preset with what `estimate hours` predicts for it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import llamajobs.spec
from llamajobs import catalog, estimate, presets, site
from llamajobs.estimates import SEED_TOKENS, predicted_hours


@dataclass(frozen=True, slots=True)
class PresetEstimate:
    """A row of `llamajobs presets`: what the preset runs and what `estimate hours` predicts for it."""
    name: str
    description: str
    model: str | None  # the Hub id it names (a submit resolves it); None: the size, randomly initialised
    size: str
    mode: str
    strategy: str
    nodes: int
    gpus_per_node: int
    tokens_per_epoch: int
    hours_per_epoch: float
    gpu_mem_gib: float
    verdict: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def estimates(accel: catalog.Accelerator, tokens: int | None = None, a: estimate.Assumptions = estimate.DEFAULT
              ) -> list[PresetEstimate]:
    """Every preset as `estimate hours` predicts it on `accel`, over `tokens` per epoch, else the preset's
    own, else the seed's corpus. Planned offline: a Hub model at the catalog's shape for its size."""
    _, site_defaults = site.load()
    rows = []
    for name in presets.names():
        values = presets.settings(name)
        # On a GPU cluster whatever the site profile's cluster: the estimate is for the GPU named.
        spec = llamajobs.spec.build({"cluster": "slurm"}, presets.offline(values), site_defaults)
        count = tokens or spec.tokens_per_epoch or SEED_TOKENS
        result = predicted_hours(spec, accel, count, a, None)
        rows.append(PresetEstimate(
            name=name, description=presets.description(name), model=presets.hub_model(values), size=spec.size,
            mode=spec.mode, strategy=spec.strategy, nodes=spec.nodes, gpus_per_node=spec.gpus_per_node,
            tokens_per_epoch=count, hours_per_epoch=result.hours_per_epoch, gpu_mem_gib=result.gpu_mem_gib,
            verdict=result.verdict))
    return rows
