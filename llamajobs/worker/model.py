"""The model: a LLaMA-architecture decoder of any family in catalog.FAMILIES (transformers) built on the meta device, LoRA and the prompt-learning
modes (prefix, p-tuning, prompt tuning) via peft, weights read once per job on rank 0 and broadcast
into every rank's shards; where the starting weights come from (--model-path, --init-from, or a
seeded random init); and the HF-format export of final/.

Why meta + broadcast: eight ranks each loading a 7B checkpoint need eight copies of it in host RAM.
Here every rank builds a weightless model, shards it, allocates only its shards, and rank 0 alone
reads (or randomly initialises) the full weights, which set_model_state_dict broadcasts and slices.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from huggingface_hub import save_torch_state_dict
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from llamajobs import catalog

from llamajobs.spec import JobSpec
from llamajobs.worker import kernels

# In final/: what the export was trained from, so that --init-from can check it continues on the same base.
PROVENANCE = "llamajobs.json"


# --- where the starting weights come from ---


def init_kind(path: str | Path) -> str:
    """What an --init-from directory holds: "adapter" (a LoRA run's final/) or "full" (an HF model)."""
    path = Path(path)
    if (path / "adapter_config.json").is_file():
        return "adapter"
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return "full"
    raise ValueError(
        f"--init-from {path}: neither a LoRA adapter (adapter_config.json) nor a full HF model (config.json "
        f"and *.safetensors); pass a run's final/ (or final/merged)")


def weights_path(spec: JobSpec) -> str | None:
    """The HF directory the starting weights and config come from: --init-from when it holds a full
    model (then exactly like --model-path), else --model-path; None means the seeded random init."""
    if spec.init_from and init_kind(spec.init_from) == "full":
        return spec.init_from
    return spec.model_path


def check_init_from(spec: JobSpec) -> None:
    """Refuse, naming the flag to change, an --init-from that cannot continue under this spec."""
    if not spec.init_from:
        return
    path = Path(spec.init_from)
    if init_kind(path) == "full":
        if spec.model_path:
            raise ValueError(f"--init-from {path} holds a full model, which replaces --model-path; "
                             f"leave --model-path out")
        return
    adapter = json.loads((path / "adapter_config.json").read_text())
    if adapter.get("peft_type", "LORA") != "LORA":
        # A prompt-learning adapter holds the virtual tokens' embeddings, not the encoder that made them.
        raise ValueError(f"--init-from {path} holds a {adapter['peft_type']} adapter, which training cannot continue; "
                         f"start from its base (--model-path) instead")
    if not spec.mode_info.adapters:
        raise ValueError(f"--init-from {path} holds a LoRA adapter: continue it with --mode lora, or start "
                         f"--mode {spec.mode} from its merged model (--init-from {path / 'merged'}, written by "
                         f"--merge)")
    saved = (adapter["r"], adapter["lora_alpha"], sorted(adapter["target_modules"]))
    if saved != (spec.lora_r, spec.lora_alpha, sorted(spec.lora_targets)):
        raise ValueError(f"--init-from {path}: its adapter has r {saved[0]}, alpha {saved[1]}, targets "
                         f"{','.join(saved[2])}; pass --lora-r {saved[0]} --lora-alpha {saved[1]} "
                         f"--lora-targets {','.join(saved[2])}")
    provenance = path / PROVENANCE
    if provenance.is_file():
        base = json.loads(provenance.read_text())
        # A random base is a function of (size, seed): the adapter only fits the same one.
        same_random_base = (spec.model_path, spec.size, spec.seed) == (None, base["size"], base["seed"])
        if base["base_weights"] is None and not same_random_base:
            raise ValueError(f"--init-from {path}: its adapter was trained on the random init of --size "
                             f"{base['size']} --seed {base['seed']} (no --model-path); pass the same --size and --seed")


# transformers' own SDPA attention under a name of ours. transformers builds no mask for an attention
# it has no mask function for, and so skips its check for packed sequences in every forward, a
# Python `if` on a GPU tensor that makes the host wait for the GPU (bench/worker_step.py found it).
# The worker never passes a mask, so the mask is plain causal, which SDPA's is_causal gives exactly.
# Not under prefix tuning: its prefix makes the keys longer than the queries, and is_causal would
# align them wrongly. (Not saved in config.json: final/ loads with the default attention.)
CAUSAL_SDPA = "llamajobs_causal_sdpa"


def attention_for(spec: JobSpec) -> str:
    if spec.mode_info.layer_prefix:
        return "sdpa"
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    AttentionInterface.register(CAUSAL_SDPA, sdpa_attention_forward)
    return CAUSAL_SDPA


def model_config(spec: JobSpec) -> PretrainedConfig:
    """The checkpoint's own config (rope scaling and all), or the catalog shape for a random init,
    with the fused SDPA attention kernels (flash / memory-efficient) named, not left to a default."""
    path = weights_path(spec)
    if path:
        config = AutoConfig.from_pretrained(path, attn_implementation=attention_for(spec))
    else:
        values = spec.shape.hf_config()
        config = AutoConfig.for_model(values.pop("model_type"), **values, attn_implementation=attention_for(spec))
    config.use_cache = False  # training needs no KV cache (and activation checkpointing refuses one)
    return config


def weights_dtype(spec: JobSpec, device: torch.device) -> torch.dtype:
    """fp32 master weights for whatever is trained; a frozen base (LoRA, prompt learning) on GPU is
    bf16 (never updated, half the memory). The adapters themselves stay fp32 (peft upcasts them)."""
    return torch.bfloat16 if spec.mode_info.frozen_base and device.type == "cuda" else torch.float32


def peft_config(spec: JobSpec):
    """The peft config of a LoRA or prompt-learning mode (prompt learning: --num-virtual-tokens)."""
    # Imported here: peft takes over a second to import, and full fine-tunes never need it.
    import peft

    if spec.mode_info.adapters:
        return peft.LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                               target_modules=list(spec.lora_targets), task_type="CAUSAL_LM")
    tokens = {"task_type": "CAUSAL_LM", "num_virtual_tokens": spec.num_virtual_tokens}
    if spec.mode_info.layer_prefix:  # trained keys and values in front of every layer's attention
        return peft.PrefixTuningConfig(**tokens)
    if spec.mode == "ptuning":  # virtual token embeddings produced by a small trained MLP
        return peft.PromptEncoderConfig(**tokens)
    return peft.PromptTuningConfig(**tokens, prompt_tuning_init=peft.PromptTuningInit.RANDOM)  # trained embeddings


