"""The token store: what `data prepare` writes and the worker reads, memory-mapped.

    DIR/meta.json                     counts, dtype, vocabulary, tokenizer fingerprint, sources, parts
    DIR/part-00000/tokens.bin         every document's tokens end to end (little-endian uint16, or
                                      uint32 when the vocabulary has more than 65536 ids)
    DIR/part-00000/offsets.bin        int64, documents + 1 entries: document i is tokens[o[i]:o[i+1]]
    DIR/part-00000/loss_mask.bin      instruction data only: uint8 aligned with the tokens; 1 where the
                                      token is a target of the loss (response and EOS), 0 for BOS and
                                      the prompt. A label at position t is tokens[t] if mask[t] else -100.
    DIR/part-00000/part.json          the part's own counts (its completion marker)
    DIR/eval/                         the held-out split (--eval-fraction), a store of the same layout

Every document is BOS + tokens + EOS: exactly one BOS per document. A store is made of parts, read
as one sequence of documents in part order (global document i = the parts' documents end to end);
`data prepare` writes one part, sharded preparation (one part per array task) writes several.

A store is written into DIR.tmp-<pid> and renamed to DIR when complete, so a directory named DIR
with a meta.json is always a finished store; an existing DIR is replaced only by a finished one.
Sharded preparation works in DIR.parts (one part per shard, kept across reruns) and renames that.

Two stores hold the same data when their `content_digest`s are equal: the documents' tokens end to
end, their lengths and loss masks, however they are cut into parts (a one-process store and a
sharded one of the same input are equal this way; their part files differ only in where they cut).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from bisect import bisect_right
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from llamajobs.errors import SpecError

KIND = "llamajobs token store"
FORMAT_VERSION = 1
META = "meta.json"
PART_META = "part.json"
TOKENS, OFFSETS, LOSS_MASK = "tokens.bin", "offsets.bin", "loss_mask.bin"
EVAL = "eval"
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
OFFSET_DTYPE = np.dtype("<i8")
MASK_DTYPE = np.dtype("u1")


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def token_dtype(vocab_size: int) -> str:
    """uint16 when every id (0 .. vocab_size - 1) fits in it (LLaMA-1/2's 32000), else uint32."""
    return "uint16" if vocab_size <= np.iinfo(np.uint16).max + 1 else "uint32"


# --- tokenizer fingerprint ---


# How chat messages become ids, recorded in a chat store's meta.json and a sharded preparation's plan,
# so a store (or a shard) made under another rule is refused, not mixed. 2: a special token's string
# inside a message ("<|im_end|>") is text; only the chat template's markup is a special token (1 made
# it a control token). Plain-text and instruct stores never changed (their special strings were
# always text), so they carry no version and are never refused for it.
CHAT_ENCODING = 2


def fingerprint(pieces: Sequence[str], bos_id: int | None, eos_id: int | None, unk_id: int | None) -> str:
    """sha256 of the vocabulary's pieces in id order and the special ids: equal for the same
    tokenizer.model loaded by sentencepiece or by transformers, different for any other vocabulary."""
    data = json.dumps({"pieces": list(pieces), "bos": bos_id, "eos": eos_id, "unk": unk_id},
                      ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def fingerprint_of(tokenizer: Any) -> str:
    """The fingerprint of a sentencepiece SentencePieceProcessor or a transformers tokenizer.

    A transformers tokenizer's base vocabulary (`vocab_size`, without tokens added on top, such as
    a pad token some checkpoints add) is what a sentencepiece model holds, so both agree.
    """
    if hasattr(tokenizer, "id_to_piece"):  # sentencepiece
        n = tokenizer.get_piece_size()
        special = [tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.unk_id()]
        return fingerprint([tokenizer.id_to_piece(i) for i in range(n)], *[s if s >= 0 else None for s in special])
    pieces = tokenizer.convert_ids_to_tokens(list(range(tokenizer.vocab_size)))
    return fingerprint(pieces, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)


# --- writing ---


class PartWriter:
    """Appends documents to one part directory; `close` writes part.json and returns its counts."""

    def __init__(self, directory: Path, dtype: str, with_mask: bool) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True)
        self.dtype = DTYPES[dtype]
        self.documents = 0
        self.tokens = 0
        self.max_token_id = -1
        self._tokens = open(self.directory / TOKENS, "wb", buffering=1 << 22)
        self._offsets = open(self.directory / OFFSETS, "wb", buffering=1 << 20)
        self._offsets.write(np.zeros(1, OFFSET_DTYPE).tobytes())
        self._mask = open(self.directory / LOSS_MASK, "wb", buffering=1 << 20) if with_mask else None

    def write(self, tokens: np.ndarray, lengths: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Documents given end to end: tokens (any integer dtype), their lengths, and (with a mask)
        the loss mask aligned with the tokens."""
        if not len(lengths):
            return
        if (self._mask is None) != (mask is None):
            raise ValueError("a loss mask must be given exactly when the part keeps one")
        top = int(tokens.max()) if len(tokens) else -1
        if top > np.iinfo(self.dtype).max:
            raise ValueError(f"token id {top} does not fit in {self.dtype}")
        self.max_token_id = max(self.max_token_id, top)
        self._tokens.write(_bytes(tokens, self.dtype))
        self._offsets.write(_bytes(self.tokens + np.cumsum(lengths, dtype=np.int64), OFFSET_DTYPE))
        if self._mask is not None:
            self._mask.write(_bytes(mask, MASK_DTYPE))
        self.documents += len(lengths)
        self.tokens += int(np.sum(lengths))

    def flush(self) -> None:
        """Hand what was written so far to the OS (close also fsyncs)."""
        for f in filter(None, (self._tokens, self._offsets, self._mask)):
            f.flush()

    def close(self, **extra: Any) -> dict[str, Any]:
        for f in filter(None, (self._tokens, self._offsets, self._mask)):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        info = {"name": self.directory.name, "documents": self.documents, "tokens": self.tokens,
                "max_token_id": self.max_token_id, **extra}
        write_json(self.directory / PART_META, info)
        return info


def _bytes(array: np.ndarray, dtype: np.dtype) -> memoryview:
    """The array in dtype as bytes for a file's write, without the copy tobytes() makes."""
    return memoryview(np.ascontiguousarray(array, dtype)).cast("B")


def write_json(path: Path, data: Any) -> None:
    """Deterministic JSON (sorted keys): equal inputs give byte-identical files."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def staging_dir(out: Path) -> Path:
    """DIR.tmp-<pid> next to DIR, empty: where a store is written before it is renamed."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def is_store(path: Path) -> bool:
    """Whether llamajobs wrote this directory as a token store: its meta.json says so."""
    try:
        return json.loads((path / META).read_text(encoding="utf-8")).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def held_input(folder: Path, inputs: Sequence[Path]) -> Path | None:
    """The first of the inputs that is the folder or lies inside it (which replacing it would delete)."""
    resolved = folder.resolve()
    return next((given for given in inputs
                 if resolved == Path(given).resolve() or resolved in Path(given).resolve().parents), None)


def check_replaceable(out: Path, inputs: Sequence[Path] = ()) -> None:
    """--force replaces only what llamajobs wrote: a token store, or an empty directory; never a
    directory that holds one of the inputs (nor the inputs themselves)."""
    if not out.exists() and not out.is_symlink():
        return
    if (given := held_input(out, inputs)) is not None:
        raise SpecError(f"--out {out} holds the input {given}; --force never replaces it: choose another --out")
    if out.is_symlink() or not out.is_dir():
        raise SpecError(f"--out {out} is not a directory llamajobs wrote; --force replaces only a token store")
    if not is_store(out) and any(out.iterdir()):
        raise SpecError(f"--out {out} is not a token store (no llamajobs meta.json); --force replaces only a "
                        f"token store: choose another --out")


def commit(tmp: Path, out: Path, *, replace: bool = False) -> None:
    """Rename the finished store into place. An existing DIR is replaced only with `replace`, only
    when it is a token store (or empty), and only now that the new store is complete (the old one is
    moved aside, then deleted)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    if not replace:
        raise SpecError(f"--out {out} already exists; choose another directory or pass --force to replace it")
    check_replaceable(out)
    old = out.with_name(f"{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


# --- reading ---


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    """A read-only array over a file (mmap; a plain ndarray, so slicing it is cheap)."""
    size = path.stat().st_size
    if size != count * dtype.itemsize:
        raise SpecError(f"{path} holds {size} bytes, expected {count * dtype.itemsize} "
                        f"({count} x {dtype.name}); the store is damaged: prepare it again")
    if count == 0:
        return np.empty(0, dtype)
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype)


class TokenStore(Sequence[np.ndarray]):
    """A store opened by memory map: `store[i]` is document i's tokens (a read-only view), `len(store)`
    the number of documents. This is the `docs` sequence WindowSampler takes; nothing is read into
    memory up front except the offsets' pages as they are touched."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            leftovers = sorted(p.name for p in self.path.parent.glob(f"{self.path.name}.tmp-*"))
            hint = f" (an unfinished prepare left {', '.join(leftovers)})" if leftovers else ""
            if self.path.with_name(f"{self.path.name}.parts").is_dir():
                hint += (f" (a sharded prepare is unfinished in {self.path.name}.parts: `llamajobs data inspect "
                         f"{self.path}` shows its shards; rerun the same `data prepare` command to finish it)")
            raise SpecError(f"{self.path} is not a token store: no {META}{hint}; "
                            f"write one with `llamajobs data prepare`")
        try:
            self.meta: dict[str, Any] = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:  # not UTF-8, or not JSON: a damaged file, not ours
            raise SpecError(f"{meta_path} is not a llamajobs token store's meta.json ({e})") from None
        if not isinstance(self.meta, dict) or self.meta.get("kind") != KIND:
            raise SpecError(f"{meta_path} is not a llamajobs token store's meta.json")
        if self.meta.get("format_version", 0) > FORMAT_VERSION:
            raise SpecError(f"{self.path} was written by a newer llamajobs (store format "
                            f"{self.meta['format_version']}, this one reads {FORMAT_VERSION}); upgrade llamajobs")
        self.dtype = DTYPES[self.meta["dtype"]]
        self.has_loss_mask = bool(self.meta.get("loss_mask"))
        self._tokens: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        self._masks: list[np.ndarray | None] = []
        self._starts = [0]  # first global document of each part, then the total
        for part in self.meta["parts"]:
            d = self.path / part["name"]
            self._tokens.append(_map(d / TOKENS, self.dtype, part["tokens"]))
            self._offsets.append(_map(d / OFFSETS, OFFSET_DTYPE, part["documents"] + 1))
            self._masks.append(_map(d / LOSS_MASK, MASK_DTYPE, part["tokens"]) if self.has_loss_mask else None)
            self._starts.append(self._starts[-1] + part["documents"])
        self._single = len(self._tokens) == 1

    # --- the sequence of documents ---

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> tuple[int, int]:
        n = self._starts[-1]
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"document {i} of a store with {n}")
        if self._single:
            return 0, i
        part = bisect_right(self._starts, i) - 1
        return part, i - self._starts[part]

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        """Document i's tokens: BOS, the text's tokens, EOS (a view of the mapped file)."""
        part, j = self._locate(int(i))
        start, end = self._offsets[part][j:j + 2]
        return self._tokens[part][start:end]

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]

    def loss_mask(self, i: int) -> np.ndarray:
        """Document i's loss mask (1: the token is a target), aligned with store[i]; all ones but
        the BOS when the store has no mask (plain documents train on every token)."""
        part, j = self._locate(int(i))
        start, end = self._offsets[part][j:j + 2]
        mask = self._masks[part]
        if mask is None:
            ones = np.ones(end - start, MASK_DTYPE)
            ones[:1] = 0
            return ones
        return mask[start:end]

    def lengths(self) -> np.ndarray:
        """Every document's length in tokens (int64), in document order."""
        if not self._offsets:
            return np.empty(0, np.int64)
        return np.concatenate([np.diff(o) for o in self._offsets])

    # --- what meta.json says ---

    @property
    def num_tokens(self) -> int:
        return self.meta["tokens"]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer"]["fingerprint"]

    def eval_split(self) -> TokenStore | None:
        """The held-out store written by --eval-fraction, if any."""
        split = self.meta.get("eval")
        return TokenStore(self.path / split["path"]) if split else None

    def __repr__(self) -> str:
        return (f"TokenStore({str(self.path)!r}, documents={len(self)}, tokens={self.num_tokens}, "
                f"dtype={self.dtype.name})")


