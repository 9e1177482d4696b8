"""The plan a run would run and the terms that hold outside the seed's table: --micro-batch auto,
FSDP's accumulation (sharded when the unsharded fp32 gradient does not fit), node types and NICs,
the per-micro-batch floor, and our worker's memory on the H200 bench."""

from __future__ import annotations

import dataclasses
import json

import pytest

from llamajobs import estimate as est
from llamajobs.catalog import GPUS, SIZES
from llamajobs.spec import JobSpec

A100_80, H200 = GPUS["a100-80g"], GPUS["h200"]
BASE = est.Plan.from_spec(JobSpec(cluster="slurm"))


def make_plan(**changes) -> est.Plan:
    return dataclasses.replace(BASE, **changes)




def test_13b_full_fsdp_fits_8_a100_80gb_with_sharded_accumulation():
    plan = make_plan(shape=SIZES["13b"], global_batch=384, micro_batch=4)
    assert est.memory(plan, A100_80)["verdict"] == "does not fit"  # the unsharded fp32 accumulator: 48 GB
    resolved = est.resolve(plan, A100_80)
    assert resolved.sharded_accumulation and resolved.accumulation == "sharded" and resolved.micro_batch == 4
    mem = est.memory(resolved, A100_80)
    assert mem["verdict"] == "fits" and mem["gpu_parts_gib"]["accumulated_grads"] == 0
    # sharded accumulation reduce-scatters every micro-batch: more traffic than one per step
    unsharded = dataclasses.replace(resolved, sharded_accumulation=False)
    assert est.step_time(resolved, A100_80)["comm_s"] > est.step_time(unsharded, A100_80)["comm_s"]


def test_accumulation_is_picked_by_speed_when_both_fit():
    """On NVLink a reduce-scatter per micro-batch hides behind the backward, while adding into the
    unsharded fp32 gradient does not; over PCIe the reduce-scatters cost more than the additions."""
    plan = make_plan(shape=SIZES["7b"], global_batch=128, micro_batch=2)
    assert est.resolve(plan, A100_80).sharded_accumulation
    assert not est.resolve(plan, GPUS["a100-80g-pcie"]).sharded_accumulation
    assert est.memory(plan, GPUS["a100-80g-pcie"])["verdict"] == "fits"


def test_auto_picks_the_fastest_micro_batch_that_fits(cli):
    args = ["estimate", "hours", "--size", "7b", "--strategy", "ds-zero3-offload", "--gpu", "a100-80g", "--nodes", "1",
            "--gpus-per-node", "8", "--tokens", "2.5B", "--seq-len", "512", "--global-batch", "768", "--json"]
    code, stdout, stderr = cli(*args)
    assert code == 0, stderr
    auto = json.loads(stdout)
    assert auto["plan"] == {"micro_batch": 16, "micro_batch_auto": True, "micro_batches_per_step": 6,
                            "gradient_accumulation": "deepspeed"}
    assert 80 < auto["hours_per_epoch"] < 120  # the seed measured 100 hours
    plan = est.Plan.from_spec(JobSpec(cluster="slurm", size="7b", strategy="ds-zero3-offload", global_batch=768))
    for m in est.micro_batch_choices(plan):  # every faster micro-batch does not fit with headroom
        variant = dataclasses.replace(plan, micro_batch=m)
        if est.throughput(variant, A100_80)["tokens_per_s"] > auto["tokens_per_s"] * 1.0001:
            assert est.memory(variant, A100_80)["verdict"] != "fits", m
    code, stdout, _ = cli(*args, "--micro-batch", "4")  # an explicit value wins
    explicit = json.loads(stdout)
    assert explicit["plan"]["micro_batch"] == 4 and not explicit["plan"]["micro_batch_auto"]
    assert explicit["hours_per_epoch"] > 2 * auto["hours_per_epoch"]
    code, stdout, _ = cli("estimate", "hours", "--size", "7b", "--strategy", "ds-zero3-offload", "--global-batch", "768")
    assert code == 0 and stdout.lstrip().startswith("plan") and "micro-batch 16 (auto" in stdout


