import dataclasses
import json

import pytest

from llamajobs import catalog, spec, values
from llamajobs.errors import SpecError
from llamajobs.spec import JobSpec
from llamajobs.worker import zero_config


def test_defaults_live_in_the_jobspec():
    s = JobSpec()
    assert (s.seq_len, s.global_batch, s.micro_batch, s.lr, s.warmup_ratio) == (512, 128, 4, 2e-5, 0.03)
    assert (s.lora_r, s.lora_alpha, s.lora_dropout, s.lora_targets) == (8, 32, 0.1, ("q_proj", "v_proj"))
    assert (s.keep_checkpoints, s.max_requeues, s.checkpoint_every_minutes) == (2, 20, 60.0)


def test_the_accumulation_steps_are_computed_once_and_refused_where_they_do_not_divide():
    s = JobSpec(global_batch=16, micro_batch=2)  # the local cluster plans 2 ranks
    assert (s.accum_steps(), s.accum_steps(4)) == (4, 2)  # planned; the world size the node found
    with pytest.raises(SpecError, match=r"--global-batch 16 is not divisible by micro-batch 2 x world size 3 = 6; "
                                        r"use a multiple of 6"):
        s.accum_steps(3)
    zero = dataclasses.replace(s, strategy="ds-zero2")
    assert [zero_config.ds_config(zero, world_size=w)["gradient_accumulation_steps"] for w in (None, 4)] == [4, 2]


def test_one_device_rule_cuda_when_asked_or_there_and_auto():
    assert [values.device_type(d, True) for d in values.DEVICES] == ["cuda", "cuda", "cpu"]
    assert [values.device_type(d, False) for d in ("auto", "cpu")] == ["cpu", "cpu"]
    with pytest.raises(SpecError, match="--device cuda, but there is no usable CUDA device here; use --device auto"):
        values.device_type("cuda", False)
    with pytest.raises(SpecError, match="--device 'gpu'; choose auto, cuda, cpu"):
        values.device_type("gpu", True)


def test_json_round_trip():
    s = spec.build({"size": "7b", "mode": "lora", "lora_targets": "q_proj,k_proj,v_proj", "cluster": "slurm",
                    "nodes": 2, "time": "2-00:00:00", "tokens_per_epoch": "2.5B"})
    assert JobSpec.from_json(s.to_json()) == s
    assert json.loads(s.to_json())["tokens_per_epoch"] == 2_500_000_000


def test_explicit_flags_win_over_config_over_site():
    s = spec.build({"lr": 1e-4}, config={"lr": 3e-4, "seq-len": 256}, site={"seq_len": 128, "partition": "gpu"})
    assert (s.lr, s.seq_len, s.partition) == (1e-4, 256, "gpu")


@pytest.mark.parametrize("values, message", [
    ({"size": "8b"}, "--size '8b' is not known"),
    ({"strategy": "zero4"}, "--strategy 'zero4' is not allowed"),
    ({"global_batch": 100, "micro_batch": 4}, "--global-batch 100 is not divisible by micro-batch 4 x world size 2"),
    ({"size": "tiny", "seq_len": 4096, "global_batch": 8, "micro_batch": 1}, "--seq-len 4096 exceeds the model's maximum 512"),
    ({"nodes": 2, "cluster": "local"}, "--nodes 2: the local cluster has one node"),
    ({"lora_r": 16}, "--lora-r needs --mode lora"),
    ({"num_virtual_tokens": 8}, "--num-virtual-tokens needs --mode prefix, ptuning or prompt"),
    ({"time": "1:2:3:4"}, "--time '1:2:3:4' is malformed"),
    ({"time": "soon"}, "--time 'soon' is malformed"),
    ({"global_batch": "many"}, "--global-batch 'many' is not a valid int"),
    ({"name": "a b/c"}, "--name 'a b/c' is not allowed"),
    ({"lr": -1.0}, "--lr -1.0 must be positive"),
])
def test_bad_values_name_the_flag(values, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace("'", "'")):
        spec.build(values)


def test_unknown_config_key_lists_the_allowed_ones():
    with pytest.raises(SpecError, match="unknown key 'learning_rate'.*allowed: size, strategy"):
        spec.build({}, config={"learning_rate": 1})


