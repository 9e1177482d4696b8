"""LLaMA-style sentencepiece tokenizers: train one (the bundled tiny one, `llamajobs tokenizer train`)
and load one as a transformers LlamaTokenizer."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

from llamajobs.errors import SpecError

# sentencepiece silently drops training sentences longer than this (in bytes); papers are much
# longer, so documents are fed line by line and long lines in pieces of at most this size.
MAX_SENTENCE_BYTES = 4192


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            data = line.encode("utf-8")
            while data:
                piece, data = data[:MAX_SENTENCE_BYTES], data[MAX_SENTENCE_BYTES:]
                # A cut inside a multi-byte character loses that character, nothing else.
                yield piece.decode("utf-8", errors="ignore")


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a BPE sentencepiece model with LLaMA's options into out_dir/tokenizer.model.

    Returns out_dir, which `LlamaTokenizer.from_pretrained(out_dir)` (and `load_tokenizer`) loads.
    Training is deterministic: the same texts give a byte-identical tokenizer.model.
    """
    # Imported here: a worker that loads an existing tokenizer (or a GPU bench with none) never needs it.
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / "tokenizer"
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(texts),
            model_prefix=str(prefix),
            vocab_size=vocab_size,
            # LLaMA's trainer options (its tokenizer.model's trainer_spec).
            model_type="bpe",
            byte_fallback=True,  # no <unk> for unseen characters: they become <0xNN> byte pieces
            split_digits=True,
            allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False,
            normalization_rule_name="identity",
            add_dummy_prefix=True,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            # 256 byte pieces already take half of a tiny vocabulary: cover fewer rare characters
            # than LLaMA's 0.99995, or a small vocabulary cannot hold the required characters.
            character_coverage=0.9995 if vocab_size < 4096 else 0.99995,
            max_sentence_length=MAX_SENTENCE_BYTES,
            # Determinism: one thread, every sentence, no sampling or shuffling of the input.
            num_threads=1,
            input_sentence_size=0,
            shuffle_input_sentence=False,
            minloglevel=2,
        )
    except RuntimeError as e:  # sentencepiece refuses the vocabulary size, in its own words
        raise SpecError(f"--vocab-size {vocab_size}: {str(e).split('] ')[-1]}") from None
    prefix.with_suffix(".vocab").unlink(missing_ok=True)  # a by-product nothing reads
    # A bare tokenizer.model loads without a BOS post-processor; saving the loaded tokenizer writes
    # tokenizer.json and tokenizer_config.json, so the directory loads like a LLaMA checkpoint's.
    tokenizer = LlamaTokenizer.from_pretrained(out_dir, add_bos_token=True, add_eos_token=False)
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"trained tokenizer has {len(tokenizer)} tokens, expected {vocab_size}")
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> Path:
    """train_tokenizer into out_dir unless a complete one is there (atomic: tmp dir, then rename)."""
    out_dir = Path(out_dir)
    if (out_dir / "tokenizer.json").is_file():
        return out_dir
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_tokenizer(texts, vocab_size, tmp)
    os.replace(tmp, out_dir)
    return out_dir


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of an HF LLaMA directory (a checkpoint, a run's final/, or a trained one), or of a
    sentencepiece model file (whatever its name: mistral-common ships tokenizer.model.v1).

    AutoTokenizer, not LlamaTokenizer: LLaMA-3 checkpoints ship a different tokenizer class.
    """
    path = Path(path)
    if path.is_file():  # transformers reads a sentencepiece model only as a directory's tokenizer.model
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokenizer.model").symlink_to(path.resolve())
            return _auto_tokenizer(Path(tmp), path)  # loaded whole: nothing reads the link afterwards
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model; expected an HF LLaMA directory")
    return _auto_tokenizer(path, path)


def _auto_tokenizer(directory: Path, named: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # transformers and tokenizers raise many kinds for a damaged file, even a bare Exception
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SpecError(f"{named}: its tokenizer cannot be loaded ({first}); is tokenizer.json or "
                        f"tokenizer_config.json damaged?") from None