def test_auto_is_recorded_in_spec_json_as_an_integer(tmp_path):
    from llamajobs import ops, render, spec as spec_lib
    from llamajobs.site import Site

    built = spec_lib.build({"size": "7b", "strategy": "ds-zero3-offload", "cluster": "slurm", "global_batch": 768})
    assert built.micro_batch_auto and built.micro_batch == 4  # no GPU planned yet: the largest of 4, 2, 1
    fit = ops.fit_check(built, "a100-80g")
    assert fit.spec.micro_batch == 16 and fit.spec.micro_batch_auto
    render.render(fit.spec, Site(), tmp_path)
    stored = json.loads((tmp_path / "spec.json").read_text())
    assert stored["micro_batch"] == 16 and stored["micro_batch_auto"] is True
    assert JobSpec.load(tmp_path / "spec.json") == fit.spec
    explicit = spec_lib.build({"size": "7b", "cluster": "slurm", "micro_batch": "8"})
    assert not explicit.micro_batch_auto and ops.fit_check(explicit, "a100-80g").spec.micro_batch == 8
    assert spec_lib.build({"micro_batch": "auto", "global_batch": 6}).micro_batch == 1  # 6 / 2 local ranks = 3
    assert spec_lib.build({}, config={"micro_batch": 2}).micro_batch_auto is False
    assert spec_lib.build({"micro_batch": "auto"}, config={"micro_batch": 2}).micro_batch_auto is True


def test_a_bad_micro_batch_is_one_line_and_exit_2(cli):
    code, stdout, stderr = cli("estimate", "hours", "--size", "7b", "--micro-batch", "lots")
    assert code == 2 and "--micro-batch 'lots'" in stderr and len(stderr.strip().splitlines()) == 1


def test_pcie_boards_and_fewer_nics_are_slower():
    plan = make_plan(shape=SIZES["7b"], global_batch=256, micro_batch=4)
    nvlink, pcie = est.step_time(plan, A100_80)["step_s"], est.step_time(plan, GPUS["a100-80g-pcie"])["step_s"]
    assert pcie > 1.3 * nvlink
    two_nodes = dataclasses.replace(plan, nodes=2)
    one_nic = est.step_time(two_nodes, A100_80)["step_s"]
    eight_nics = est.step_time(two_nodes, A100_80, dataclasses.replace(est.DEFAULT, nics_per_node=8))["step_s"]
    assert eight_nics < one_nic
    assert est.interconnect_gbps(two_nodes, A100_80, dataclasses.replace(est.DEFAULT, nics_per_node=8)) == 168
    assert est.interconnect_gbps(plan, GPUS["a100-80g-pcie"]) == 12


def test_the_host_floor_dominates_small_micro_batches():
    small = make_plan(shape=SIZES["7b"], mode="lora", nodes=1, gpus_per_node=1, seq_len=128, global_batch=8,
                      micro_batch=1)
    times = est.step_time(small, A100_80)
    assert times["compute_s"] == times["host_floor_s"] == pytest.approx(8 * 32 * 248 * 7.9e-6)
    big = dataclasses.replace(small, micro_batch=8)
    assert est.step_time(big, A100_80)["step_s"] < times["step_s"] / 2
    assert est.host_floor_s(dataclasses.replace(small, compile=True)) == pytest.approx(est.host_floor_s(small) / 10)


def test_the_loss_chunk_is_the_workers():
    from llamajobs.worker.kernels import LOSS_CHUNK_TOKENS

    assert est.LOSS_CHUNK_TOKENS == LOSS_CHUNK_TOKENS


def test_memory_of_our_worker_on_the_h200_bench():
    """bench/results/h200-2026-11-28.txt: peak allocated (framework excluded) within 10%."""
    measured = {("7b-lora-seq512", 8, False): 32.8, ("7b-lora-seq512", 8, True): 28.2,
                ("7b-lora-seq512", 32, True): 73.2, ("1.1b-full-seq512", 8, False): 24.5,
                ("1.1b-full-seq512", 8, True): 20.8, ("1.1b-full-seq512", 64, True): 63.5}
    for (case, micro, compiled), gib in measured.items():
        plan = dataclasses.replace(est.BENCH_CASES[case], micro_batch=micro, global_batch=micro, compile=compiled)
        predicted = est.memory(plan, H200)["gpu_mem_gib"] - est.DEFAULT.framework_overhead_gib
        assert predicted == pytest.approx(gib, rel=0.10), (case, micro, compiled, predicted)


def test_sharded_accumulation_is_an_fsdp_setting():
    from llamajobs.errors import SpecError

    with pytest.raises(SpecError, match="sharded_accumulation is FSDP's"):
        JobSpec(strategy="ds-zero3", sharded_accumulation=True)
    assert JobSpec(strategy="fsdp-offload", sharded_accumulation=True).sharded_accumulation