def test_model_path_must_be_an_hf_llama_directory(tmp_path):
    with pytest.raises(SpecError, match="no config.json there"):
        spec.build({"model_path": str(tmp_path)})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SpecError, match="model_type is 'gpt2'; supported: llama, mistral, qwen2, qwen3"):
        spec.build({"model_path": str(tmp_path)})
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 172, "vocab_size": 512, "max_position_embeddings": 256}))
    s = spec.build({"model_path": str(tmp_path), "seq_len": 256, "global_batch": 8, "micro_batch": 1})
    assert s.shape.dim == 64 and s.shape.max_seq_len == 256


@pytest.mark.parametrize("text, minutes", [
    ("30", 30), ("30:30", 31), ("48:00:00", 2880), ("1-12", 2160), ("2-00:00:00", 2880), ("0-00:10", 10),
])
def test_slurm_time_formats(text, minutes):
    assert spec.parse_slurm_time(text) == minutes


@pytest.mark.parametrize("text, count", [("2.5B", 2_500_000_000), ("800M", 800_000_000), ("2500000000", 2_500_000_000),
                                         ("12k", 12_000)])
def test_token_counts(text, count):
    assert spec.parse_count(text) == count


def test_world_size_follows_the_cluster():
    assert spec.build({"cluster": "slurm", "nodes": 2}).world_size == 16
    assert spec.build({"cluster": "local"}).world_size == 2
    assert spec.build({"cluster": "slurm", "procs_per_node": 4, "global_batch": 64}).world_size == 4


# --- what a spec.json needs from the model is stored in it ---