def family(config: PretrainedConfig) -> catalog.Family:
    return catalog.family_of(config.model_type)


def causal_lm_class(config: PretrainedConfig) -> type[nn.Module]:
    """The family's CausalLM class; the first call imports its modeling module."""
    return getattr(transformers, family(config).architecture)


def causal_lm(config: PretrainedConfig) -> nn.Module:
    """The family's CausalLM built from a config, randomly initialised (or weightless, on the meta device):
    the class itself, not AutoModelForCausalLM.from_config, which brings in its own DeepSpeed init."""
    return causal_lm_class(config)(config)


def _apply_peft(model: nn.Module, spec: JobSpec) -> nn.Module:
    from peft import get_peft_model

    with warnings.catch_warnings():
        # peft still asks transformers' deprecated is_gradient_checkpointing; nothing for us to change.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config(spec))  # freezes the base: only the adapter requires grad


def build_structure(spec: JobSpec, config: PretrainedConfig, dtype: torch.dtype, chosen: kernels.Kernels) -> nn.Module:
    """The model (peft-wrapped unless --mode full) wherever the caller's context builds it: on the
    meta device (build_meta_model) or inside DeepSpeed's zero.Init. `chosen`: the kernels train()
    decided for this process's device (kernels.choose), the same decision its announcement prints."""
    model = causal_lm(config)
    if next(model.parameters()).dtype != dtype:  # (zero.Init builds in its own dtype already)
        model = model.to(dtype)
    # The loss forward, and Liger's kernels or FP8's linears where chosen: before peft wraps the model.
    kernels.apply(model, chosen)
    if spec.activation_checkpointing:
        # HF's per-decoder-layer checkpointing (non-reentrant) keeps parameter names unchanged,
        # unlike torch's checkpoint_wrapper, so state dicts stay in HF format.
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable:
            enable({"use_reentrant": False})
        else:  # transformers releases before the rename
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if spec.mode_info.frozen_base:
        model = _apply_peft(model, spec)
    return model


