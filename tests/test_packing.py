"""Packed instruction rows keep their documents apart: each document's logits inside a packed row
equal its logits alone (CPU, fp32, the worker's own attention and a real store and sampler)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llamajobs.catalog import PROMPT_MODES
from llamajobs.data import store as st
from llamajobs.data.instruct import PackedSampler
from llamajobs.data.prepare import PrepareConfig, prepare
from llamajobs.errors import SpecError
from llamajobs.rules import validate_packing
from llamajobs.spec import JobSpec
from llamajobs.worker import packing
from llamajobs.worker.model import _apply_peft, attention_for

TOLERANCE = 1e-5  # fp32 on the CPU: only the summation order of the masked kernel differs


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tokenizer_dir):
    tmp = tmp_path_factory.mktemp("packed")
    records = [{"instruction": f"Question {i}?", "input": "", "output": f"Answer {i}." * (1 + i % 3)}
               for i in range(12)]
    (tmp / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare(PrepareConfig(inputs=(tmp / "a.jsonl",), tokenizer=tokenizer_dir, out=tmp / "s", format="alpaca"))
    store = st.TokenStore(tmp / "s")
    sampler = PackedSampler(store, seq_len=384, global_batch=2, micro_batch=2, rank=0, world_size=1, seed=0, pad_id=2)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=store.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation=attention_for(JobSpec()), use_cache=False)
    model = LlamaForCausalLM(config).eval()
    return store, sampler, model


def test_each_documents_logits_in_a_packed_row_equal_its_logits_alone(packed):
    store, sampler, model = packed
    (inputs, labels, positions), = next(sampler)  # one micro-batch of two packed rows
    with torch.no_grad():
        isolated = model(**packing.model_inputs(inputs, positions)).logits
        crossing = model(input_ids=inputs).logits  # the old packing: documents see their neighbours
    order, starts = sampler.packing(0)
    largest, crossing_largest, documents = 0.0, 0.0, 0
    for row in range(2):
        at = 0
        for doc in order[starts[row]:starts[row + 1]]:
            tokens = torch.from_numpy(store[doc].astype(np.int64))[None]
            with torch.no_grad():
                alone = model(input_ids=tokens).logits[0]
            n = tokens.shape[1]
            assert positions[row, at:at + n].tolist() == list(range(n))
            largest = max(largest, (isolated[row, at:at + n] - alone).abs().max().item())
            crossing_largest = max(crossing_largest, (crossing[row, at:at + n] - alone).abs().max().item())
            at += n
            documents += 1
    print(f"\npacked vs alone, {documents} documents in 2 rows: largest logit difference {largest:.3g} "
          f"(cross-attending packing: {crossing_largest:.3g})")
    assert documents > 2 and largest < TOLERANCE
    assert crossing_largest > 1e-3  # the test can fail: without the mask the documents leak


def test_the_mask_is_block_diagonal_causal():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = packing.document_mask(positions)[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                    [0, 0, 0, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert packing.model_inputs(positions) == {"input_ids": positions}  # no positions: plain causal


@pytest.mark.gpu
def test_the_mask_is_built_without_a_host_sync():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    positions = torch.arange(512, device="cuda").remainder(100)[None].expand(8, -1)
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        packing.document_mask(positions)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --- the prompt-learning modes and packed rows: refused ---

@pytest.mark.parametrize("mode", PROMPT_MODES)
def test_peft_prompt_learning_cannot_carry_the_document_mask(packed, mode):
    """Why the prompt modes are refused on packed data: peft's prompt-learning forward concatenates a
    2-D mask of ones for its virtual tokens onto the attention mask, so the 4-D document mask fails
    there (and prompt/ptuning drop the position ids). If peft ever lets it through, this test says so."""
    _, sampler, model = packed
    (inputs, labels, positions), = next(iter(PackedSampler(sampler.store, seq_len=384, global_batch=2, micro_batch=2,
                                                           rank=0, world_size=1, seed=0, pad_id=2)))
    spec = JobSpec(mode=mode, num_virtual_tokens=4)
    tuned = _apply_peft(copy.deepcopy(model), spec)
    with pytest.raises(RuntimeError, match="same number of dimensions"):
        tuned(**packing.model_inputs(inputs, positions), labels=labels)


@pytest.mark.parametrize("mode", PROMPT_MODES)
def test_the_prompt_modes_on_packed_data_are_refused_at_submit(cli, tmp_path, packed, mode):
    store = packed[0]
    code, out, err = cli("submit", "--cluster", "local", "--mode", mode, "--data", str(store.path), "--dry-run")
    assert code == 2, err
    assert err.strip() == f"Error: --mode {mode} cannot train on --data {store.path}: its instruction or chat documents " \
        f"are packed into rows, and peft's virtual tokens cannot be kept apart per document; use --mode full or " \
        f"lora, or --mode {mode} with plain-text data"
    with pytest.raises(SpecError, match=f"--mode {mode} cannot train on --data"):
        validate_packing(JobSpec(mode=mode, data=str(store.path)), packed=True)  # the worker's check (build_data)


def test_plain_text_data_and_the_other_modes_pass(packed):
    validate_packing(JobSpec(mode="prompt"), packed=False)  # plain-text data: one window per document, no packing
    for mode in ("full", "lora"):
        validate_packing(JobSpec(mode=mode, data=str(packed[0].path)), packed=True)