def tiny_model_dir(folder):
    """A saved HF LLaMA directory (config.json is all the spec reads; the worker reads the rest)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "intermediate_size": 172, "vocab_size": 600, "max_position_embeddings": 1024}))
    return folder


def test_a_moved_model_dir_does_not_break_reading_the_spec(tmp_path):
    model = tiny_model_dir(tmp_path / "models" / "llama-mini")
    built = spec.build({"model_path": str(model), "mode": "lora", "seq_len": 768, "global_batch": 8, "micro_batch": 1})
    assert (built.shape.n_layers, built.shape.n_kv_heads, built.shape.vocab_size) == (3, 2, 600)
    (tmp_path / "spec.json").write_text(built.to_json())
    model.rename(tmp_path / "models" / "moved")
    loaded = JobSpec.load(tmp_path / "spec.json")
    assert loaded == built and loaded.shape == built.shape and loaded.model_shape.name == "llama-mini"


def test_a_spec_json_of_the_previous_version_loads_without_reading_the_model(tmp_path):
    """No model_shape stored (written before it existed): the named size, and the model dir is not read."""
    old = json.loads(JobSpec(size="tiny").to_json())
    del old["model_shape"]
    old["model_path"] = str(tmp_path / "gone")  # no such directory any more
    loaded = spec.from_mapping(old)
    assert loaded.model_shape is None and loaded.shape == catalog.SIZES["tiny"]


def test_the_shape_is_read_not_given():
    with pytest.raises(SpecError, match="model_shape is not a setting"):
        spec.build({}, config={"model_shape": dataclasses.asdict(catalog.SIZES["7b"])})


def test_a_stored_shape_is_checked_like_any_field():
    stored = json.loads(JobSpec().to_json())
    stored["model_shape"] = {**dataclasses.asdict(catalog.SIZES["tiny"]), "dim": "64"}
    with pytest.raises(SpecError, match="model_shape.dim '64' is not a valid int"):
        spec.from_mapping(stored)
    stored["model_shape"] = {**dataclasses.asdict(catalog.SIZES["tiny"]), "n_heads": 3}
    with pytest.raises(SpecError, match="do not divide"):
        spec.from_mapping(stored)


# --- every rule the worker enforces ---


@pytest.mark.parametrize("values, message", [
    ({"mode": "lora", "merge": True, "strategy": "ds-zero3", "compile": True}, "--compile is implemented for fsdp"),
    ({"mode": "prompt", "merge": True}, "--merge folds LoRA adapters into the base; --mode prompt has none"),
    ({"strategy": "pp", "procs_per_node": 2}, "--strategy pp runs one process per node"),
])
def test_the_workers_rules_are_the_specs(values, message):
    with pytest.raises(SpecError, match=message):
        spec.build(values)


# --- hostile values ---


FLOAT_FIELDS = [name for name, field in spec.FIELDS.items() if str(field.type).startswith("float")]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_nan_and_infinity_are_refused_for_every_float(name, value):
    mode = {"mode": "lora"} if name in spec.LORA_FIELDS else {}
    with pytest.raises(SpecError, match=f"--{name.replace('_', '-')} .* is not a finite number") as e:
        spec.build({name: value, **mode})
    assert "\n" not in str(e.value)


def test_spec_json_never_holds_nan(tmp_path):
    text = JobSpec().to_json().replace('"lr": 2e-05', '"lr": NaN')
    with pytest.raises(SpecError, match="--lr nan is not a finite number"):
        JobSpec.from_json(text)
    with pytest.raises(SpecError, match="not valid JSON"):
        JobSpec.from_json("{garbage")
    (tmp_path / "spec.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(SpecError, match="not UTF-8"):
        JobSpec.load(tmp_path / "spec.json")


@pytest.mark.parametrize("values, message", [
    ({"partition": ["a", "b"]}, r"--partition \['a', 'b'\] is not a valid str"),
    ({"nodes": [1]}, r"--nodes \[1\] is not a valid int"),
    ({"nodes": True}, "--nodes True is not a valid int"),
    ({"nodes": 1e400}, "--nodes inf is not a valid int"),
    ({"lr": {"a": 1}}, "--lr {'a': 1} is not a valid float"),
    ({"exclusive": [True]}, r"--exclusive \[True\] is not a valid bool"),
    ({"lora_targets": [{"q": 1}]}, "--lora-targets .* is not a valid list of names"),
    ({"account": b"acct"}, "--account b'acct' is not a valid str"),
    ({"account": "a\tb"}, "--account 'a\\\\tb' contains a control character"),
    ({"constraint": "x\x1b[2J"}, "--constraint .* contains a control character"),
    ({"after": ["1\n2"]}, "--after '1\\\\n2' contains a control character"),
])
def test_wrong_types_and_control_characters_are_one_line(values, message):
    with pytest.raises(SpecError, match=message) as e:
        spec.build(values)
    assert "\n" not in str(e.value)


def test_eval_spec_values_are_checked_too():
    with pytest.raises(SpecError, match="--model .* contains a control character"):
        spec.build({"evaluation": {"model": "/m\n", "task": "medqa", "data": "/d"}})
    with pytest.raises(SpecError, match="--data \\['a'\\] is not a valid str"):
        spec.build({"evaluation": {"model": "/m", "task": "medqa", "data": ["a"]}})


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfe{}", "config.json is not UTF-8 text"),
    (b"[1, 2]", "config.json holds a list, not an object"),
    (b'{"model_type": "llama", "num_attention_heads": 4, "hidden_size": "64"}',
     "config.json's 'hidden_size' is '64'; expected a positive int"),
    (b'{"model_type": "llama", "num_attention_heads": 4, "hidden_size": 64}', "config.json has no 'num_hidden_layers'"),
    (b'{"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, '
     b'"intermediate_size": 172, "vocab_size": 512, "rms_norm_eps": NaN}', "'rms_norm_eps' is nan"),
    (b'{"model_type": ["llama"]}', "model_type is \\['llama'\\]; supported: llama, "),
])
def test_a_damaged_config_json_is_one_line(tmp_path, content, message):
    (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(SpecError, match=message) as e:
        spec.build({"model_path": str(tmp_path)})
    assert "\n" not in str(e.value) and str(e.value).startswith(f"--model-path {tmp_path}")


# --- every count and size has an upper bound, named with its range before any work ---

# Fields that are numbers but no count or size: rates and shares with rules of their own, and the seed.
NOT_COUNTS = {"lr", "warmup_ratio", "weight_decay", "grad_clip", "lora_dropout", "seed", "beta"}


def _numbers(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if str(f.type).split(" |")[0] in ("int", "float")}


def test_every_count_and_size_of_a_spec_has_an_upper_bound():
    assert _numbers(JobSpec) - NOT_COUNTS <= set(values.LIMITS)
    assert _numbers(spec.EvalSpec) <= set(values.LIMITS)


EVAL = {"model": "/models/x", "task": "medqa", "data": "/data/test.jsonl"}


@pytest.mark.parametrize("name", sorted((_numbers(JobSpec) | _numbers(spec.EvalSpec)) & set(values.LIMITS)))
def test_a_count_beyond_its_bound_is_refused_naming_the_value_and_the_range(name):
    low, high = values.LIMITS[name]
    too_large = high + 1 if isinstance(high, int) else high * 2
    with pytest.raises(SpecError) as refused:
        if name in spec.FIELDS:
            needs = {"lora_r": "lora", "lora_alpha": "lora", "num_virtual_tokens": catalog.PROMPT_MODES[0]}
            spec.build({"cluster": "slurm", "mode": needs.get(name, "full"), name: too_large})
        else:
            spec.EvalSpec(**EVAL, **{name: too_large})
    flag, text = f"--{name.replace('_', '-')}", str(refused.value)
    assert text in (f"{flag} {too_large} is too large; allowed: {low:,} to {high:,}",
                    f"{flag} {float(too_large)} is too large; allowed: {low:,} to {high:,}"), text


@pytest.mark.parametrize("args, message", [
    (["--time", "99999999999:00:00"], "--time 99999999999:00:00 is too long; allowed: up to 366-00:00:00 (527,040 minutes)"),
    (["--time", "400-00:00:00"], "--time 400-00:00:00 is too long; allowed: up to 366-00:00:00 (527,040 minutes)"),
    (["--nodes", "100000"], "--nodes 100000 is too large; allowed: 1 to 4,096"),
    (["--max-steps", "99999999999999"], "--max-steps 99999999999999 is too large; allowed: 1 to 1,000,000,000"),
    (["--keep-checkpoints", "1000000"], "--keep-checkpoints 1000000 is too large; allowed: 1 to 1,000"),
    (["--mem-per-node", "99999999T"], "--mem-per-node 99999999T is too large; allowed: 0 to 1,073,741,824 MB"),
    (["--tokens-per-epoch", "9000T"], "--tokens-per-epoch 9000T is too large; allowed: 1 to 1,000,000,000,000,000"),
])
def test_render_refuses_a_count_beyond_its_bound_in_one_line_and_writes_nothing(cli, tmp_path, args, message):
    code, stdout, stderr = cli("render", "--cluster", "slurm", "--out", str(tmp_path / "out"), *args)
    assert (code, stderr) == (2, f"Error: {message}\n")
    assert not (tmp_path / "out").exists()


def test_a_run_yaml_value_beyond_its_bound_is_refused_as_a_flag_is(cli, tmp_path):
    (tmp_path / "run.yaml").write_text("global_batch: 10000000\n")
    code, _, stderr = cli("render", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"))
    assert code == 2 and "--global-batch 10000000 is too large; allowed: 1 to 1,048,576" in stderr, stderr


@pytest.mark.parametrize("args, says", [
    (["estimate", "hours", "--size", "7b", "--nodes", "99999"], "--nodes 99999 is too large; allowed: 1 to 4,096"),
    (["estimate", "hours", "--size", "7b", "--tokens", "99999999999999999999"],
     "--tokens 99999999999999999999 is too large; allowed: 1 to 1,000,000,000,000,000"),
    (["estimate", "memory", "--size", "7b", "--gpu-mem-gib", "1e300"], "1e+300 is not in the range 0<x<=1000000"),
    (["estimate", "hours", "--size", "7b", "--seq-len", "99999999"], "--seq-len 99999999 is too large"),
    (["logs", "1", "--rank", "99999999"], "99999999 is not in the range 0<=x<=1048575"),
])
def test_estimate_and_logs_refuse_a_count_beyond_its_bound(cli, args, says):
    code, _, stderr = cli(*args)
    assert code == 2 and says in stderr and stderr.count("\n") == 1, stderr