def build_meta_model(spec: JobSpec, config: PretrainedConfig, dtype: torch.dtype, chosen: kernels.Kernels
                     ) -> nn.Module:
    """The model's structure on the meta device (no memory); same on every rank."""
    with torch.device("meta"):
        return build_structure(spec, config, dtype, chosen)


def materialize(model: nn.Module, init_device: torch.device, buffer_device: torch.device,
                placement: dict[nn.Module, torch.device] | None = None) -> None:
    """Allocate the (sharded) parameters on init_device, uninitialised, and recompute the rotary
    embedding's buffers on buffer_device: they are not in the state dict (non-persistent), so the
    weight load cannot fill them. With CPU offload the parameters live on the CPU, the buffers not.
    `placement` puts some modules (and what they contain) on other devices (pp's layer split)."""
    if placement is None:
        model.to_empty(device=init_device)
    else:
        def place(module: nn.Module, device: torch.device) -> None:
            device = placement.get(module, device)
            module.to_empty(device=device, recurse=False)
            for child in module.children():
                place(child, device)
        place(model, init_device)
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            with torch.device(buffer_device):
                fresh = type(module)(module.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(module, name, buffer)
    _real_prompt_tokens(model)


def _real_prompt_tokens(model: nn.Module) -> None:
    """peft's prompt learning indexes its encoder with prompt_tokens, a plain tensor attribute (no
    buffer: to_empty leaves it on the meta device). It is arange(number of virtual tokens)."""
    for name, tokens in getattr(model, "prompt_tokens", {}).items():
        if tokens.is_meta:
            model.prompt_tokens[name] = torch.arange(tokens.numel(), dtype=torch.long)


def _load_adapter(model: nn.Module, path: str) -> None:
    """An earlier LoRA run's adapter weights into this (CPU, unsharded) LoRA model."""
    from peft import load_peft_weights, set_peft_model_state_dict

    result = set_peft_model_state_dict(model, load_peft_weights(path, device="cpu"))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        raise ValueError(f"--init-from {path}: its adapter does not fit this model (unexpected: "
                         f"{result.unexpected_keys[:3]}, missing: {missing[:3]}); pass the same --model-path "
                         f"or --size as the run that trained it")


def _full_state_dict_rank0(spec: JobSpec, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """The full weights in host RAM, read or initialised once per job (rank 0 only).

    A random init is seeded with --seed (the same weights whatever the world size, and the same base
    for a LoRA run that continues another's adapter). Under a peft mode the adapter's initial values
    come from here too. The generator is forked so that rank 0's own
    random streams (dropout) do not depend on how many numbers the init drew.
    """
    with torch.random.fork_rng(devices=[]):
        path = weights_path(spec)
        if path:
            model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype="auto")
        else:
            torch.manual_seed(spec.seed)
            model = causal_lm(config)
        if spec.mode_info.frozen_base:
            torch.manual_seed(spec.seed)
            model = _apply_peft(model, spec)  # the adapters' initial values come from rank 0 too
            if spec.init_from and spec.mode_info.adapters:  # (check_init_from: an adapter for this base)
                _load_adapter(model, spec.init_from)
    return _without_aliases(model)


def _without_aliases(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without peft's alias: prompt learning registers the input embedding a second time
    (as word_embeddings), which is dropped; the base model's own names are kept, a tied output head's
    (Qwen2.5's small models, Llama 3.2) included, as the sharded model's state dict names it."""
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)} | {
        name for name, _ in model.named_buffers()}
    if hasattr(model, "prompt_encoder"):
        names = {name for name in names if not name.startswith("word_embeddings.")}
    return {name: tensor for name, tensor in model.state_dict().items() if name in names}


def load_weights(model: nn.Module, spec: JobSpec, config: PretrainedConfig, rank: int) -> None:
    """Fill every rank's shards with the same weights: rank 0's, broadcast (others pass {})."""
    state = _full_state_dict_rank0(spec, config) if rank == 0 else {}
    # Not strict under prompt learning: the model's state dict also names the embedding by its alias
    # (see _without_aliases), which the weights fill through its first name.
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=not spec.mode_info.virtual_tokens)
    set_model_state_dict(model, state, options=options)


def check_vocab(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    if config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the model's vocabulary ({config.vocab_size} tokens) is smaller than the tokenizer's "
            f"({len(tokenizer)}); use the tokenizer that belongs to --model-path, or a --size whose "
            f"vocabulary holds it")


# --- final/ ---


Gather = Callable[..., dict[str, torch.Tensor]]  # gather(trainable_only=...): rank 0's full CPU tensors


def export_final(model: nn.Module, spec: JobSpec, config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase,
                 run_dir: Path, rank: int, dtype: torch.dtype, step: int, *, gather: Gather) -> Path:
    """Write run_dir/final in HF format (full: safetensors + config; LoRA and prompt learning: the
    peft adapter, and with --merge the merged full model in final/merged), plus the tokenizer and
    llamajobs.json (what it was trained from). Collective: every rank calls it. Written to
    final.tmp, then renamed. `model` is the Hugging Face (or peft) module; `gather` is the
    strategy's way to collect its full tensors on rank 0 (Strategy.gather)."""
    final, tmp = run_dir / "final", run_dir / "final.tmp"
    adapter = None
    if spec.mode_info.frozen_base:
        # Only the adapters: gathering the frozen base would move the whole model to rank 0 for nothing...
        adapter = gather(trainable_only=True)
    if not spec.mode_info.frozen_base or spec.merge:  # ...unless the merged model needs it
        state = gather(trainable_only=False)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if spec.mode_info.virtual_tokens:
            _prompt_adapter_model(adapter, spec, config).save_pretrained(tmp, state_dict=adapter)
        elif adapter is not None:
            model.save_pretrained(tmp, state_dict=adapter)  # PeftModel: adapter_config.json + adapter_model.safetensors
            if spec.merge:
                _write_hf_model(tmp / "merged", _merged_state_dict(state, spec, config), config, dtype)
                _write_tokenizer(tmp / "merged", tokenizer)
        else:
            _write_hf_model(tmp, state, config, dtype)
        _write_tokenizer(tmp, tokenizer)
        provenance = {"mode": spec.mode, "size": spec.size, "seed": spec.seed, "base_weights": weights_path(spec),
                      "init_from": spec.init_from, "step": step}
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # a previous attempt's; os.replace cannot replace a full dir
        os.replace(tmp, final)
    dist.barrier()
    return final


def _merged_state_dict(state: dict[str, torch.Tensor], spec: JobSpec, config: PretrainedConfig) -> dict[str, torch.Tensor]:
    """The LoRA model's full gathered weights with the adapters folded into the base (peft's
    merge_and_unload), as a plain CausalLM state dict. Built on the meta device and filled
    by assignment: no second copy, no random init of a model that is overwritten anyway."""
    with torch.device("meta"):
        peft_model = _apply_peft(causal_lm(copy.deepcopy(config)), spec)
    peft_model.load_state_dict(state, assign=True, strict=True)
    return peft_model.merge_and_unload().state_dict()


def _prompt_adapter_model(adapter: dict[str, torch.Tensor], spec: JobSpec, config: PretrainedConfig) -> nn.Module:
    """A prompt-learning model whose base stays on the meta device and whose prompt encoder holds the
    gathered trained weights, on the CPU: what peft's save_pretrained needs, since it saves the
    encoder's output (the virtual tokens' embeddings; for p-tuning, its MLP applied), not its weights."""
    with torch.device("meta"):
        peft_model = _apply_peft(causal_lm(copy.deepcopy(config)), spec)
    result = peft_model.load_state_dict(adapter, assign=True, strict=False)
    if result.unexpected_keys:
        raise RuntimeError(f"the trained prompt encoder does not fit peft's: {result.unexpected_keys[:3]}")
    _real_prompt_tokens(peft_model)
    return peft_model


def _write_hf_model(folder: Path, state: dict[str, torch.Tensor], config: PretrainedConfig, dtype: torch.dtype) -> None:
    """What AutoModelForCausalLM.from_pretrained loads: sharded safetensors (+ index), config, generation config."""
    folder.mkdir(exist_ok=True)
    save_torch_state_dict({k: v.to(dtype) for k, v in state.items()}, folder)
    config = copy.deepcopy(config)
    config.use_cache = True  # for generation; training turned it off
    config.dtype = dtype
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)


def _write_tokenizer(folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    tokenizer.save_pretrained(folder)
    # The sentencepiece model too, when there is one: tools such as llama.cpp's converter read it.
    spm_model = getattr(tokenizer, "vocab_file", None)
    if spm_model and Path(spm_model).is_file() and not (folder / "tokenizer.model").exists():
        shutil.copyfile(spm_model, folder / "tokenizer.model")
