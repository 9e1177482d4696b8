"""--kernels and --fp8: the rules, what the node chooses, the loss forward every strategy trains
through, torchao's float8 linears; on a GPU, Liger's losses against the plain path's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from llamajobs.catalog import FAMILIES, SIZES
from llamajobs.errors import SpecError
from llamajobs.spec import JobSpec
from llamajobs.worker import kernels
from llamajobs.worker import model as model_lib

PLAIN = kernels.Kernels(liger=False, fused_loss=False, fp8=False)


@pytest.mark.parametrize("flags, message", [
    (dict(fp8=True, mode="lora", compile=True), "--fp8 trains a full fine-tune's linears in float8; --mode lora"),
    (dict(fp8=True, strategy="ds-zero3", compile=False), "--fp8 is implemented for fsdp; leave it out"),
    (dict(fp8=True), "--fp8 needs --compile"),
    (dict(fp8=True, compile=True, device="cpu"), "--fp8 needs an H100-class GPU"),
    (dict(kernels="triton"), "--kernels 'triton' is not allowed; choose one of liger, none"),
])
def test_rules(flags, message):
    with pytest.raises(SpecError, match=message):
        JobSpec(**flags)


def test_bad_flag_is_one_line_and_exit_2(cli):
    code, _, stderr = cli("submit", "--cluster", "local", "--fp8", "--mode", "lora", "--compile")
    assert code == 2 and "--fp8 trains a full fine-tune" in stderr and len(stderr.strip().splitlines()) == 1


def test_what_the_node_chooses(monkeypatch):
    monkeypatch.setattr(kernels, "_liger_installed", lambda: True)
    assert kernels.choose(JobSpec(), "cpu") == PLAIN  # Triton kernels: never on the CPU
    assert kernels.choose(JobSpec(kernels="none"), "cuda") == PLAIN
    assert kernels.choose(JobSpec(), "cuda") == kernels.Kernels(liger=True, fused_loss=True, fp8=False)
    # ZeRO-3's head weight is a partition outside its own forward: the plain loss there.
    assert kernels.choose(JobSpec(strategy="ds-zero3"), "cuda") == kernels.Kernels(liger=True, fused_loss=False,
                                                                                    fp8=False)
    with monkeypatch.context() as m:  # (every supported family is Liger's today)
        m.setitem(FAMILIES, "llama", dataclasses.replace(FAMILIES["llama"], liger=False))
        assert not kernels.choose(JobSpec(), "cuda").liger
    monkeypatch.setattr(kernels, "_liger_installed", lambda: False)
    assert kernels.choose(JobSpec(), "cuda") == PLAIN  # the package is an extra: without it, the plain path
    assert kernels.choose(JobSpec(fp8=True, compile=True), "cuda").fp8


def test_fp8_is_refused_on_the_node_without_float8_matmuls():
    with pytest.raises(ValueError, match="--fp8 needs an H100-class GPU .* this process runs on cpu"):
        kernels.check_fp8_device(torch.device("cpu"))


def tiny_config() -> LlamaConfig:
    return LlamaConfig(**SIZES["tiny"].hf_config())


def reference_linear_ce_sum(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What a fused linear cross-entropy computes, written plainly (Liger's kernel needs CUDA)."""
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=-100, reduction="sum")


