"""The estimator: formulas on cases worked by hand, parameter counts against the real model, the
invariants a planner relies on, the published anchors, measured throughput, and the CLI around it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from llamajobs import estimate as est
from llamajobs import metrics
from llamajobs.catalog import GPUS, SIZES, STRATEGIES, STRATEGY, Shape
from llamajobs.metrics import MetricsRow
from llamajobs.spec import JobSpec

A100_80, A100_40, H200 = GPUS["a100-80g"], GPUS["a100-40g"], GPUS["h200"]
README = Path(__file__).resolve().parent.parent / "README.md"
BASE = est.Plan.from_spec(JobSpec(cluster="slurm"))  # the JobSpec's defaults, on a cluster's GPUs


def make_plan(**changes) -> est.Plan:
    return dataclasses.replace(BASE, **changes)


# --- cases worked by hand ---


def test_llama_7b_parameters_by_hand():
    # per layer: q,k,v,o 4·4096² = 67,108,864; gate,up,down 3·4096·11008 = 135,266,304; two norms 8,192
    layer = 67_108_864 + 135_266_304 + 8_192
    assert SIZES["7b"].layer_params == layer == 202_383_360
    # 32 layers, embedding and head 2·32000·4096, final norm 4096: LLaMA-7B's "6.7B"
    assert SIZES["7b"].params == 32 * layer + 2 * 32000 * 4096 + 4096 == 6_738_415_616


def test_the_plan_takes_every_value_from_a_jobspec():
    """Defaults live only in the JobSpec: a Plan has none of its own, and from_spec copies the spec's."""
    assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               for f in dataclasses.fields(est.Plan))
    spec = JobSpec(size="7b", mode="lora", cluster="slurm", seq_len=1024, global_batch=64, micro_batch=2,
                   lora_r=16, activation_checkpointing=True, cpus_per_node=12)
    plan = est.Plan.from_spec(spec)
    assert (plan.shape, plan.mode, plan.seq_len, plan.global_batch, plan.micro_batch, plan.lora_r, plan.recompute,
            plan.cpu_cores) == (SIZES["7b"], "lora", 1024, 64, 2, 16, True, 12)
    assert BASE.procs == 8 and est.Plan.from_spec(JobSpec(strategy="pp")).procs == 1


def test_flops_per_token_by_hand():
    n = 32 * 202_383_360 + 4096 * 32000  # decoder layers plus the head; the input embedding excluded
    attention = 12 * 32 * 4096 * 512  # 12·L·d·s
    assert est.flops_per_token(SIZES["7b"], 512, "full") == 6 * n + attention == 40_449_343_488
    assert est.flops_per_token(SIZES["7b"], 512, "lora") == 4 * n + attention == 27_234_664_448
    # DESIGN.md's MFU anchor: 14,351 tokens/s of 7B LoRA on one H200 is 49.5% of its measured 790 TFLOP/s
    assert 14351 * est.flops_per_token(SIZES["7b"], 512, "lora") / 790e12 == pytest.approx(0.495, abs=0.001)
    # recompute repeats the decoder layers' forward: 2N without the head, and 4·L·d·s
    assert est.recompute_flops_per_token(SIZES["7b"], 512) == 2 * 32 * 202_383_360 + 4 * 32 * 4096 * 512


def test_zero3_bytes_per_gpu_on_8_gpus_by_hand():
    plan = make_plan(shape=SIZES["7b"], strategy="ds-zero3", gpus_per_node=8, global_batch=32, micro_batch=4)
    largest = 32000 * 4096  # the embedding (and the head): DeepSpeed's "largest layer"
    deepspeed_part = 4 * largest + 18 * 6_738_415_616 / 8
    assert deepspeed_part == 15_685_723_136  # 14.6 GiB
    gathered = 2 * (2 * 202_383_360 + 2 * 32000 * 4096 + 4096)  # two layers and the root group in bf16
    assert est.model_state_bytes(plan)["state_gpu"] == deepspeed_part + gathered


