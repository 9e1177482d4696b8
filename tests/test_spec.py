import json

import pytest

from llamajobs import spec
from llamajobs.errors import SpecError
from llamajobs.spec import JobSpec


def test_defaults_live_in_the_jobspec():
    s = JobSpec()
    assert (s.seq_len, s.global_batch, s.micro_batch, s.lr, s.warmup_ratio) == (512, 128, 4, 2e-5, 0.03)
    assert (s.lora_r, s.lora_alpha, s.lora_dropout, s.lora_targets) == (8, 32, 0.1, ("q_proj", "v_proj"))
    assert (s.keep_checkpoints, s.max_requeues, s.checkpoint_every_minutes) == (2, 20, 60.0)


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
    with pytest.raises(SpecError, match="model_type is 'gpt2'; expected 'llama'"):
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
