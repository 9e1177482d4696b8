"""--shard-within: hybrid sharding (FSDP2 over a 2-D mesh: shard within a node, replicate across
nodes) against full sharding. The rules and the estimator's choice as units; then real torchrun
launches on this CPU (2 processes, gloo, the tiny model, seq 64) counted as 2 nodes of 1 rank
(debug.ranks_per_node), shared between assertions through module fixtures:

  all:        full sharding, 4 steps, checkpoints at 2 and 4 (the reference)
  node:       hybrid, the same run
  all->node:  the reference's step-2 checkpoint resumed under hybrid sharding
  node->all:  the hybrid run's step-2 checkpoint resumed under full sharding

The layouts reduce gradients in another order (an all-reduce across the replicas instead of one
reduce-scatter over all ranks), so losses compare within LAYOUT_ATOL, not bitwise.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from llamajobs import catalog, estimate, events
from llamajobs.errors import SpecError
from llamajobs.fit import plan_for_gpu
from llamajobs.spec import DebugSpec, JobSpec
from tests.conftest import assert_exit_0, metrics_rows, torchrun

LAYOUT_ATOL = 1e-5
BASE = dict(size="tiny", cluster="local", procs_per_node=2, seq_len=64, global_batch=8, micro_batch=2, lr=3e-3,
            max_steps=4, checkpoint_every_steps=2)
TWO_NODES = DebugSpec(ranks_per_node=1)  # torchrun --standalone's 2 processes as 2 nodes of 1


# --- the rule and the estimator ---


def test_shard_within_is_refused_for_strategies_that_are_not_fsdp() -> None:
    with pytest.raises(SpecError, match="--shard-within node is FSDP's hybrid sharding; leave it out with "
                                        "--strategy ds-zero3"):
        JobSpec(strategy="ds-zero3", shard_within="node")
    with pytest.raises(SpecError, match="--shard-within .rack. is not allowed; choose one of auto, node, all"):
        JobSpec(shard_within="rack")
    assert JobSpec(strategy="ds-zero3").shard_within == "auto"  # the default stays allowed


def _eight_b(nodes: int, **changes: object) -> JobSpec:
    return JobSpec(**{**dict(size="llama3-8b", strategy="fsdp", cluster="slurm", nodes=nodes, gpus_per_node=8,
                             seq_len=2048, global_batch=512, micro_batch=1, micro_batch_auto=True), **changes})


@pytest.mark.parametrize("nodes", [2, 8])
def test_auto_picks_hybrid_for_8b_across_nodes_on_one_nic_and_records_it(nodes: int) -> None:
    """On one 200 Gb/s NIC per node, full sharding sends every micro-batch's all-gathers across it;
    hybrid sends one gradient all-reduce per step. Hybrid holds more per GPU (a replica per node)."""
    h100 = catalog.GPUS["h100"]
    choice = estimate.shard_choice(_eight_b(nodes), h100)
    node, full = choice["layouts"]["node"], choice["layouts"]["all"]
    assert choice["shard_within"] == "node" and choice["reason"].startswith("node is faster")
    assert node["step_s"] < full["step_s"] and node["comm_s"] < full["comm_s"]
    assert node["verdict"] != "does not fit"
    planned = plan_for_gpu(_eight_b(nodes), h100)
    assert (planned.shard_within, planned.shard_within_auto) == ("node", True)
    # the memory of each layout at the same plan: a node's shard is larger than the job's
    plan = estimate.Plan.from_spec(planned)
    hybrid = estimate.memory(plan, h100)["gpu_mem_gib"]
    spread = estimate.memory(dataclasses.replace(plan, shard_within="all"), h100)["gpu_mem_gib"]
    assert hybrid > spread


def test_auto_falls_back_to_full_sharding_when_a_node_cannot_hold_the_shard() -> None:
    """70B full fine-tune on 8 nodes of 8 A100-40GB: 16 bytes x 70B over one node's 8 GPUs is 140 GB
    per GPU; over 64 GPUs it is 17.5 GB."""
    spec = JobSpec(size="llama3-70b", strategy="fsdp", cluster="slurm", nodes=8, gpus_per_node=8, seq_len=512,
                   global_batch=64, micro_batch=1, activation_checkpointing=True)
    a100 = catalog.GPUS["a100-40g"]
    choice = estimate.shard_choice(spec, a100)
    assert choice["shard_within"] == "all"
    assert choice["reason"].startswith("node does not fit")
    assert plan_for_gpu(spec, a100).shard_within == "all"
    on_two = estimate.shard_choice(dataclasses.replace(spec, nodes=2), a100)  # 70 GB per GPU even over 16
    assert on_two["shard_within"] == "all" and on_two["reason"].startswith("neither fits; all needs less memory")


def test_no_choice_on_one_node_or_for_deepspeed_and_a_given_layout_is_kept() -> None:
    h100 = catalog.GPUS["h100"]
    assert estimate.shard_choice(_eight_b(1), h100) is None
    assert plan_for_gpu(_eight_b(1), h100).shard_within == "all"  # the two are the same: recorded as all
    assert plan_for_gpu(_eight_b(2, strategy="ds-zero3"), h100).shard_within == "auto"
    given = plan_for_gpu(_eight_b(2, shard_within="all"), h100)
    assert (given.shard_within, given.shard_within_auto) == ("all", False)
    assert estimate.shard_choice(_eight_b(2, shard_within="all"), h100)["reason"] == "--shard-within all as given"


def test_estimate_hours_shows_both_layouts_and_json_names_the_choice(cli) -> None:
    args = ("estimate", "hours", "--size", "llama3-8b", "--strategy", "fsdp", "--nodes", "2", "--gpu", "h100",
            "--seq-len", "2048", "--global-batch", "512", "--tokens", "2.5B")
    code, stdout, stderr = cli(*args, "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["shard_within"] == "node"
    assert set(result["shard_within_choice"]["layouts"]) == {"node", "all"}
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    assert "shard within" in stdout and "node is faster" in stdout and "hybrid" in stdout
    code, stdout, _ = cli("estimate", "hours", "--size", "llama3-8b", "--strategy", "ds-zero3", "--nodes", "2", "--gpu",
                          "h100", "--tokens", "2.5B", "--json")
    assert code == 0 and json.loads(stdout)["shard_within"] is None


# --- real launches: 2 processes as 2 nodes ---


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in metrics_rows(run_dir)]


def _assert_close(a: list[tuple[int, float]], b: list[tuple[int, float]]) -> None:
    assert [s for s, _ in a] == [s for s, _ in b]
    worst = max(abs(x - y) for (_, x), (_, y) in zip(a, b))
    print(f"largest loss difference between the layouts: {worst:.3g}")  # (pytest -s shows it)
    assert worst <= LAYOUT_ATOL, f"losses differ by {worst:.3g}: {a} vs {b}"


@pytest.fixture(scope="module")
def make_run(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):
    def make(name: str, **spec: object) -> Path:
        run_dir = tmp_path_factory.mktemp(name)
        shutil.copytree(tokenizer_dir, run_dir / "tokenizer")
        (run_dir / "spec.json").write_text(JobSpec(**{**BASE, "debug": TWO_NODES, **spec}).to_json())
        return run_dir
    return make


def _launch(run_dir: Path):
    result = torchrun("-m", "llamajobs.worker", str(run_dir))
    assert_exit_0(result)
    return result


@pytest.fixture(scope="module")
def full(make_run) -> Path:
    run_dir = make_run("all", shard_within="all")
    assert "hybrid" not in _launch(run_dir).stdout
    return run_dir


@pytest.fixture(scope="module")
def hybrid(make_run) -> Path:
    run_dir = make_run("node", shard_within="node")
    stdout = _launch(run_dir).stdout
    assert ("fsdp: hybrid sharding (--shard-within node): each layer sharded over the 1 rank(s) of a node, "
            "replicated across 2 nodes") in stdout
    return run_dir


def _resume_under(source: Path, target: Path, layout: str) -> tuple[Path, str]:
    """source's step-2 checkpoint (step-4 and final/ left behind) relaunched under `layout`."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("final", "events", "step-4"))
    (target / "checkpoints" / "latest").write_text("step-2\n")
    spec = JobSpec.load(target / "spec.json")
    (target / "spec.json").write_text(dataclasses.replace(spec, shard_within=layout).to_json())
    return target, _launch(target).stdout


@pytest.mark.slow
def test_hybrid_sharding_repeats_full_sharding_losses(full: Path, hybrid: Path) -> None:
    reference = _losses(full)
    assert [s for s, _ in reference] == [1, 2, 3, 4]
    _assert_close(_losses(hybrid), reference)


@pytest.mark.slow
def test_a_checkpoint_of_either_layout_resumes_under_the_other(full: Path, hybrid: Path, tmp_path: Path) -> None:
    reference = _losses(full)
    to_hybrid, stdout = _resume_under(full, tmp_path / "all-to-node", "node")
    assert "replicated across 2 nodes" in stdout
    _assert_close(_losses(to_hybrid), reference)
    to_full, stdout = _resume_under(hybrid, tmp_path / "node-to-all", "all")
    assert "hybrid" not in stdout
    _assert_close(_losses(to_full), reference)
    for run_dir in (to_hybrid, to_full):  # resumed at 2: steps 3 and 4 trained again, under the other layout
        assert [(e["event"], e.get("step")) for e in events.read(run_dir) if e["event"] != "checkpointed"] == [
            ("started", None), ("resumed", 2), ("finished", 4)]
