"""Every family in catalog.FAMILIES (llama with Llama 3.1's rope scaling, mistral, qwen2, qwen3): a tiny
random model of each with its own byte-level BPE fast tokenizer (tests/families.py), its shape as the
estimator reads it, then real training: two torchrun launches of this file (see the bottom) train each
family full and with LoRA (and the prompt modes on two of them) under fsdp, fsdp-offload, ds-zero2,
ds-zero3 and pp, each run's final/ reloaded by transformers (and peft) with the logits the worker's
own model gave at the end; then eval and generate on each family's exports through the CLI.

Wall time on 2 busy cores (shared with other work): the four models 6-14 s, the two launches 95-130 s
(DeepSpeed's ops cached), the assertions a few seconds: about 3 minutes for the module. These runs go
through the worker's train() under torchrun, as `python -m llamajobs.worker` does on a node; the
local cluster's submit path (submitit, launch.sh) is exercised by tests/test_hub.py's run.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import sys
from pathlib import Path

import pytest
import torch

from llamajobs import catalog, spec as spec_mod
from llamajobs.errors import SpecError
from llamajobs.spec import JobSpec
from tests.conftest import assert_exit_0, metrics_rows, torchrun
from tests.families import make_model_dir

FAMILIES = tuple(catalog.FAMILIES)
PROBE = "probe_logits.pt"  # the worker's own logits of probe_ids() at the end of training (rank 0)
SMALL = {"cluster": "local", "device": "cpu", "seq_len": 32, "global_batch": 4, "micro_batch": 2, "max_steps": 3,
         "lr": 1e-3, "warmup_ratio": 0.0}
# (family, mode, strategy): every family full and LoRA, every strategy at least once, the prompt modes twice.
# qwen2's first model in the launch is built inside DeepSpeed's zero.Init, and the next one outside it: with
# transformers 5.25 that failed ("no attribute '_kernel_funcs'") until the worker imported the class first.
RUNS = [
    ("llama", "full", "fsdp"), ("llama", "lora", "ds-zero3"), ("llama", "prefix", "fsdp"),
    ("mistral", "full", "ds-zero2"), ("mistral", "lora", "fsdp"),
    ("qwen2", "full", "ds-zero3"), ("qwen2", "lora", "fsdp-offload"),
    ("qwen3", "full", "fsdp"), ("qwen3", "lora", "ds-zero2"), ("qwen3", "ptuning", "fsdp"),
]
PP_RUNS = [("qwen2", "lora", "pp"), ("mistral", "full", "pp"), ("qwen3", "prompt", "pp")]


def probe_ids(vocab_size: int) -> torch.Tensor:
    return (torch.arange(24) * 7 + 3).remainder(vocab_size).unsqueeze(0)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: make_model_dir(family, root / family) for family in FAMILIES}


# --- the catalog's facts ---


def test_the_shape_counts_each_family_s_parameters_as_transformers_builds_them(model_dirs) -> None:
    from transformers import AutoModelForCausalLM

    for family, path in model_dirs.items():
        shape = catalog.shape_for("", str(path))
        model = AutoModelForCausalLM.from_pretrained(path)
        assert shape.family == family and shape.n_kv_heads == 2
        assert shape.params == sum(p.numel() for p in model.parameters()), family
        config = model.config
        assert shape.head_dim == (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    qwen2, qwen3 = catalog.shape_for("", str(model_dirs["qwen2"])), catalog.shape_for("", str(model_dirs["qwen3"]))
    assert qwen2.qkv_bias and qwen2.tie_embeddings and not qwen2.qk_norm
    assert qwen3.qk_norm and qwen3.head_dim == 32 != qwen3.dim // qwen3.n_heads
    assert catalog.shape_for("", str(model_dirs["llama"])).rope_theta == 500000.0  # read from rope_parameters


def test_hub_style_config_keys_are_read_too() -> None:
    """Configs on the Hub (written by transformers 4) keep rope_theta at the top and name attention_bias."""
    config = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100, "rope_theta": 500000.0,
              "attention_bias": True, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    shape = catalog.shape_from_hf_config(config, "x")
    assert shape.rope_theta == 500000.0 and shape.qkv_bias and shape.o_bias
    mistral = catalog.shape_from_hf_config({**config, "model_type": "mistral"}, "m")
    assert not mistral.qkv_bias  # Mistral's attention has no biases whatever the key says


def test_each_family_s_decoder_layers_are_what_fsdp_and_pp_split(model_dirs) -> None:
    from llamajobs.worker import kernels
    from llamajobs.worker import model as model_lib
    from llamajobs.worker import parallel

    for family, path in model_dirs.items():
        spec = spec_mod.build({"model_path": str(path), "mode": "lora", **SMALL})
        assert spec.lora_targets == catalog.FAMILIES[family].lora_targets
        model = model_lib.build_meta_model(spec, model_lib.model_config(spec), torch.float32,
                                           kernels.choose(spec, "cpu"))
        layers = parallel.decoder_layers(model)
        assert [type(m).__name__ for m in layers] == [catalog.FAMILIES[family].decoder_layer] * 2
        placement = parallel.split_layers(model, [torch.device("cpu"), torch.device("meta")])
        assert [device.type for _, device in placement] == ["cpu", "meta", "meta", "meta"]  # 2 layers, norm, head


def test_an_unsupported_model_type_is_refused_at_submit_naming_the_supported_ones(cli, tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2", "hidden_size": 64}))
    code, _, err = cli("submit", "--cluster", "local", "--model-path", str(tmp_path), "--dry-run")
    assert code == 2
    assert "model_type is 'gemma2'; supported: llama, mistral, qwen2, qwen3" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SpecError, match="model_shape.family 'gemma2'; supported"):
        JobSpec.from_json(json.dumps({"model_shape": dataclasses.asdict(catalog.SIZES["tiny"]) | {"family": "gemma2"}}))


def test_data_prepare_tokenizes_with_each_family_s_fast_tokenizer_and_the_store_check_tells_them_apart(
        model_dirs, tmp_path) -> None:
    from llamajobs.data.prepare import PrepareConfig, prepare
    from llamajobs.data.store import TokenStore, check_store
    from llamajobs.data.tokenizer import load_tokenizer

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("Atrial fibrillation.", "<|im_start|>x")))
    stores = {}
    for family in ("llama", "qwen3"):
        out = tmp_path / family
        prepare(PrepareConfig(inputs=(corpus,), tokenizer=model_dirs[family], out=out))
        store, tokenizer = TokenStore(out), load_tokenizer(model_dirs[family])
        first = [int(i) for i in store[0]]
        # Documents framed as the worker frames them: BOS (Qwen: its EOS, having no BOS), the text, EOS.
        start = tokenizer.bos_token_id if family == "llama" else tokenizer.eos_token_id
        assert first == [start, *tokenizer("Atrial fibrillation.", add_special_tokens=False)["input_ids"],
                         tokenizer.eos_token_id]
        assert tokenizer.convert_tokens_to_ids("<|im_start|>") not in [int(i) for i in store[1]]  # text stays text
        check_store(store, tokenizer)
        stores[family] = store
    with pytest.raises(SpecError, match="was tokenized with tokenizer"):
        check_store(stores["llama"], load_tokenizer(model_dirs["qwen3"]))


# --- training every family, full and LoRA, under every strategy ---


def _run_dir(root: Path, model_dirs: dict[str, Path], family: str, mode: str, strategy: str) -> Path:
    run_dir = root / f"{family}-{mode}-{strategy}"
    run_dir.mkdir()
    flags = {"model_path": str(model_dirs[family]), "mode": mode, "strategy": strategy, **SMALL,
             "procs_per_node": 1 if strategy == "pp" else 2}
    if mode == "lora":
        flags["lora_dropout"] = 0.0
    if mode in catalog.PROMPT_MODES:
        flags["num_virtual_tokens"] = 4
    (run_dir / "spec.json").write_text(spec_mod.build(flags).to_json())
    return run_dir


@pytest.fixture(scope="module")
def trained(model_dirs, tmp_path_factory) -> dict[tuple[str, str, str], Path]:
    """Every run of RUNS in one 2-process launch, PP_RUNS in one 1-process launch."""
    from tests.test_deepspeed import extensions_env

    root = tmp_path_factory.mktemp("family-runs")
    runs = {key: _run_dir(root, model_dirs, *key) for key in RUNS + PP_RUNS}
    for keys, nproc in ((RUNS, 2), (PP_RUNS, 1)):
        result = torchrun(str(Path(__file__)), *(str(runs[k]) for k in keys), nproc=nproc, env=extensions_env(),
                          timeout=600)
        assert_exit_0(result)
    return runs


def _reload(run_dir: Path, model_dir: Path):
    """final/ as a user loads it: transformers for a full model, its base plus peft for an adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = run_dir / "final"
    if (final / "adapter_config.json").is_file():
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), final).eval()
    return AutoModelForCausalLM.from_pretrained(final).eval()


