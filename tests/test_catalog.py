import pytest
import torch
import transformers

from llamajobs import catalog


@pytest.mark.parametrize("size, billions", [("7b", 6.74), ("13b", 13.0), ("33b", 32.5), ("65b", 65.2)])
def test_llama1_shapes_build_with_the_published_parameter_counts(size, billions):
    shape = catalog.SIZES[size]
    config = transformers.LlamaConfig(**shape.hf_config())
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    counted = sum(p.numel() for p in model.parameters())
    assert counted == shape.params
    assert abs(counted / 1e9 - billions) / billions < 0.01


@pytest.mark.parametrize("size, billions", [("llama3-8b", 8.03), ("llama3-70b", 70.6), ("mistral-7b", 7.25),
                                            ("qwen2.5-7b", 7.62)])
def test_the_presets_hub_shapes_have_their_published_parameter_counts(size, billions):
    """The models' cards: Llama 3.1 8B and 70B, Mistral-7B-v0.3, Qwen2.5-7B (7.61B, untied head)."""
    assert abs(catalog.SIZES[size].params / 1e9 - billions) / billions < 0.005


def test_tiny_takes_the_bundled_tokenizer_vocabulary():
    assert catalog.SIZES["tiny"].vocab_size == catalog.TINY_VOCAB


def test_shape_read_from_an_hf_config():
    config = catalog.SIZES["13b"].hf_config()
    assert catalog.shape_from_hf_config(config, "13b") == catalog.SIZES["13b"]


@pytest.mark.parametrize("name, memory, expected", [
    ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40g"), ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80g"),
    ("NVIDIA H100 80GB HBM3", 79.1, "h100"), ("NVIDIA H200", 139.8, "h200"),
])
def test_cards_are_recognised(name, memory, expected):
    assert catalog.gpu_from_device_name(name, memory).name == expected
    assert catalog.gpu_from_device_name("Tesla T4", 15) is None
