"""Tiny random models of each family in catalog.FAMILIES, as a Hub repository would hold them: config.json,
safetensors weights and a Hugging Face fast tokenizer (byte-level BPE trained here with the `tokenizers`
library on the sample corpus, with a chat template), plus huggingface_hub's cache layout around one.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from llamajobs.data import read_texts

TOKENIZER_VOCAB = 400
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3_CHAT = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
               "{{ m['content'] }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")

# Each family's special tokens as its real tokenizers name them; Qwen's have no BOS.
SPECIALS = {
    "llama": dict(bos="<|begin_of_text|>", eos="<|end_of_text|>",
                  extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], chat=LLAMA3_CHAT),
    "mistral": dict(bos="<s>", eos="</s>", extra=["[INST]", "[/INST]", "<|im_start|>", "<|im_end|>"], chat=CHATML),
    "qwen2": dict(bos=None, eos="<|endoftext|>", extra=["<|im_start|>", "<|im_end|>"], chat=CHATML),
    "qwen3": dict(bos=None, eos="<|endoftext|>", extra=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                  chat=CHATML),
}

# A few layers, hidden 64, GQA everywhere; llama with Llama 3.1's rope scaling, qwen3 with a head size
# that is not hidden / heads (as Qwen3's own configs have), qwen2 with tied embeddings (Qwen2.5's small ones).
CONFIGS = {
    "llama": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(rope_theta=1000000.0),
    "qwen2": dict(rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen3": dict(rope_theta=1000000.0, head_dim=32),
}


def train_fast_tokenizer(family: str, out_dir: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer.json (+ tokenizer_config.json with the chat template) in out_dir."""
    special = SPECIALS[family]
    names = [t for t in (special["bos"], special["eos"], *special["extra"]) if t]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=names, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(read_texts(), trainer)
    if special["bos"]:  # as Llama 3's: BOS added in front of every encoded text
        bos = special["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=special["bos"], eos_token=special["eos"],
                                   additional_special_tokens=special["extra"])
    fast.chat_template = special["chat"]
    fast.save_pretrained(out_dir)
    return fast


def make_model_dir(family: str, out_dir: Path, seed: int = 0) -> Path:
    """A random tiny model of the family with its fast tokenizer, saved as from_pretrained loads it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_fast_tokenizer(family, out_dir)
    config = AutoConfig.for_model(
        family, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=len(tokenizer), max_position_embeddings=1024, rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **CONFIGS[family])
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out_dir)
    return out_dir


def hub_cache(model_dir: Path, hf_home: Path, repo_id: str, revision: str = "main") -> str:
    """Put a model directory into huggingface_hub's cache layout under hf_home, as a download leaves it:
    blobs named by content, a snapshot of symlinks to them per commit, refs/<revision> holding the commit.
    Returns the commit."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in model_dir.iterdir() if p.is_file())
    commit = hashlib.sha1(b"".join(p.name.encode() + p.read_bytes() for p in files)).hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in files:
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copyfile(path, blob)
        link = snapshot / path.name
        link.unlink(missing_ok=True)
        link.symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit
