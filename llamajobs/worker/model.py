"""The model: a LLaMA decoder (transformers) built on the meta device, LoRA via peft, weights read
once per job on rank 0 and broadcast into every rank's shards; and the HF-format export of final/.

Why meta + broadcast: eight ranks each loading a 7B checkpoint need eight copies of it in host RAM.
Here every rank builds a weightless model, shards it, allocates only its shards, and rank 0 alone
reads (or randomly initialises) the full weights, which set_model_state_dict broadcasts and slices.
"""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from huggingface_hub import save_torch_state_dict
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from llamajobs.spec import JobSpec

SUPPORTED_MODES = ("full", "lora")


def check_mode(spec: JobSpec) -> None:
    if spec.mode not in SUPPORTED_MODES:
        raise NotImplementedError(
            f"--mode {spec.mode} is not implemented yet in the worker; use one of {', '.join(SUPPORTED_MODES)}")


def model_config(spec: JobSpec) -> LlamaConfig:
    """The checkpoint's own config (rope scaling and all), or the catalog shape for a random init."""
    if spec.model_path:
        config = LlamaConfig.from_pretrained(spec.model_path)
    else:
        config = LlamaConfig(**spec.shape.hf_config())
    config.use_cache = False  # training needs no KV cache (and activation checkpointing refuses one)
    return config


def weights_dtype(spec: JobSpec, device: torch.device) -> torch.dtype:
    """fp32 master weights for whatever is trained; a frozen LoRA base on GPU is bf16 (never updated,
    half the memory). The LoRA adapters themselves stay fp32 (peft upcasts them)."""
    return torch.bfloat16 if spec.mode == "lora" and device.type == "cuda" else torch.float32


def _apply_lora(model: LlamaForCausalLM, spec: JobSpec) -> PeftModel:
    config = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
                        target_modules=list(spec.lora_targets), task_type="CAUSAL_LM")
    with warnings.catch_warnings():
        # peft still asks transformers' deprecated is_gradient_checkpointing; nothing for us to change.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)  # freezes the base: only the adapters require grad


def build_meta_model(spec: JobSpec, config: LlamaConfig, dtype: torch.dtype) -> nn.Module:
    """The model's structure on the meta device (no memory); same on every rank."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
        if spec.activation_checkpointing:
            # HF's per-decoder-layer checkpointing (non-reentrant) keeps parameter names unchanged,
            # unlike torch's checkpoint_wrapper, so state dicts stay in HF format.
            enable = getattr(model, "activation_checkpointing_enable", None)
            if enable:
                enable({"use_reentrant": False})
            else:  # transformers releases before the rename
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec.mode == "lora":
            model = _apply_lora(model, spec)
    return model


def materialize(model: nn.Module, init_device: torch.device, buffer_device: torch.device) -> None:
    """Allocate the (sharded) parameters on init_device, uninitialised, and recompute the rotary
    embedding's buffers on buffer_device: they are not in the state dict (non-persistent), so the
    weight load cannot fill them. With CPU offload the parameters live on the CPU, the buffers not."""
    model.to_empty(device=init_device)
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            with torch.device(buffer_device):
                fresh = type(module)(module.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(module, name, buffer)


def _full_state_dict_rank0(spec: JobSpec, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """The full weights in host RAM, read or initialised once per job (rank 0 only)."""
    if spec.model_path:
        model = LlamaForCausalLM.from_pretrained(spec.model_path, config=config, dtype="auto")
    else:
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    if spec.mode == "lora":
        torch.manual_seed(spec.seed)
        model = _apply_lora(model, spec)  # the adapters' initial values come from rank 0 too
    return model.state_dict()


def load_weights(model: nn.Module, spec: JobSpec, config: LlamaConfig, rank: int) -> None:
    """Fill every rank's shards with the same weights: rank 0's, broadcast (others pass {})."""
    state = _full_state_dict_rank0(spec, config) if rank == 0 else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def check_vocab(config: LlamaConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    if config.vocab_size < len(tokenizer):
        raise ValueError(
            f"the model's vocabulary ({config.vocab_size} tokens) is smaller than the tokenizer's "
            f"({len(tokenizer)}); use the tokenizer that belongs to --model-path, or a --size whose "
            f"vocabulary holds it")


# --- final/ ---


def export_final(model: nn.Module, spec: JobSpec, config: LlamaConfig, tokenizer: PreTrainedTokenizerBase,
                 run_dir: Path, rank: int, dtype: torch.dtype) -> Path:
    """Write run_dir/final in HF format (full: safetensors + config; LoRA: the peft adapter), plus the
    tokenizer. Collective: every rank calls it. Written to final.tmp, then renamed."""
    final, tmp = run_dir / "final", run_dir / "final.tmp"
    if spec.mode == "lora":
        # Only the adapters: gathering the frozen base would move the whole model to rank 0 for nothing.
        state = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
                 for name, p in model.named_parameters() if p.requires_grad}
    else:
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if spec.mode == "lora":
            model.save_pretrained(tmp, state_dict=state)  # PeftModel: adapter_config.json + adapter_model.safetensors
        else:
            save_torch_state_dict({k: v.to(dtype) for k, v in state.items()}, tmp)  # sharded safetensors (+ index)
            config = copy.deepcopy(config)
            config.use_cache = True  # for generation; training turned it off
            config.dtype = dtype
            config.save_pretrained(tmp)
            GenerationConfig.from_model_config(config).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # The sentencepiece model too, when there is one: tools such as llama.cpp's converter read it.
        spm_model = getattr(tokenizer, "vocab_file", None)
        if spm_model and Path(spm_model).is_file() and not (tmp / "tokenizer.model").exists():
            shutil.copyfile(spm_model, tmp / "tokenizer.model")
        shutil.rmtree(final, ignore_errors=True)  # a previous attempt's; os.replace cannot replace a full dir
        os.replace(tmp, final)
    dist.barrier()
    return final
