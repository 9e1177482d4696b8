"""`data inspect`: what a token store holds, one document decoded; or an unfinished sharded
preparation's shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llamajobs.data import shards, store as st
from llamajobs.data.encoder import Encoder
from llamajobs.errors import SpecError

def describe(path: str | Path, *, tokenizer: str | Path | None = None, document: int = 0,
             max_tokens: int = 200) -> dict[str, Any]:
    """What `data inspect` shows: the counts, dtype, fingerprint, bytes on disk, and one document
    decoded (with the tokenizer the store was made with, or the one given). For a sharded
    preparation that is not finished (DIR.parts, or DIR given while only DIR.parts exists), its
    shards' states instead (shards.describe_work; "unfinished" is true)."""
    if not (Path(path) / st.META).is_file():
        work = Path(path) if (Path(path) / shards.PLAN).is_file() else shards.work_dir(path)
        if (work / shards.PLAN).is_file():
            return shards.describe_work(work)
    store = st.TokenStore(path)
    meta = store.meta
    lengths = store.lengths()
    size = sum(f.stat().st_size for f in store.path.rglob("*")
               if f.is_file() and st.EVAL not in f.relative_to(store.path).parts)
    info: dict[str, Any] = {
        "path": str(store.path), "format": meta["format"], "documents": len(store), "tokens": store.num_tokens,
        "dtype": meta["dtype"], "loss_mask": meta.get("loss_mask"), "vocab_size": store.vocab_size,
        "fingerprint": store.fingerprint, "tokenizer": meta["tokenizer"].get("path"),
        "skipped_empty": meta["skipped_empty"], "skipped_bad_lines": meta["skipped_bad_lines"],
        "mean_document_tokens": float(lengths.mean()) if len(lengths) else 0.0,
        "max_document_tokens": int(lengths.max()) if len(lengths) else 0,
        "bytes_on_disk": size, "parts": len(meta["parts"]), "eval": meta.get("eval"),
    }
    n = len(store)
    if n == 0:
        if document != 0:
            raise SpecError(f"--document {document}: the store has no documents")
        info["sample"] = None
        return info
    if not -n <= document < n:  # negative: counting from the end, as Python does
        raise SpecError(f"--document {document}: the store has {n:,} documents, so --document takes 0 to {n - 1} "
                        f"(or -{n} to -1, counting from the end)")
    document %= n
    tokens = store[document]
    mask = store.loss_mask(document)
    sample: dict[str, Any] = {"document": document, "tokens": len(tokens), "first_ids": tokens[:16].tolist()}
    encoder, note = _decoder(tokenizer, store)
    if encoder is None:
        sample["text"] = None
        sample["note"] = note
    else:
        if encoder.fingerprint != store.fingerprint:
            sample["note"] = "decoded with a tokenizer whose fingerprint differs from the store's"
        ids = tokens.tolist()
        if store.has_loss_mask:
            shown, marks = ids[:max_tokens], mask[:max_tokens].tolist()
            sample["token_mask"] = [[t, encoder.decode([t]), m] for t, m in zip(shown, marks)]
            sample["segments"] = loss_segments(encoder, shown, marks)
        if store.has_loss_mask and not meta.get("chat"):  # one prompt, one response
            prompt_end = int(np.argmax(mask)) if mask.any() else len(ids)
            sample["prompt"] = encoder.decode(ids[:prompt_end][:max_tokens])
            sample["response"] = encoder.decode(ids[prompt_end:][:max_tokens])
        sample["text"] = encoder.decode(ids[:max_tokens])
        sample["truncated"] = len(ids) > max_tokens
    info["sample"] = sample
    return info


def _decoder(tokenizer: str | Path | None, store: st.TokenStore) -> tuple[Encoder | None, str | None]:
    """The tokenizer to decode the store with (the given one, else the store's own), or why there is
    none. One with fewer ids than the store holds is refused when given (its decode would index past
    its vocabulary), noted when it is the store's own tokenizer changed on disk since."""
    made_with = store.meta["tokenizer"].get("path")
    try:
        encoder = Encoder(tokenizer or made_with)
    except SpecError as e:
        return None, f"not decoded: {e}; pass --tokenizer"
    top = int(store.meta.get("max_token_id", store.vocab_size - 1))
    if encoder.vocab_size > top:
        return encoder, None
    if tokenizer:
        raise SpecError(f"--tokenizer {tokenizer} has {encoder.vocab_size:,} ids, but the store holds token id {top:,} "
                        f"(it was made with a vocabulary of {store.vocab_size:,}); pass the tokenizer the store was "
                        f"made with ({made_with})")
    return None, (f"not decoded: {made_with} has {encoder.vocab_size:,} ids now, fewer than the store's; "
                  f"pass --tokenizer")


def loss_segments(encoder: Encoder, ids: list[int], mask: list[int]) -> list[dict[str, Any]]:
    """The tokens in runs of equal loss mask, each run decoded: what is trained on, what is not."""
    segments: list[dict[str, Any]] = []
    start = 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            segments.append({"target": bool(mask[start]), "tokens": end - start, "text": encoder.decode(ids[start:end])})
            start = end
    return segments