def test_deepspeed_estimators_agree():
    """Our ZeRO formulas are DeepSpeed's own estimators (zero_init for ZeRO-3)."""
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    stage12 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    shape = SIZES["13b"]
    n, largest = shape.params, est.largest_module_params(shape)
    gathered = est.gathered_bytes(shape)
    for nodes in (1, 2):
        plan = make_plan(shape=shape, nodes=nodes, gpus_per_node=8, global_batch=64 * nodes, micro_batch=8)
        z3 = est.model_state_bytes(dataclasses.replace(plan, strategy="ds-zero3"))
        _, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(n, largest, 8, nodes, cpu_offload=False,
                                                                 cpu_offload_params=False, zero_init=True)
        assert z3["state_gpu"] - gathered == pytest.approx(gpu, rel=1e-9)
        z3o = est.model_state_bytes(dataclasses.replace(plan, strategy="ds-zero3-offload"))
        cpu, gpu, _ = stage3.estimate_zero3_model_states_mem_needs(n, largest, 8, nodes, cpu_offload=True,
                                                                   cpu_offload_params=True, zero_init=True)
        assert (z3o["state_gpu"] - gathered, z3o["state_cpu"]) == pytest.approx((gpu, cpu), rel=1e-9)
        z2 = est.model_state_bytes(dataclasses.replace(plan, strategy="ds-zero2"))
        _, gpu = stage12.estimate_zero2_model_states_mem_needs(n, 8, nodes, cpu_offload=False)
        assert z2["state_gpu"] == pytest.approx(gpu, rel=1e-9)
        z2o = est.model_state_bytes(dataclasses.replace(plan, strategy="ds-zero2-offload"))
        cpu, gpu = stage12.estimate_zero2_model_states_mem_needs(n, 8, nodes, cpu_offload=True)
        assert z2o["state_gpu"] == gpu
        # DeepSpeed's N·max(4G, 16)·1.5 counts an fp32 model per rank (each rank loading it); our worker
        # loads once, so what stays is the 16 bytes of offloaded states: 16N·gpus_per_node/G·1.5.
        assert z2o["state_cpu"] == pytest.approx(16 * n / nodes * 1.5) and z2o["state_cpu"] <= cpu


def test_fsdp_accumulation_holds_an_unsharded_fp32_gradient():
    """The worker skips the reduce-scatter on all micro-batches but the last: 4 bytes per trained
    parameter on every GPU while accumulating, none without accumulation."""
    shape = SIZES["7b"]
    accumulating = make_plan(shape=shape, global_batch=64, micro_batch=4)  # 2 micro-batches per rank
    single = make_plan(shape=shape, global_batch=32, micro_batch=4)
    assert accumulating.accum == 2 and single.accum == 1
    assert est.model_state_bytes(accumulating)["accumulated_grads"] == 4 * shape.params
    assert est.model_state_bytes(single)["accumulated_grads"] == 0
    lora = dataclasses.replace(accumulating, mode="lora")
    assert est.model_state_bytes(lora)["accumulated_grads"] == 4 * lora.trainable_params
    assert est.model_state_bytes(dataclasses.replace(accumulating, strategy="ds-zero3"))["accumulated_grads"] == 0


def test_lora_trains_a_few_million_parameters():
    # q_proj and v_proj, r 8: 32 layers x 2 x 8 x (4096 + 4096)
    assert make_plan(shape=SIZES["7b"], mode="lora").trainable_params == 32 * 2 * 8 * 8192 == 4_194_304
    plan = make_plan(shape=SIZES["7b"], mode="lora", global_batch=32)
    state = est.model_state_bytes(plan)["state_gpu"]
    assert state == 2 * SIZES["7b"].params / 8 + est.gathered_bytes(SIZES["7b"]) + 16 * 4_194_304


def test_logits_and_loading_by_hand():
    # bf16 logits and their gradient (4 bytes), one 2,048-row chunk upcast in fp32 at a time (12 bytes)
    assert est.logits_bytes(SIZES["7b"], 4, 512) == 4 * 512 * 32000 * 4 + 2048 * 32000 * 12
    assert est.logits_bytes(SIZES["7b"], 1, 512) == 512 * 32000 * 16
    plan = make_plan(shape=SIZES["7b"])
    assert est.loading_bytes(plan) == 4 * SIZES["7b"].params  # fp32 random init, once per job
    assert est.loading_bytes(dataclasses.replace(plan, weights_from_disk=True)) == 2 * SIZES["7b"].params