@pytest.mark.slow
@pytest.mark.parametrize("key", RUNS + PP_RUNS, ids=lambda k: "-".join(k))
def test_each_family_trains_exports_and_reloads_with_the_worker_s_logits(trained, model_dirs, key) -> None:
    family, mode, strategy = key
    run_dir = trained[key]
    rows = metrics_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in rows)
    model = _reload(run_dir, model_dirs[family])
    assert model.config.model_type == family
    worker_logits = torch.load(run_dir / PROBE)
    with torch.no_grad():
        logits = model(input_ids=probe_ids(model.config.vocab_size)).logits
    # (peft's prompt tuning and p-tuning may return logits for the virtual tokens too: the text's are the last.)
    n = probe_ids(model.config.vocab_size).shape[1]
    torch.testing.assert_close(logits[:, -n:], worker_logits[:, -n:], rtol=1e-4, atol=1e-4)
    if mode != "full":  # trained away from the base: the adapter changes the logits
        from transformers import AutoModelForCausalLM

        with torch.no_grad():
            base = AutoModelForCausalLM.from_pretrained(model_dirs[family]).eval()(
                input_ids=probe_ids(model.config.vocab_size)).logits
        assert not torch.allclose(base, logits[:, -n:], atol=1e-5)
    chat = (run_dir / "final" / "chat_template.jinja")
    assert chat.is_file(), "the family's chat template travels with the export"