def content_digest(store: TokenStore | str | Path, block: int = 1 << 24) -> dict[str, Any]:
    """What a store holds, independent of its parts: sha256 of every document's tokens end to end
    (in the store's dtype), of the documents' lengths (int64) and of the loss masks, with the counts;
    the eval split's under "eval". Streamed a block at a time (memory independent of the store)."""
    if not isinstance(store, TokenStore):
        store = TokenStore(store)
    tokens, lengths, masks = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    for part in range(len(store._tokens)):
        for start in range(0, len(store._tokens[part]), block):
            tokens.update(store._tokens[part][start:start + block].tobytes())
            if store._masks[part] is not None:
                masks.update(store._masks[part][start:start + block].tobytes())
        offsets = store._offsets[part]
        for start in range(0, len(offsets) - 1, block):
            lengths.update(np.diff(offsets[start:start + block + 1]).astype(OFFSET_DTYPE).tobytes())
    digest: dict[str, Any] = {"documents": len(store), "tokens": store.num_tokens, "dtype": store.meta["dtype"],
                              "tokens_sha256": tokens.hexdigest(), "lengths_sha256": lengths.hexdigest(),
                              "loss_mask_sha256": masks.hexdigest() if store.has_loss_mask else None}
    held = store.eval_split()
    if held is not None:
        digest["eval"] = content_digest(held, block)
    return digest