# --- the model the estimator counts is the model the worker builds ---


def _meta_model(shape):
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM

    config = shape.hf_config()
    with torch.device("meta"):  # the family's own class (Qwen2's attention biases are not in LLaMA's config)
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), **config))


@pytest.mark.parametrize("name", [*SIZES, "tinyllama", "falcon-like"])
def test_parameter_counts_match_transformers(name):
    shape = {"tinyllama": est.TINYLLAMA, "falcon-like": est.FALCON_7B}.get(name) or SIZES[name]
    model = _meta_model(shape)
    unique = {id(p): p.numel() for p in model.parameters()}  # tied embeddings count once
    assert shape.params == sum(unique.values())
    assert est.largest_module_params(shape) == max(
        sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    layer = model.model.layers[0]
    assert shape.layer_params == sum(p.numel() for p in layer.parameters())


def test_activation_bytes_match_what_autograd_saves():
    """The per-layer coefficients were measured this way; a tiny shape on the CPU keeps them honest."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    def saved(shape, layers):
        config = LlamaConfig(**{**dataclasses.replace(shape, n_layers=layers).hf_config(),
                                "attn_implementation": "sdpa"})
        model = LlamaForCausalLM(config).to(torch.bfloat16).train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=torch.zeros(2, 128, dtype=torch.long))
        return sum(seen.values())

    shape = Shape(name="probe", dim=256, n_layers=4, n_heads=4, n_kv_heads=4, ffn_dim=688, vocab_size=512,
                      max_seq_len=128)
    per_layer = (saved(shape, 4) - saved(shape, 2)) / 2
    one_layer = make_plan(shape=dataclasses.replace(shape, n_layers=1), micro_batch=2, seq_len=128)
    assert per_layer == pytest.approx(est.activation_bytes(one_layer), rel=0.02)


# --- what a planner relies on ---

SHAPES = ["7b", "13b", "65b", "llama3-8b"]


def _plans():
    for size in SHAPES:
        for mode in ("full", "lora"):
            for recompute in (False, True):
                yield make_plan(shape=SIZES[size], mode=mode, recompute=recompute, global_batch=512, micro_batch=4)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_more_gpus_never_raise_memory_per_gpu(strategy):
    for plan in _plans():
        plan = dataclasses.replace(plan, strategy=strategy)
        previous = None
        for nodes, per_node in ((1, 2), (1, 4), (1, 8), (2, 8), (4, 8), (16, 8)):
            mem = est.memory(dataclasses.replace(plan, nodes=nodes, gpus_per_node=per_node), A100_80)
            if previous:
                assert mem["gpu_mem_gib"] <= previous["gpu_mem_gib"] + 1e-9, (plan, nodes, per_node)
                if per_node == previous["per_node"]:  # same processes per node: host RAM never grows either
                    assert mem["cpu_mem_gib"] <= previous["cpu_mem_gib"] + 1e-9, (plan, nodes)
            previous = {**mem, "per_node": per_node}


@pytest.mark.parametrize("offload", sorted(s.name for s in STRATEGY.values() if s.offload))
def test_offload_never_raises_gpu_memory_and_never_predicts_faster(offload):
    plain = STRATEGY[offload].without_offload
    for plan in _plans():
        for nodes in (1, 2, 8):
            for gpu in GPUS.values():
                base = dataclasses.replace(plan, nodes=nodes, strategy=plain)
                moved = dataclasses.replace(base, strategy=offload)
                assert est.memory(moved, gpu)["gpu_mem_gib"] <= est.memory(base, gpu)["gpu_mem_gib"], (plan, nodes)
                assert est.step_time(moved, gpu)["step_s"] >= est.step_time(base, gpu)["step_s"], (plan, nodes, gpu)


def test_more_nodes_never_shorten_the_epoch_below_linear_and_mfu_is_model_flops():
    plan = make_plan(shape=SIZES["7b"], global_batch=512, micro_batch=4, tokens_per_epoch=10**9)
    one = est.hours(plan, A100_80)
    two = est.hours(dataclasses.replace(plan, nodes=2), A100_80)
    assert two.hours_per_epoch >= one.hours_per_epoch / 2  # the network is slower than NVLink
    recompute = est.hours(dataclasses.replace(plan, recompute=True), A100_80)
    assert recompute.hours_per_epoch > one.hours_per_epoch
    # MFU counts model FLOPs only: recompute spends more and reports less
    assert recompute.mfu < one.mfu
    assert one.mfu == pytest.approx(est.flops_per_token(SIZES["7b"], 512, "full") * one.tokens_per_s_per_gpu / 312e12)


def test_the_13b_verdicts_name_a_strategy_that_fits():
    plan = make_plan(shape=SIZES["13b"], global_batch=384, micro_batch=4)
    on_40 = est.memory_table(dataclasses.replace(plan, micro_batch_auto=True), A100_40)
    # fsdp fits 40 GB only because the estimator picks sharded accumulation (and a micro-batch) for it
    fsdp = next(r for r in on_40.strategies if r.strategy == "fsdp")
    assert fsdp.verdict == "fits" and fsdp.accumulation == "sharded"
    assert est.memory(plan, A100_40)["verdict"] == "does not fit"  # the unsharded fp32 accumulator
    # fsdp-offload's CPU Adam (torch's fused AdamW) costs less than fsdp's comm at 12 micro-batches
    assert on_40.recommended == "fsdp-offload"
    on_80 = est.memory_table(plan, A100_80)
    fitting = {r.strategy: r.tokens_per_s for r in on_80.strategies if r.verdict == "fits"}
    # 80 GB holds ZeRO-2's replicated 16-bit weights: the fastest strategy that fits, and it is recommended
    assert on_80.recommended == max(fitting, key=fitting.get) == "ds-zero2"
    message = est.fit_check(plan, A100_40)
    assert "--strategy fsdp-offload would fit" in message and "accumulates over 12 micro-batches" in message
    assert est.fit_check(dataclasses.replace(plan, strategy="ds-zero3-offload"), A100_40) is None


def test_largest_fitting_micro_batch():
    plan = make_plan(shape=SIZES["7b"], strategy="ds-zero3-offload", global_batch=384, micro_batch=4)
    m = est.largest_fitting_micro_batch(plan, A100_80)
    assert m and 48 % m == 0
    assert est.memory(dataclasses.replace(plan, micro_batch=m), A100_80)["verdict"] == "fits"


def test_assumptions_can_be_overridden():
    plan = make_plan(shape=SIZES["7b"], nodes=2, global_batch=512)
    slow = est.hours(plan, A100_80, 10**9).hours_per_epoch
    fast = est.hours(plan, A100_80, 10**9, est.with_overrides({"network_gbps": "200"})).hours_per_epoch
    assert fast < slow
    with pytest.raises(ValueError, match="not an assumption"):
        est.with_overrides({"speed": "1"})


# --- calibration and checks ---


def test_loop_efficiency_is_the_fit_of_its_anchors():
    e_max, width = est.fit_loop_efficiency()
    assert e_max == pytest.approx(est.DEFAULT.loop_efficiency_max, rel=0.005)
    assert width == pytest.approx(est.DEFAULT.loop_efficiency_width, rel=0.005)


def test_anchors_are_reproduced_within_the_stated_error():
    rows = est.compare_anchors()
    for row in rows:
        if row["role"] == "fit" and "plain loop" in row["source"]:
            assert abs(row["error"]) < 0.01, row
        if row["role"] == "check":
            assert abs(row["error"]) <= est.EXPECTED_ERROR[row["strategy"]], row
    published = [r for r in est.compare_published() if r["role"] == "check" and r["error"] is not None]
    for row in published:
        assert abs(row["error"]) <= est.EXPECTED_ERROR[row["strategy"]], row
    checked = {r["strategy"] for r in rows + published if r["role"] == "check"}
    assert checked == set(STRATEGIES) - est.UNCHECKED


def test_readme_carries_the_current_anchor_table():
    regenerate = "python -c 'from llamajobs.estimate import anchors_markdown; print(anchors_markdown())'"
    assert est.anchors_markdown() in README.read_text(), f"README's anchor table is stale; regenerate: {regenerate}"


def test_bench_predictions_are_the_cli_prediction(cli):
    bench = est.bench_predictions(H200)
    assert set(bench) == {"7b-lora-seq512", "1.1b-full-seq512"}
    code, stdout, stderr = cli("estimate", "hours", "--size", "7b", "--mode", "lora", "--strategy", "fsdp", "--gpu",
                               "h200", "--nodes", "1", "--gpus-per-node", "1", "--global-batch", "8",
                               "--micro-batch", "8", "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["tokens_per_s"] == pytest.approx(bench["7b-lora-seq512"]["tokens_per_s"])
    # the worker wraps even one GPU in FSDP2: a little slower than the plain loop it was fitted on
    for case, plain in (("7b-lora-seq512", 14351), ("1.1b-full-seq512", 40265)):
        plain_loop = est.plain_loop_tokens_per_s(est.BENCH_CASES[case], H200)
        assert plain_loop == pytest.approx(plain, rel=0.001)
        assert 0.8 * plain_loop < bench[case]["tokens_per_s"] < plain_loop


# --- measured throughput ---


def _rows(step_times, tokens_per_step=1000, start=0, elapsed=0.0):
    rows = []
    for i, step_time in enumerate(step_times, start=start + 1):
        elapsed += step_time
        rows.append(MetricsRow(step=i, step_time_s=step_time, tokens_per_s=tokens_per_step / step_time,
                               tokens_per_s_per_gpu=tokens_per_step / step_time / 8, tokens=i * tokens_per_step,
                               epoch=i / 100, total_steps=100, mfu=0.4 * step_time ** -1 / 2, peak="a100-80g",
                               elapsed_s=elapsed, mem_gib=30.0, loss=2.0, lr=1e-5, grad_norm=1.0,
                               peak_flops=312e12, time=1e9 + elapsed))
    return rows


def test_measured_hours_leave_out_warmup_and_checkpoints():
    steps = [9.0, 5.0, 3.0, 2.0, 2.0] + [2.0] * 9 + [2.0 + 30.0] + [2.0] * 5  # a 30 s checkpoint at step 14
    result = est.hours_from_metrics(_rows(steps), [{"event": "checkpointed", "step": 14, "seconds": 30.0}])
    assert result.tokens_per_s == pytest.approx(500.0)  # 1000 tokens per 2 s step
    assert result.hours_per_epoch == pytest.approx(100_000 / 500 / 3600)
    assert result.steady_steps == 15
    # 80 steps to go at 2 s, plus checkpoints at the rate so far (30 s per computed second)
    assert result.remaining_s == pytest.approx(80 * 2.0 * (1 + 30 / (sum(steps) - 30)), rel=1e-6)
    assert result.mfu == pytest.approx(0.1)  # measured MFU scaled to the steady throughput
    assert result.source == "measured"


def test_measured_hours_read_the_rows_the_worker_writes(tmp_path):
    rows = _rows([9.0, 5.0, 3.0, 2.0, 2.0] + [2.0] * 10)
    (tmp_path / metrics.METRICS_FILE).write_text("".join(row.to_json() + "\n" for row in rows) + '{"step": 1')
    read = metrics.read(tmp_path, tail_bytes=None)
    assert read.rows == rows and read.bad_lines == 1  # (a torn last line is no row)
    assert est.hours_from_metrics(read.rows) == est.hours_from_metrics(rows)


def test_measured_hours_restart_warmup_after_a_resume():
    first = _rows([9.0] + [2.0] * 9)
    resumed = _rows([20.0, 8.0, 4.0, 4.0, 4.0, 4.0, 4.0], start=10)  # elapsed_s starts again: a new attempt
    result = est.hours_from_metrics(first + resumed)
    # steady: steps 6-10 of the first attempt (2 s) and 16-17 of the second (4 s)
    assert result.step_s == pytest.approx((5 * 2.0 + 2 * 4.0) / 7)
    assert est.hours_from_metrics([]) is None


# --- the CLI ---


def test_hours_json_keys(cli):
    code, stdout, stderr = cli("estimate", "hours", "--size", "7b", "--strategy", "fsdp", "--nodes", "1",
                               "--gpus-per-node", "8", "--gpu", "a100-80g", "--tokens", "2.5B",
                               "--global-batch", "384", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert {"hours_per_epoch", "tokens_per_s", "tokens_per_s_per_gpu", "mfu", "gpu_mem_gib", "cpu_mem_gib",
            "fits"} <= set(result)
    assert result["tokens_per_s"] == pytest.approx(result["tokens_per_s_per_gpu"] * 8)
    assert 20 < result["hours_per_epoch"] < 45  # the seed measured 35 h on 8xA100 with HF Trainer


def test_memory_json_keys(cli):
    code, stdout, stderr = cli("estimate", "memory", "--size", "13b", "--gpu", "a100-40g", "--global-batch", "384",
                               "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert set(result) == {"strategies", "recommended"}
    assert [r["strategy"] for r in result["strategies"]] == list(STRATEGIES)
    for row in result["strategies"]:
        assert {"strategy", "gpu_mem_gib", "cpu_mem_gib", "verdict"} <= set(row)
        assert row["verdict"] in {"fits", "tight", "does not fit"}
    assert result["recommended"] == "fsdp-offload"
    assert all(r["micro_batch"] >= 1 and r["accumulation"] for r in result["strategies"])


def test_grid(cli):
    code, stdout, stderr = cli("estimate", "hours", "--size", "7b,13b", "--strategy", "all", "--tokens", "2.5B",
                               "--json")
    assert code == 0, stderr
    rows = json.loads(stdout)["rows"]
    assert [(r["size"], r["strategy"]) for r in rows] == [(s, t) for s in ("7b", "13b") for t in STRATEGIES]
    for row in rows:
        assert set(row) >= {"size", "strategy", "mode", "hours_per_epoch", "mfu", "gpu_mem_gib", "verdict"}
    code, stdout, _ = cli("estimate", "memory", "--size", "all", "--strategy", "fsdp", "--mode", "lora", "--json")
    assert code == 0
    assert [r["size"] for r in json.loads(stdout)["rows"]] == [s for s in SIZES if s != "tiny"]
    code, stdout, _ = cli("estimate", "hours", "--size", "7b,13b", "--tokens", "1B")
    assert code == 0 and "13b" in stdout and "hours/epoch" in stdout


@pytest.mark.parametrize("args, message", [
    (["--size", "7b,8b"], "--size '8b' is not allowed"),
    (["--strategy", "fsdp,zero9"], "--strategy 'zero9' is not allowed"),
    (["--size", "7b", "--assume", "network_gbps"], "--assume 'network_gbps' is malformed"),
    (["--size", "7b", "--assume", "speed=3"], "--assume speed: not an assumption"),
    (["--size", "7b", "--gpu", "v100", "--peak-tflops", "125"], "--gpu 'v100' is not known"),
])
def test_bad_estimate_input_is_one_line_and_exit_2(cli, args, message):
    code, stdout, stderr = cli("estimate", "hours", *args)
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1 and stdout == ""


def test_other_gpus(cli):
    code, stdout, stderr = cli("estimate", "hours", "--size", "7b", "--gpu", "v100", "--peak-tflops", "125",
                               "--gpu-mem-gib", "32", "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    # --micro-batch auto finds a plan that fits 32 GB; the old default of 4 does not
    assert result["peak"] == "v100" and result["verdict"] == "fits" and result["plan"]["micro_batch_auto"]
    code, stdout, stderr = cli("estimate", "hours", "--size", "7b", "--gpu", "v100", "--peak-tflops", "125",
                               "--gpu-mem-gib", "32", "--micro-batch", "16", "--json")
    assert json.loads(stdout)["verdict"] == "does not fit" and json.loads(stdout)["plan"]["micro_batch"] == 16
    code, stdout, _ = cli("estimate", "hours", "--size", "7b", "--gpu", "a100-80g", "--peak-tflops", "624", "--json")
    assert json.loads(stdout)["peak_tflops"] == 624


def test_hours_help_states_the_expected_error(cli):
    code, stdout, _ = cli("estimate", "hours", "--help")
    assert code == 0
    text = " ".join(stdout.split())
    for strategy in STRATEGIES:
        assert f"{strategy} {est.expected_error_text(strategy)}" in text


def test_submit_refuses_what_does_not_fit(cli):
    code, stdout, stderr = cli("submit", "--cluster", "slurm", "--size", "33b", "--global-batch", "384",
                               "--gpu", "a100-40g", "--time", "1:00:00")
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1
    assert "--strategy fsdp" in stderr and "--strategy fsdp-offload would fit" in stderr and "--force" in stderr
    code, _, stderr = cli("submit", "--cluster", "slurm", "--size", "65b", "--global-batch", "384", "--time", "1:00:00")
    assert code == 2 and "a100-80g assumed" in stderr


def test_submit_checks_a_slurm_run_on_the_assumed_gpu():
    # (a local run is checked against this host's RAM, which it is: test_submit_checks.py)
    from llamajobs.ops import fit_check
    from llamajobs.spec import JobSpec

    on_slurm = JobSpec(size="tiny", cluster="slurm", global_batch=32)
    fit = fit_check(on_slurm, None)
    assert fit.accelerator.name == "a100-80g" and "assumed" in fit.note



def test_asynchronous_checkpoints_stage_a_node_s_share_of_the_saved_state_in_host_memory() -> None:
    """DCP's async_save copies what each rank saves (fp32 weights and two Adam moments: 12 bytes a
    trained parameter) to host memory: a node holds its ranks' shards. Loading is over by then, so the
    larger of the two counts; DeepSpeed saves synchronously; under hybrid sharding a node saves a
    whole replica's shards."""
    from llamajobs.estimate import GIB, Plan, memory, staging_bytes

    a100 = GPUS["a100-80g"]
    plan = Plan.from_spec(JobSpec(size="7b", strategy="fsdp", cluster="slurm", nodes=2, gpus_per_node=8,
                                  shard_within="all", model_path=None))
    n = plan.shape.params
    assert plan.async_checkpoints and staging_bytes(plan) == 12 * n / 16 * 8
    parts = memory(plan, a100)["cpu_parts_gib"]
    assert parts["checkpoint_staging"] == pytest.approx(6 * n / GIB)
    synchronous = dataclasses.replace(plan, async_checkpoints=False)
    added = memory(plan, a100)["cpu_mem_gib"] - memory(synchronous, a100)["cpu_mem_gib"]
    assert added == pytest.approx(max(parts["loading"], parts["checkpoint_staging"]) - parts["loading"])
    assert added > 0  # 6 bytes a parameter per node against the 4 of an fp32 random init
    assert staging_bytes(dataclasses.replace(plan, shard_within="node")) == 12 * n
    for synchronous_strategy in ("ds-zero3", "fsdp-offload"):
        assert staging_bytes(Plan.from_spec(JobSpec(size="7b", strategy=synchronous_strategy, cluster="slurm"))) == 0
    assert not JobSpec(checkpoint_every_steps=None, checkpoint_every_minutes=None).async_checkpoints


