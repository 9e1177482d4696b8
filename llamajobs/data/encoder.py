"""The tokenizer as `data prepare` uses it. The main process loads it whole (Encoder: sentencepiece, or
transformers for a tokenizer.json, which gives the fingerprint and the BOS and EOS ids); the processes
that tokenise get a TextCodec, which encodes with sentencepiece or the `tokenizers` library itself, so
they import neither torch nor transformers and pay no Python per document beyond building its ids."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from llamajobs.data import store as st
from llamajobs.errors import SpecError


class TextCodec:
    """Documents' text -> ids, in batches, one thread, exactly as the loaded tokenizer would encode them
    without special tokens: sentencepiece's encode, or transformers' fast tokenizer call with
    add_special_tokens=False and split_special_tokens=True (its Rust tokenizer, serialized from the one
    transformers loaded, so the ids are the same even where transformers adjusts a tokenizer.json).
    A special token's string inside the text ("</s>", "<|endoftext|>") is text: only the BOS and EOS
    the prepare adds around each document are control tokens. Picklable: a worker process rebuilds it."""

    def __init__(self, path: Path, bos_id: int, eos_id: int, *, model_file: Path | None = None,
                 tokenizer_json: str | None = None) -> None:
        if (model_file is None) == (tokenizer_json is None):
            raise ValueError("a TextCodec encodes with a sentencepiece model file or a tokenizer JSON")
        self.path, self.bos_id, self.eos_id = path, bos_id, eos_id
        self.model_file, self.tokenizer_json = model_file, tokenizer_json
        self._backend: Any = None  # built at the first encode: the main process of a pool never encodes

    def _build(self) -> Any:
        if self.model_file is not None:
            import sentencepiece as spm

            return spm.SentencePieceProcessor(model_file=str(self.model_file))
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per worker process
        return text_tokenizer(self.tokenizer_json)

    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), "_backend": None}  # a worker builds its own

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        try:
            return self._encode(texts)
        except (TypeError, UnicodeEncodeError):  # a lone surrogate ("\\ud800" in the JSON) is no UTF-8
            return self._encode([_valid_unicode(t) for t in texts])

    def _encode(self, texts: list[str]) -> list[list[int]]:
        if self._backend is None:
            self._backend = self._build()
        if self.model_file is not None:
            return self._backend.encode(texts, num_threads=1)
        # encode_batch_fast: no offsets to compute (tokenizers >= 0.21, which transformers 5 requires)
        return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]


def text_tokenizer(tokenizer_json: str) -> Any:
    """A `tokenizers` Tokenizer from its JSON that encodes text as transformers' call with
    split_special_tokens=True, no truncation and no padding: a special token's string is text."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.encode_special_tokens = True
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


class Encoder:
    """A tokenizer directory (or a tokenizer.model file): its fingerprint, ids and `codec` for encoding.

    With a tokenizer.model, sentencepiece itself encodes: a LLaMA-1/2 HF directory's tokenizer.json
    gives the same ids (the fingerprint checks the vocabulary). Without one (LLaMA-3's tiktoken-style
    vocabulary, Mistral's and Qwen's tokenizer.json), transformers loads the tokenizer and its Rust
    tokenizer encodes, through the `tokenizers` library.
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
            codec: dict[str, Any] = {"model_file": model.resolve()}
        elif path.is_dir() and (path / "tokenizer.json").is_file():
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # one thread per process
            from llamajobs.data.tokenizer import load_tokenizer

            self.hf = load_tokenizer(path)
            if not self.hf.is_fast:
                raise SpecError(f"--tokenizer {path}: transformers loads it as a {type(self.hf).__name__}, not "
                                f"from its tokenizer.json; expected a fast tokenizer")
            self.vocab_size = len(self.hf)  # added tokens included: they are ids the store may hold
            self.bos_id, self.eos_id = document_start(self.hf), self.hf.eos_token_id
            self.fingerprint = st.fingerprint_of(self.hf)
            codec = {"tokenizer_json": self.hf.backend_tokenizer.to_str()}
        else:
            raise SpecError(f"--tokenizer {path}: expected a model directory with tokenizer.model or tokenizer.json, "
                            f"or a tokenizer.model file")
        if self.bos_id is None or self.bos_id < 0 or self.eos_id is None or self.eos_id < 0:
            raise SpecError(f"--tokenizer {path} has no EOS token; a causal LM's tokenizer has one")
        self.codec = TextCodec(self.path, self.bos_id, self.eos_id, **codec)

    def encode(self, texts: list[str]) -> list[list[int]]:
        return self.codec.encode(texts)

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


def framed(ids: list[list[int]], bos: int, eos: int) -> np.ndarray:
    """The documents end to end, each as BOS, its tokens, EOS (uint32)."""
    flat: list[int] = []
    for doc in ids:  # list.extend: the fastest way from lists of ids to one array (np.fromiter of a chain is ~2x)
        flat.append(bos)
        flat.extend(doc)
        flat.append(eos)
    return np.array(flat, np.uint32)


def common_prefix(doc: list[int], prompt: list[int]) -> int:
    """How many leading tokens of the whole example are the prompt's (all of them, unless the
    tokenizer merged across the prompt/response boundary; the merged token then counts as response)."""
    n = min(len(doc), len(prompt))
    if doc[:n] == prompt[:n]:
        return n
    k = 0
    while k < n and doc[k] == prompt[k]:
        k += 1
    return k
