"""The tokenizer as `data prepare` uses it: batch encoding with sentencepiece itself (no torch or
transformers import in the worker processes), or a Hugging Face tokenizer.json."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llamajobs.data import store as st
from llamajobs.errors import SpecError

class Encoder:
    """A tokenizer directory (or a tokenizer.model file) for batch encoding.

    With a tokenizer.model, sentencepiece itself encodes (one thread per process, no torch or
    transformers import): a LLaMA-1/2 HF directory's tokenizer.json gives the same ids (the
    fingerprint checks the vocabulary). Without one (LLaMA-3's tiktoken-style vocabulary), the
    transformers tokenizer encodes, with special-token strings in the text kept as text.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        model = path if path.is_file() else path / "tokenizer.model"
        self.path = path.resolve()
        self.sp = self.hf = None
        # A tokenizer.json beside a tokenizer.model that is not sentencepiece's (Llama 3's tiktoken file) wins.
        if model.is_file() and not (path.is_dir() and (path / "tokenizer.json").is_file() and not is_sentencepiece(model)):
            import sentencepiece as spm

            try:
                self.sp = spm.SentencePieceProcessor(model_file=str(model))
            except (OSError, RuntimeError) as e:
                raise SpecError(f"--tokenizer {path}: {model.name} is not a sentencepiece model ({e})") from None
            self.vocab_size = self.sp.get_piece_size()
            self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
            self.fingerprint = st.fingerprint_of(self.sp)
        elif path.is_dir() and (path / "tokenizer.json").is_file():
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
            from llamajobs.data.tokenizer import load_tokenizer

            self.hf = load_tokenizer(path)
            self.vocab_size = len(self.hf)  # added tokens included: they are ids the store may hold
            self.bos_id, self.eos_id = document_start(self.hf), self.hf.eos_token_id
            self.fingerprint = st.fingerprint_of(self.hf)
        else:
            raise SpecError(f"--tokenizer {path}: expected a model directory with tokenizer.model or tokenizer.json, "
                            f"or a tokenizer.model file")
        if self.bos_id is None or self.bos_id < 0 or self.eos_id is None or self.eos_id < 0:
            raise SpecError(f"--tokenizer {path} has no EOS token; a causal LM's tokenizer has one")

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        try:
            return self._encode(texts)
        except (TypeError, UnicodeEncodeError):  # a lone surrogate ("\\ud800" in the JSON) is no UTF-8
            return self._encode([_valid_unicode(t) for t in texts])

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self.sp is not None:
            return self.sp.encode(texts, num_threads=1)
        return self.hf(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        if self.sp is not None:
            return self.sp.decode(ids)
        return self.hf.decode(ids)

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "fingerprint": self.fingerprint, "vocab_size": self.vocab_size,
                "bos_id": self.bos_id, "eos_id": self.eos_id}


def is_sentencepiece(model: Path) -> bool:
    """Whether a tokenizer.model is a sentencepiece model (a serialized protobuf), not a tiktoken BPE
    file (base64 tokens and ranks, one per line: text)."""
    with open(model, "rb") as f:
        head = f.read(64)
    return not all(32 <= b < 127 or b in b"\r\n" for b in head)


def document_start(tokenizer: Any) -> int | None:
    """The id every document starts with: the BOS, or for a tokenizer without one (Qwen's) its EOS,
    the separator such models saw between documents in pre-training."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def _valid_unicode(text: str) -> str:
    """The text with lone surrogates replaced by U+FFFD (pairs written as two escapes are joined)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