def window_tokens_per_epoch(store: TokenStore, seq_len: int) -> int:
    """Tokens trained on in one epoch of WindowSampler (one window per document; a window of
    seq_len + 1 tokens gives seq_len targets, a shorter document one fewer than its length):
    what `estimate hours --tokens` should be given for a store."""
    return int(np.minimum(store.lengths() - 1, seq_len).sum())


def open_documents(path: str | Path, tokenizer: Any = None, *, model_vocab_size: int | None = None) -> TokenStore:
    """The store at `path` as WindowSampler's `docs`, checked against the model's tokenizer when given."""
    store = TokenStore(path)
    if tokenizer is not None:
        check_store(store, tokenizer, model_vocab_size=model_vocab_size)
    return store


def check_store(store: TokenStore | str | Path, tokenizer: Any, *, model_vocab_size: int | None = None) -> TokenStore:
    """Refuse a store made with another tokenizer (SpecError naming both fingerprints), or one holding
    ids the model's embedding has no row for. `tokenizer` is a transformers tokenizer or a
    sentencepiece processor; model_vocab_size is the model config's vocab_size."""
    if not isinstance(store, TokenStore):
        store = TokenStore(store)
    expected = fingerprint_of(tokenizer)
    if store.fingerprint != expected:
        n = tokenizer.vocab_size if hasattr(tokenizer, "vocab_size") else tokenizer.get_piece_size()
        raise SpecError(
            f"--data {store.path} was tokenized with tokenizer {store.fingerprint[:16]} "
            f"({store.meta['tokenizer'].get('path')}, vocabulary {store.vocab_size}), but the model's tokenizer is "
            f"{expected[:16]} (vocabulary {n}); prepare the data again with --tokenizer set to the model's directory")
    if "chat" in store.meta and store.meta["chat"].get("encoding", 1) != CHAT_ENCODING:
        raise SpecError(f"--data {store.path} holds chat data prepared by an older llamajobs, which made special-token "
                        "strings inside messages (such as <|im_end|>) control tokens; prepare the data again")
    top = store.meta.get("max_token_id", store.vocab_size - 1)
    if model_vocab_size is not None and top >= model_vocab_size:
        raise SpecError(f"--data {store.path} holds token id {top}, but the model's vocabulary has {model_vocab_size} "
                        f"ids; use a model whose embedding covers the tokenizer's {store.vocab_size} ids")
    return store
