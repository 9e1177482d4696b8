"""What `data prepare` returns to the CLI: a finished store (Prepared) or a sharded preparation still
under way (Unfinished). Frozen dataclasses whose fields are what the views show.

`to_json()` is the `--json` document: for a store, its meta.json as written (the store's own file
format, with keys that vary by format: chat settings, the eval split, a sharded run's statistics,
so it is kept whole rather than rebuilt from fields); for an unfinished preparation, the shards'
states (shards.describe_work). tests/test_result_snapshots.py freezes both shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, kw_only=True, slots=True)
class SplitCounts:
    documents: int
    tokens: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardedRun:
    """How a sharded preparation ran (meta.json's "preparation")."""
    shards: int
    shards_requested: int  # more than shards when whole files could not be split further
    cluster: str
    seconds: float
    merge_seconds: float


@dataclass(frozen=True, kw_only=True, slots=True)
class Pairs:
    """A preference store's pairs (documents 2k and 2k + 1: pair k's chosen and rejected answers)."""
    count: int
    max_length: int
    truncated: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Prepared:
    documents: int
    tokens: int
    dtype: str
    eval_split: SplitCounts | None  # None without --eval-fraction
    sharded: ShardedRun | None  # None when prepared in this process
    pairs: Pairs | None  # None but for --format preference
    skipped_empty: int
    skipped_bad_lines: int
    bad_line_examples: tuple[str, ...]
    meta: dict[str, Any]  # the store's meta.json

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Prepared:
        held, run = meta.get("eval"), meta.get("preparation")
        return cls(documents=meta["documents"], tokens=meta["tokens"], dtype=meta["dtype"],
                   eval_split=SplitCounts(documents=held["documents"], tokens=held["tokens"]) if held else None,
                   sharded=ShardedRun(**{k: run[k] for k in ("shards", "shards_requested", "cluster", "seconds",
                                                             "merge_seconds")}) if run else None,
                   skipped_empty=meta["skipped_empty"], skipped_bad_lines=meta["skipped_bad_lines"],
                   bad_line_examples=tuple(meta["bad_line_examples"]), meta=meta,
                   pairs=Pairs(count=meta["documents"] // 2, **meta["pairs"]) if meta.get("pairs") else None)

    def to_json(self) -> dict[str, Any]:
        return self.meta


@dataclass(frozen=True, kw_only=True, slots=True)
class Unfinished:
    """A sharded preparation that --no-wait left running, or whose shards have not all finished."""
    workdir: str
    counts: dict[str, int]  # shard state -> how many
    document: dict[str, Any]  # shards.describe_work's

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Unfinished:
        return cls(workdir=document["workdir"], counts=document["counts"], document=document)

    def to_json(self) -> dict[str, Any]:
        return self.document


def prepared(document: dict[str, Any]) -> Prepared | Unfinished:
    """The typed result of what prepare or prepare_sharded returned."""
    return Unfinished.from_json(document) if document.get("unfinished") else Prepared.from_meta(document)
