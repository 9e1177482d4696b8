"""Render, submit, estimate and the worker agree on what runs: every rule on a spec's values is JobSpec
validation's. Walks strategy x mode x the flags that interact and checks that the worker's own
start-up checks, in the single-node environment the launch would give each spec, accept every spec
validation accepts and refuse nothing that validation let through."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from llamajobs import catalog, render
from llamajobs import spec as spec_mod
from llamajobs.errors import SpecError
from llamajobs.site import Site
from llamajobs.spec import FIELDS, JobSpec
from llamajobs.worker import zero_config
from llamajobs.worker.parallel import Dist
from llamajobs.worker.train import check_node, check_supported

# Where it runs: the flags that decide processes, devices and the launch.
PLACEMENT = {
    "strategy": catalog.STRATEGIES,
    "mode": catalog.MODES,
    "compile": (False, True),
    "procs_per_node": (None, 1, 2),
    "launcher": catalog.LAUNCHERS,
    "device": ("auto", "cpu", "cuda"),
    "cluster": ("local", "slurm"),
    "gpus_per_node": (1, 8),
    "nodes": (1, 2),
}
# What trains: the flags that belong to a mode.
MODE_FLAGS = {
    "strategy": catalog.STRATEGIES,
    "mode": catalog.MODES,
    "merge": (False, True),
    "lora_targets": ("q_proj,v_proj", ""),
    "lora_r": (8, 16),
    "num_virtual_tokens": (32, 4),
}


def unvalidated(values: dict) -> JobSpec:
    """A JobSpec holding `values` without running validation: what the worker would face if validation
    had let it through."""
    spec = object.__new__(JobSpec)
    for name in FIELDS:
        object.__setattr__(spec, name, values.get(name, spec_mod.default(name)))
    return spec


def node_environment(spec: JobSpec) -> tuple[Dist, int]:
    """The environment the launch gives rank 0 of this spec on one node: the planned processes, and
    for pp all the planned GPUs driven by its one process."""
    env = Dist(rank=0, local_rank=0, world_size=spec.world_size, local_world_size=spec.planned_procs_per_node,
               device=torch.device("cpu"))
    devices = spec.gpus_per_node if spec.strategy_info.one_process_per_node and spec.plans_gpus else 1
    return env, devices


def worker_refuses(spec: JobSpec) -> str | None:
    """The worker's start-up checks on `spec` in its node's environment: None, or the refusal."""
    try:
        check_supported(spec)
        env, devices = node_environment(spec)
        check_node(spec, env, devices)
        if spec.strategy_info.deepspeed:  # the worker builds DeepSpeed's config on the node
            zero_config.ds_config(spec, world_size=env.world_size, cuda=False)
    except (ValueError, NotImplementedError) as e:
        return str(e)
    return None


@pytest.mark.parametrize("axes", [PLACEMENT, MODE_FLAGS], ids=["placement", "mode flags"])
def test_validation_and_the_worker_agree_on_every_combination(axes):
    accepted = refused = 0
    for combination in itertools.product(*axes.values()):
        values = dict(zip(axes, combination))
        try:
            spec = spec_mod.build(values)  # what render, submit and estimate build from the same flags
        except SpecError as e:
            message = str(e)
            assert "\n" not in message and message.startswith("--"), (values, message)
            refused += 1
            continue
        assert worker_refuses(spec) is None, values
        accepted += 1
    assert accepted and refused  # (both sides of the walk are exercised)


@pytest.mark.parametrize("values, flag", [
    ({"mode": "prefix", "merge": True}, "--merge"),
    ({"strategy": "ds-zero3", "compile": True}, "--compile"),
    ({"launcher": "deepspeed"}, "--launcher deepspeed needs a ds-"),
    ({"mode": "lora", "lora_targets": ()}, "--lora-targets is empty"),
    ({"strategy": "pp", "procs_per_node": 2}, "--strategy pp runs one process per node"),
    ({"strategy": "pp", "mode": "prefix", "cluster": "slurm"}, "--mode prefix with --strategy pp on 8 GPUs"),
    ({"global_batch": 6, "micro_batch": 4}, "--global-batch 6 is not divisible"),  # (auto would pick 1)
])
def test_what_the_worker_refuses_render_refuses_first(values, flag, tmp_path):
    """The worker reads spec.json through validation, then checks its node: each such spec is refused
    by the worker's start-up, and by render (the same validation), naming the flag, before anything
    is written."""
    written = unvalidated(values)
    (tmp_path / "spec.json").write_text(json.dumps(dataclasses.asdict(written)))
    with pytest.raises(SpecError, match=flag):
        JobSpec.load(tmp_path / "spec.json")  # the worker's main() reads this first
    with pytest.raises(SpecError, match=flag):
        render.render(spec_mod.build(values), Site(), tmp_path / "rendered")
    assert not (tmp_path / "rendered").exists()


@pytest.mark.parametrize("values", [
    {"strategy": "pp", "procs_per_node": 2},
    {"strategy": "pp", "mode": "prefix", "cluster": "slurm"},
    {"global_batch": 6},
])
def test_the_node_checks_would_refuse_them_too(values):
    """Those the node can tell are refused by the worker's node checks as well (defence in depth: a
    hand-edited spec.json or launch)."""
    assert worker_refuses(unvalidated(values)) is not None


def test_a_spec_json_that_validation_refuses_never_reaches_the_worker(tmp_path):
    spec = JobSpec(strategy="pp")
    text = spec.to_json().replace('"procs_per_node": null', '"procs_per_node": 2')
    (tmp_path / "spec.json").write_text(text)
    with pytest.raises(SpecError, match="--strategy pp runs one process per node"):
        JobSpec.load(tmp_path / "spec.json")  # what the worker's main() reads first


def test_the_node_checks_refuse_only_what_the_node_tells():
    """A node that gives pp more processes than planned (a hand-edited launch) is the worker's to refuse."""
    spec = JobSpec(strategy="pp")
    env = dataclasses.replace(node_environment(spec)[0], local_world_size=2, world_size=2)
    with pytest.raises(ValueError, match="one process per node"):
        check_node(spec, env, 1)