def test_a_running_job_below_70_percent_of_its_predicted_throughput_is_slow():
    """status's SLOW: steady tokens/s (warm-up and checkpoint pauses left out) against the estimator's
    prediction for the job's own plan on the GPU it reports."""
    from llamajobs import monitor

    spec = JobSpec(size="7b", strategy="fsdp", cluster="slurm", nodes=1, gpus_per_node=8, seq_len=512,
                   global_batch=128, micro_batch=4)
    predicted = est.throughput(spec, GPUS["a100-80g"])["tokens_per_s"]
    tokens_per_step = 128 * 512

    def rows_at(share: float, steps: int = 12):
        step_time = tokens_per_step / (share * predicted)
        return _rows([step_time * 3] + [step_time] * (steps - 1), tokens_per_step=tokens_per_step)
    reason = monitor.slow_reason(spec, rows_at(0.5), [])
    assert reason is not None and reason.startswith(f"{0.5 * predicted:,.0f} tokens/s after warm-up, 50% of the ")
    assert "a100-80g (below 70%)" in reason
    assert monitor.slow_reason(spec, rows_at(0.8), []) is None
    assert monitor.slow_reason(spec, rows_at(0.5, steps=5), []) is None  # still warming up
    assert monitor.slow_reason(JobSpec(cluster="local"), rows_at(0.5), []) is None  # not planned on GPUs
