"""What the model computes with: the worker's loss forward, Liger's fused kernels, torchao's FP8.

The worker's forward returns the summed token cross-entropy, not logits. It is bound to the
causal-LM instance (peft, FSDP and DeepSpeed all still call the module, so their hooks run) and
computes the loss from the last hidden states inside the model's own forward. That is what lets
Liger's fused linear cross-entropy run under FSDP: the head's weight is unsharded there, and the
whole micro-batch x seq x vocabulary logits tensor never exists (micro-batch 8, seq 2048 and a
128k vocabulary: 8 GiB in bf16, 16 GiB more for its fp32 softmax).

Liger (--kernels liger, the default) runs on CUDA only (its kernels are Triton's), for the families
it covers, and also replaces RMSNorm, SwiGLU and RoPE. Under ZeRO-3 the head's weight is a partition
outside its own module's forward, so the loss there is the plain one. Everywhere else (the CPU, a
family Liger does not cover, --kernels none) the plain path runs: the head, then a chunked fp32
cross-entropy, the same numbers as before any of this existed.

FP8 (--fp8, full fine-tunes under fsdp, compiled) swaps the decoder layers' linears for torchao's
Float8Linear (dynamic tensorwise scaling, as torchtitan does); the head stays bf16, its logits feed
the loss. Parameter names are unchanged, so checkpoints and final/ stay in HF format.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import CausalLMOutputWithPast

from llamajobs.data.sampler import IGNORE_INDEX
from llamajobs.spec import JobSpec

# Rows of logits upcast to fp32 at a time by token_loss_sum: 2,048 x 32k vocabulary = 256 MiB per chunk.
LOSS_CHUNK_TOKENS = 2048
# Float8 matmuls: Ada (8.9) and Hopper (9.0) or later.
FP8_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Kernels:
    """What this process's model computes with (decided on the node, where the device is known)."""

    liger: bool  # Liger's RMSNorm, SwiGLU and RoPE
    fused_loss: bool  # Liger's fused linear cross-entropy: the logits never exist
    fp8: bool

    def describe(self) -> str:
        parts = ["liger (rms norm, swiglu, rope" + (", fused linear cross-entropy)" if self.fused_loss else ")")
                 if self.liger else "plain transformers modules"]
        if self.fp8:
            parts.append("float8 linears (torchao, tensorwise)")
        return "kernels: " + ", ".join(parts)


def choose(spec: JobSpec, device_type: str) -> Kernels:
    """Liger where it can run (CUDA, a family it covers, the package present); FP8 as asked (the
    spec's rules admitted it; check_fp8_device refuses a card without float8 matmuls)."""
    liger = spec.liger and device_type == "cuda" and _liger_installed()
    return Kernels(liger=liger, fused_loss=liger and spec.fused_loss, fp8=spec.fp8)


def _liger_installed() -> bool:
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        return False
    return True


def check_fp8_device(device: torch.device) -> None:
    """Refuse --fp8 where there are no float8 matmuls: before any weight is read."""
    if device.type != "cuda":
        raise ValueError(f"--fp8 needs an H100-class GPU (float8 matmuls); this process runs on {device.type}: "
                         "leave --fp8 out")
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise ValueError(f"--fp8 needs float8 matmuls (compute capability 8.9 or more: H100, H200, L40S); "
                         f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: leave --fp8 out")


def apply(model: nn.Module, kernels: Kernels) -> None:
    """On the bare causal LM (before peft, compile and sharding): the loss forward always; Liger's
    module kernels and FP8's linears when chosen.

    Liger patches the family's transformers module for the whole process, not only this model (its
    RoPE replaces the module's function, its norm and MLP the module's classes), so every model of
    that family built afterwards in this process is Liger's too: a plain model asked for after that
    is refused rather than silently measured or trained with Liger's kernels."""
    if not kernels.liger and liger_patched(type(model)):
        raise RuntimeError(f"{type(model).__name__}: Liger's kernels already patched {type(model).__module__} in "
                           "this process; build plain models before the first Liger one, or in another process")
    if kernels.liger:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                        fused_linear_cross_entropy=False)  # (the loss forward below fuses it)
    if kernels.fp8:
        from torchao.float8 import convert_to_float8_training

        convert_to_float8_training(model, module_filter_fn=_fp8_filter)
    model.linear_ce_sum = liger_linear_ce_sum if kernels.fused_loss else None
    model.forward = MethodType(loss_forward, model)


def liger_patched(model_class: type) -> bool:
    """Whether Liger has patched the transformers module this class comes from (every family's
    modeling module has an apply_rotary_pos_emb, which Liger's RoPE replaces)."""
    rope = getattr(sys.modules[model_class.__module__], "apply_rotary_pos_emb", None)
    return getattr(rope, "__module__", "").startswith("liger_kernel")


def _fp8_filter(module: nn.Module, name: str) -> bool:
    # The head feeds the loss in bf16; float8's scaled matmuls need both dims divisible by 16.
    return name != "lm_head" and module.in_features % 16 == 0 and module.out_features % 16 == 0


def loss_forward(self, input_ids=None, labels=None, inputs_embeds=None, **kwargs) -> CausalLMOutputWithPast:
    """The causal LM's forward with labels: the summed token cross-entropy as `loss` (no logits).
    Labels are already aligned with the inputs (the sampler shifted them); peft's prompt modes
    prepend ignored labels for their virtual tokens. Without labels: the model's own forward."""
    if labels is None:
        return type(self).forward(self, input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in _OUTPUT_SWITCHES}
    decoder, head = getattr(self, self.base_model_prefix), self.get_output_embeddings()  # (every family's)
    hidden = decoder(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs).last_hidden_state
    hidden = hidden[:, -labels.shape[1]:]
    labels = labels.to(hidden.device)
    if self.linear_ce_sum is not None:
        loss = self.linear_ce_sum(hidden.flatten(0, 1), head.weight, labels.flatten())
    else:
        loss = token_loss_sum(head(hidden), labels)
    return CausalLMOutputWithPast(loss=loss)


# peft passes these to the causal LM's forward; the decoder stack needs none of them for a loss.
_OUTPUT_SWITCHES = ("output_attentions", "output_hidden_states", "return_dict", "use_cache", "num_items_in_batch")


def liger_linear_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    # The head's weight in the hidden states' dtype (bf16 under FSDP's mixed precision already; fp32
    # masters under one process's autocast), accumulated in fp32 inside the kernel.
    return liger_fused_linear_cross_entropy(hidden, weight.to(hidden.dtype), labels, ignore_index=IGNORE_INDEX,
                                            reduction="sum", accum_dtype=torch.float32)


def _cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, chunk: int = LOSS_CHUNK_TOKENS) -> torch.Tensor:
    """Summed token cross-entropy in fp32, over chunks of rows, each recomputed in the backward.

    Why chunks: the fp32 copy of bf16 logits and its softmax gradient would each be a whole
    micro-batch x seq x vocabulary (micro-batch 8, seq 512, 32k: 0.5 GiB apiece, 1 GiB at peak);
    chunked and checkpointed, only one chunk's exist at a time. split's backward is one cat."""
    logits, labels = logits.flatten(0, 1), labels.flatten()
    if logits.shape[0] <= chunk:
        return _cross_entropy_sum(logits, labels)
    return sum(checkpoint(_cross_entropy_sum, part, target, use_reentrant=False)
               for part, target in zip(logits.split(chunk), labels.split(chunk)))