def logits_loss(model, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed token loss the old way: logits from the model's own forward, the last seq positions
    (prompt tuning prepends its virtual tokens' logits)."""
    logits = model(input_ids=inputs).logits[:, -labels.shape[1]:]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("mode", ["full", "lora", "prompt", "prefix"])
@pytest.mark.parametrize("fused", [False, True])
def test_the_loss_forward_equals_the_logits_loss(mode, fused):
    """Through peft's wrappers (prompt tuning prepends virtual tokens and ignored labels; prefix
    tuning passes past keys): the loss forward's summed loss and its gradients equal those of the
    plain logits. `fused` runs the fused path's plumbing with a plain linear cross-entropy."""
    torch.manual_seed(0)
    spec = JobSpec(mode=mode, num_virtual_tokens=3, lora_dropout=0.0)
    model = model_lib.build_structure(spec, tiny_config(), torch.float32, kernels.choose(spec, "cpu"))
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if fused:
        causal_lm.linear_ce_sum = reference_linear_ce_sum
    inputs = torch.randint(0, 500, (2, 12))
    labels = torch.randint(0, 500, (2, 12))
    labels[0, :4] = -100  # a prompt's positions carry no loss

    ours = model(input_ids=inputs, labels=labels).loss
    ours.backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    causal_lm.forward = type(causal_lm).forward.__get__(causal_lm)  # the model's own forward again
    theirs = logits_loss(model, inputs, labels)
    theirs.backward()

    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-5)
    assert ours_grads.keys() and all(
        torch.allclose(ours_grads[n], p.grad, rtol=1e-5, atol=1e-6) for n, p in model.named_parameters()
        if p.requires_grad), "gradients differ"


def test_without_labels_the_model_is_its_own():
    """generate and eval call the model without labels: logits as transformers computes them."""
    model = model_lib.build_structure(JobSpec(), tiny_config(), torch.float32, kernels.choose(JobSpec(), "cpu"))
    inputs = torch.randint(0, 500, (1, 8))
    assert model(input_ids=inputs).logits.shape == (1, 8, SIZES["tiny"].vocab_size)


def test_a_plain_model_is_refused_once_liger_patched_the_process(monkeypatch):
    """Liger's RoPE replaces the family module's apply_rotary_pos_emb (and its norm and MLP classes) for
    the whole process: a plain model built after it would silently be Liger's (the GPU bench's plain
    rows were). Here the module's function is swapped for one from a liger_kernel module, as Liger does."""
    from transformers.models.llama import modeling_llama

    def liger_rotary_pos_emb(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        return modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    liger_rotary_pos_emb.__module__ = "liger_kernel.transformers.rope"
    model = LlamaForCausalLM(tiny_config())
    assert not kernels.liger_patched(LlamaForCausalLM)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", liger_rotary_pos_emb)
    assert kernels.liger_patched(LlamaForCausalLM)
    with pytest.raises(RuntimeError, match="Liger's kernels already patched transformers.models.llama"):
        kernels.apply(model, PLAIN)


@pytest.mark.gpu
def test_fp8_swaps_the_decoder_linears_and_keeps_hf_names():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (torchao, in the gpu extra, is installed where FP8 can run)")
    from torchao.float8.float8_linear import Float8Linear

    with torch.device("meta"):
        plain = LlamaForCausalLM(tiny_config())
        model = LlamaForCausalLM(tiny_config())
    kernels.apply(model, kernels.Kernels(liger=False, fused_loss=False, fp8=True))
    swapped = {name for name, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert "model.layers.0.self_attn.q_proj" in swapped and "model.layers.1.self_attn.o_proj" in swapped
    assert "lm_head" not in swapped  # the head feeds the loss in bf16
    assert "model.layers.0.mlp.down_proj" not in swapped  # 172 inputs: float8 matmuls need multiples of 16
    assert list(model.state_dict()) == list(plain.state_dict())  # checkpoints and final/ stay HF's


@pytest.mark.gpu
def test_liger_losses_match_the_plain_path_on_a_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pytest.importorskip("liger_kernel", reason="pip install 'llamajobs[gpu]'")
    torch.manual_seed(0)
    config = tiny_config()
    inputs = torch.randint(0, config.vocab_size, (4, 64), device="cuda")
    labels = torch.randint(0, config.vocab_size, (4, 64), device="cuda")
    losses = {}
    for name, chosen in (("plain", PLAIN), ("liger", kernels.Kernels(liger=True, fused_loss=True, fp8=False))):
        torch.manual_seed(1)
        model = LlamaForCausalLM(config).cuda()
        kernels.apply(model, chosen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=inputs, labels=labels).loss
        loss.backward()
        losses[name] = (loss.item(), model.model.layers[0].mlp.down_proj.weight.grad.float().norm().item())
    (plain_loss, plain_grad), (liger_loss, liger_grad) = losses["plain"], losses["liger"]
    assert abs(liger_loss - plain_loss) / plain_loss < 2e-2 and abs(liger_grad - plain_grad) / plain_grad < 5e-2


def test_the_estimate_counts_no_logits_under_the_fused_loss():
    """Llama 3's 128k vocabulary at micro-batch 8, seq 2048: the logits the plain loss keeps are
    ~8 GiB; the fused loss keeps a few hundred MiB of its own instead."""
    from llamajobs import estimate
    from llamajobs.catalog import GPUS

    def gpu_gib(kernels_flag: str) -> float:
        spec = JobSpec(size="llama3-8b", cluster="slurm", seq_len=2048, micro_batch=8, global_batch=64,
                       kernels=kernels_flag)
        return estimate.memory(estimate.Plan.from_spec(spec), GPUS["h100"])["gpu_mem_gib"]

    shape = SIZES["llama3-8b"]
    saved = (estimate.logits_bytes(shape, 8, 2048) - estimate.fused_loss_bytes(shape, 8, 2048)) / 2**30
    assert saved > 7
    assert gpu_gib("none") - gpu_gib("liger") == pytest.approx(saved, rel=1e-6)