def _write_medqa(path: Path, n: int) -> Path:
    cues = ["north", "south", "east", "west"]
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"sent1": f"Which option points {cues[i % 4]}?", "sent2": "",
                                **{f"ending{k}": f"the {cues[k]} road" for k in range(4)}, "label": i % 4}) + "\n")
    return path


EXPORTS = [key for key in RUNS if key[1] in ("full", "lora")]


@pytest.mark.slow
@pytest.mark.parametrize("key", EXPORTS, ids=lambda k: "-".join(k))
def test_eval_and_generate_take_each_family_s_export(cli, trained, model_dirs, key, tmp_path) -> None:
    from llamajobs import evaluate as ev

    family, mode, _ = key
    final = trained[key] / "final"
    where = ["--model", str(model_dirs[family]), "--adapter", str(final)] if mode == "lora" else ["--model", str(final)]
    code, stdout, stderr = cli("eval", *where, "--task", "medqa", "--data", str(_write_medqa(tmp_path / "q.jsonl", 8)),
                               "--json")
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["n"] == 8 and sum(result["choices"].values()) == 8
    prompt = "Background: the patient"
    code, stdout, stderr = cli("generate", *where, "--prompt", prompt, "--max-new-tokens", "6", "--device", "cpu")
    assert code == 0, stderr
    # The same greedy continuation as transformers (and peft) give on the reloaded export.
    model, tokenizer = _reload(trained[key], model_dirs[family]), ev.TextEncoder(final)
    ids = torch.tensor([ev.encode(tokenizer, prompt)[0]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_id)
    new = out[0, ids.shape[1]:].tolist()
    expected = tokenizer.decode(new[: new.index(tokenizer.eos_id)] if tokenizer.eos_id in new else new)
    assert stdout.rstrip("\n") == expected


if __name__ == "__main__":
    # `torchrun --nproc-per-node N tests/test_families.py RUN_DIR...`: each run dir trained in turn in this
    # process group, as `python -m llamajobs.worker RUN_DIR` would; at the export, rank 0 also saves the
    # logits of the worker's own (sharded, wrapped) model on probe_ids() for the reload check.
    from llamajobs.worker import model as model_lib
    from llamajobs.worker import parallel
    from llamajobs.worker.train import train

    export_final = model_lib.export_final

    def export_and_probe(model, spec, config, tokenizer, run_dir, rank, dtype, step, *, gather):
        final = export_final(model, spec, config, tokenizer, run_dir, rank, dtype, step, gather=gather)
        model.eval()  # (LoRA's dropout is 0 here; peft's prompt encoders have their own)
        device = next(p.device for p in model.parameters() if p.device.type != "meta")
        with torch.no_grad():
            logits = model(input_ids=probe_ids(config.vocab_size).to(device)).logits.float().cpu()
        if rank == 0:
            torch.save(logits, run_dir / PROBE)
        return final

    model_lib.export_final = export_and_probe
    run_dirs = [Path(arg).resolve() for arg in sys.argv[1:]]
    env = parallel.init_distributed(JobSpec.load(run_dirs[0] / "spec.json"))
    try:
        for run_dir in run_dirs:
            train(run_dir, JobSpec.load(run_dir / "spec.json"), env)
            gc.collect()
    finally:
        parallel.teardown()
