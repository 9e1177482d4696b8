"""`data prepare`: input files -> records -> Examples -> tokens -> a token store.

The pipeline streams: the main process reads the files in chunks of about a megabyte (JSON lines
stay raw bytes), worker processes parse, template and tokenise each chunk, and the main process
writes the chunks' tokens in input order. At most two chunks per worker are in flight, so memory
does not grow with the corpus, and the store is the same byte for byte whatever --workers is.

An INPUT may be a directory: its files (recursively, hidden ones left out) in sorted order. What is
read can be a byte range of a JSON-lines file (a Piece): sharded preparation (shards.py) gives each
array task its pieces and runs the same chunk pipeline over them.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import shutil
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from llamajobs.data import formats as fmts, mcq
from llamajobs.data import readers
from llamajobs.data import hf_datasets as hf
from llamajobs.data import store as st
from llamajobs.data.chat import ChatEncoder, ChatOptions, RenderError
from llamajobs.data.encoder import Encoder, TextCodec, common_prefix, framed
from llamajobs.data.pairs import PairEncoder, pair_chat_encoder
from llamajobs.errors import SpecError

CHUNK_BYTES = 1 << 20
CHUNK_RECORDS = 4096  # parsed records (JSON lists, documents) have no byte size; cap them by count
BAD_LINE_EXAMPLES = 10  # how many skipped lines meta.json quotes
# Tokenizing is CPU-bound: more processes than a few per CPU only add memory and start-up time, and
# a typo (--workers 10000) would start a process storm.
MAX_WORKERS = 4 * (os.cpu_count() or 1)
# Holding out more than half of the documents is a typo (0.9 for 0.09), not an evaluation split.
MAX_EVAL_FRACTION = 0.5


# --- configuration ---


@dataclass(frozen=True, kw_only=True, slots=True)
class PrepareConfig:
    inputs: tuple[Path, ...]
    tokenizer: Path
    out: Path
    format: str = "text"
    workers: int = 1
    skip_bad_lines: bool = False
    eval_fraction: float = 0.0
    force: bool = False  # replace an existing --out (once the new store is complete)
    chunk_bytes: int = CHUNK_BYTES
    chat_template: str | None = None  # chat formats: a named template instead of the tokenizer's own
    train_on: str = "assistant"       # chat formats: the loss covers assistant turns, or all of them
    max_length: int = 512             # preference pairs: each answer with its prompt at most this many tokens

    def __post_init__(self) -> None:
        if not self.inputs:
            raise SpecError("INPUT: give at least one file")
        for path in self.inputs:
            if not Path(path).exists():  # not is_file(): a named pipe is fine
                raise SpecError(f"INPUT {path}: no such file or directory")
            if Path(path).is_dir() and not _files_under(Path(path)):
                raise SpecError(f"INPUT {path}: a directory without files")
        fmts.get_format(self.format)  # an unknown --format is refused here, before any work
        if not fmts.get_format(self.format).chat and (self.chat_template or self.train_on != "assistant"):
            raise SpecError(f"--chat-template and --train-on are for --format messages or sharegpt, "
                            f"not --format {self.format}")
        self.chat_options()  # an unknown --chat-template or --train-on is refused here too
        if fmts.get_format(self.format).pairs and self.train_on != "assistant":
            raise SpecError("--train-on all is not for --format preference: DPO scores the answers only")
        if self.max_length < 8:
            raise SpecError(f"--max-length {self.max_length}: must be 8 or more (tokens of a prompt and its answer)")
        if not 1 <= self.workers <= MAX_WORKERS:
            raise SpecError(f"--workers {self.workers}: must be 1 to {MAX_WORKERS} (4 per CPU of this machine)")
        if not 0 <= self.eval_fraction <= MAX_EVAL_FRACTION:
            raise SpecError(f"--eval-fraction {self.eval_fraction}: must be 0 to {MAX_EVAL_FRACTION} (the share "
                            f"of documents held out for evaluation)")
        if Path(self.out).exists() and not self.force:
            raise SpecError(f"--out {self.out} already exists; choose another directory or pass --force to replace it")
        st.check_replaceable(Path(self.out), (*self.inputs, self.tokenizer))

    def chat_options(self) -> ChatOptions | None:
        if not fmts.get_format(self.format).chat:
            return None
        return ChatOptions(self.chat_template, self.train_on)


def resolve_inputs(inputs: Sequence[str | Path]) -> tuple[Path, ...]:
    """The input files: a file as given, a directory as its files (recursively, sorted by their
    path inside it, names starting with a dot left out). A `save_to_disk` folder, given or found
    inside a directory, is one input: its arrow files together (a DatasetDict's train split)."""
    files: list[Path] = []
    for path in map(Path, inputs):
        files.extend(_files_under(path) if path.is_dir() and not hf.is_saved_dataset(path) else [path])
    return tuple(hf.training_split(f) if hf.is_saved_dataset(f) else f for f in files)


def _files_under(directory: Path) -> list[Path]:
    """The files under a directory, and the saved datasets, whose files are not records of their own
    (their state.json and dataset_info.json are metadata; a DatasetDict's test split is not trained on)."""
    found = []
    for root, dirs, names in os.walk(directory):
        saved = [d for d in dirs if not d.startswith(".") and hf.is_saved_dataset(Path(root) / d)]
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in saved]
        found.extend(Path(root) / n for n in [*names, *saved] if not n.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(directory).parts)


# --- chunks: what the main process reads and a worker encodes ---


@dataclass(frozen=True, slots=True)
class Piece:
    """What one reader reads of an input: the whole file (with the format's own reader: gzip, JSON
    lists and documents), or bytes [start, end) of a JSON-lines file, cut at line starts."""
    source: int                      # index into the inputs
    start: int
    end: int                         # the file's size for a whole file (when it was planned)
    whole: bool

    @property
    def bytes(self) -> int:
        return self.end - self.start


@dataclass(slots=True)
class Chunk:
    source: int                      # index into the inputs
    records: list[tuple[int, Any]]   # (line, raw JSON line bytes or a parsed record)
    position: int                    # input bytes read when the chunk was cut (all pieces)
    piece: int = 0                   # index into the pieces read; lines count from the piece's start


@dataclass(slots=True)
class Encoded:
    tokens: np.ndarray               # uint32, the documents end to end (BOS ... EOS each)
    lengths: np.ndarray              # int64, one per document
    mask: np.ndarray | None          # uint8 aligned with tokens (instruction formats)
    held_out: np.ndarray | None      # bool per document: goes to the eval split
    bad: list[tuple[int, str]]       # (line, reason) of records that did not fit the format
    empty: int                       # documents with no text, skipped
    truncated: int = 0               # preference pairs cut to --max-length


def whole_files(inputs: Sequence[Path]) -> list[Piece]:
    return [Piece(i, 0, hf.input_bytes(p), True) for i, p in enumerate(inputs)]


def read_chunks(inputs: Sequence[Path], fmt: fmts.Format, chunk_bytes: int = CHUNK_BYTES,
                pieces: Sequence[Piece] | None = None) -> Iterator[Chunk]:
    """The records of the pieces (default: every input whole) in order, cut into chunks of about
    chunk_bytes of input. A chunk's lines count from its piece's start (see line_base)."""
    done = 0
    for number, piece in enumerate(whole_files(inputs) if pieces is None else pieces):
        path = Path(inputs[piece.source])
        if piece.whole and hf.is_dataset_input(path):  # parquet, arrow, csv, save_to_disk: via `datasets`
            f = raw = hf.DatasetReader(path)
            lines = iter(raw)
        elif piece.whole:
            f, raw = readers.open_binary(path)
            lines = readers.records(path, f, fmt)
        else:
            f = raw = LineRange(path, piece.start, piece.end)
            lines = iter(raw)
        with f:
            records: list[tuple[int, Any]] = []
            size = 0
            try:
                for line, payload in lines:
                    if not isinstance(payload, bytes):  # parsed here: it is copied to a worker as it is
                        payload = readers.checked(payload)
                    records.append((line, payload))
                    size += len(payload) if isinstance(payload, bytes) else chunk_bytes // CHUNK_RECORDS
                    if size >= chunk_bytes:
                        yield Chunk(piece.source, records, done + raw.position, number)
                        records, size = [], 0
            except readers.FileError as e:  # not skippable: nothing after it can be read
                raise SpecError(f"{e.path}:{e.line}: {e.reason}") from None
            except (OSError, EOFError) as e:  # a truncated or corrupt .gz
                raise SpecError(f"INPUT {path}: cannot be read ({e})") from None
            if records:
                yield Chunk(piece.source, records, done + raw.position, number)
        done += piece.bytes


class LineRange:
    """The lines starting in bytes [start, end) of a file (start at a line start): (line number
    counted from start, the line's bytes), blank lines left out; `position` is the bytes read."""

    def __init__(self, path: Path, start: int, end: int) -> None:
        self.f = open(path, "rb", buffering=1 << 20)
        self.f.seek(start)
        self.start, self.end = start, end
        self.position = 0

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        number = 0
        while self.start + self.position < self.end:
            line = self.f.readline()
            if not line:
                return
            self.position += len(line)
            number += 1
            if line.strip():
                yield number, line

    def __enter__(self) -> LineRange:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.f.close()


def line_base(path: Path, offset: int, block: int = 1 << 20) -> int:
    """Lines before byte `offset` of a file: a piece's line n is the file's line base + n. Read only
    when a bad line needs its file line (streamed: memory of one block)."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            data = f.read(min(block, offset))
            if not data:
                break
            count += data.count(b"\n")
            offset -= len(data)
    return count


def held_out(key: str, fraction: float) -> bool:
    """Deterministic eval membership: the key's hash as a number in [0, 1) is below the fraction."""
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


class ChunkEncoder:
    """Parse, template and tokenise chunks (in a worker process, or in the main one with --workers 1)."""

    def __init__(self, codec: TextCodec, format: str, options: list[Any], eval_fraction: float,
                 chat: ChatOptions | ChatEncoder | None = None, max_length: int = 0) -> None:
        self.codec = codec
        self.fmt = fmts.get_format(format)
        self.options = options
        self.eval_fraction = eval_fraction
        if self.fmt.pairs:  # the main process's encoder, or None: pairs rendered as plain text
            self.chat = None
            self.pairs = PairEncoder(codec, chat if isinstance(chat, ChatEncoder) else None, max_length)
        else:
            self.pairs = None
            if isinstance(chat, ChatEncoder) or not self.fmt.chat:  # one built by the main process: no transformers here
                self.chat = chat
            else:
                self.chat = ChatEncoder(codec.path, chat or ChatOptions())

    def __call__(self, chunk: Chunk) -> Encoded:
        if self.fmt.pairs:
            return self._encoded_pairs(chunk)
        examples: list[fmts.Example] = []
        chats: list[tuple[np.ndarray, np.ndarray]] = []  # chat formats: each example's (ids, mask)
        bad: list[tuple[int, str]] = []
        empty = 0
        for line, payload in chunk.records:
            try:
                found = self.fmt.examples(readers.parse_record(payload), self.options[chunk.source])
                rendered = [self.chat.encode(e.turns) for e in found if e.response.strip()] if self.chat else []
            except (fmts.BadRecord, RenderError) as e:
                bad.append((line, str(e)))
                continue
            chats.extend(rendered)
            for example in found:
                if example.response.strip():
                    examples.append(example)
                else:
                    empty += 1
        if self.chat is not None:
            return self._encoded_chats(examples, chats, bad, empty)
        ids = self.codec.encode([e.prompt + e.response for e in examples])
        lengths = np.fromiter(map(len, ids), np.int64, len(ids)) + 2
        tokens = framed(ids, self.codec.bos_id, self.codec.eos_id)
        mask = None
        if self.fmt.instruct:
            mask = np.ones(len(tokens), np.uint8)
            prompts = self.codec.encode([e.prompt for e in examples])
            start = 0
            for doc, prompt, length in zip(ids, prompts, lengths):
                mask[start:start + 1 + common_prefix(doc, prompt)] = 0  # BOS and the prompt
                start += int(length)
        held = None
        if self.eval_fraction > 0:
            held = np.fromiter((held_out(e.split_key(), self.eval_fraction) for e in examples), bool, len(examples))
        return Encoded(tokens, lengths, mask, held, bad, empty)

    def _encoded_chats(self, examples: list[fmts.Example], chats: list[tuple[np.ndarray, np.ndarray]],
                       bad: list[tuple[int, str]], empty: int) -> Encoded:
        """Rendered conversations come framed already (BOS first, EOS last) with their own masks."""
        lengths = np.fromiter((len(ids) for ids, _ in chats), np.int64, len(chats))
        tokens = np.concatenate([ids for ids, _ in chats]) if chats else np.zeros(0, np.uint32)
        mask = np.concatenate([m for _, m in chats]) if chats else np.zeros(0, np.uint8)
        held = None
        if self.eval_fraction > 0:
            held = np.fromiter((held_out(e.split_key(), self.eval_fraction) for e in examples), bool, len(examples))
        return Encoded(tokens, lengths, mask, held, bad, empty)


    def _encoded_pairs(self, chunk: Chunk) -> Encoded:
        """Preference pairs: two documents per pair, chosen then rejected, each the prompt and one answer
        (the loss mask on the answer), cut to max_length together (pairs.truncate_pair)."""
        pairs: list[fmts.Pair] = []
        docs: list[tuple[list[int], list[int]]] = []
        bad: list[tuple[int, str]] = []
        truncated = 0
        assert isinstance(self.fmt, fmts.Preference) and self.pairs is not None
        for line, payload in chunk.records:
            try:
                pair = self.fmt.pair(readers.parse_record(payload))
                encoded, cut = self.pairs.encode(pair)
            except (fmts.BadRecord, RenderError) as e:
                bad.append((line, str(e)))
                continue
            truncated += cut
            pairs.append(pair)
            docs.extend(encoded)
        lengths = np.fromiter((len(ids) for ids, _ in docs), np.int64, len(docs))
        tokens = np.fromiter(chain.from_iterable(ids for ids, _ in docs), np.uint32, int(lengths.sum()))
        mask = np.fromiter(chain.from_iterable(m for _, m in docs), np.uint8, int(lengths.sum()))
        held = None
        if self.eval_fraction > 0:  # per pair, so both answers land in the same split
            held = np.repeat(np.fromiter((held_out(p.split_key(), self.eval_fraction) for p in pairs), bool,
                                         len(pairs)), 2)
        return Encoded(tokens, lengths, mask, held, bad, 0, truncated)


_worker: ChunkEncoder | None = None


def _init_worker(*args: Any) -> None:
    global _worker
    _worker = ChunkEncoder(*args)


def _encode_in_worker(chunk: Chunk) -> Encoded:
    assert _worker is not None
    return _worker(chunk)


def useful_workers(workers: int, input_bytes: int | None, chunk_bytes: int) -> int:
    """The tokenizing processes worth starting: no more than the CPUs this process may use (more only
    share them, and each costs its start-up and memory), nor than the chunks the input makes when its
    bytes are known (a worker without a chunk is start-up for nothing; compressed and dataset inputs
    and pipes: unknown). One means no pool: the main process encodes."""
    chunks = -(-input_bytes // chunk_bytes) if input_bytes else workers
    return max(1, min(workers, len(os.sched_getaffinity(0)), chunks))


def encode_chunks(chunks: Iterator[Chunk], args: tuple, workers: int) -> Iterator[tuple[Chunk, Encoded]]:
    """(chunk, its encoding) in input order; args are ChunkEncoder's (the TextCodec first). Workers > 1:
    a process pool with at most 2 chunks per worker in flight (Pool.imap would read ahead without bound)."""
    if workers == 1:
        encode = ChunkEncoder(*args)
        for chunk in chunks:
            yield chunk, encode(chunk)
        return
    # spawn, not fork: the main process has threads (the progress display) that fork could deadlock
    with multiprocessing.get_context("spawn").Pool(workers, _init_worker, args) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append((Chunk(chunk.source, [], chunk.position, chunk.piece),
                            pool.apply_async(_encode_in_worker, (chunk,))))
            if len(pending) >= 2 * workers:
                done, result = pending.popleft()
                yield done, result.get()
        while pending:
            done, result = pending.popleft()
            yield done, result.get()


# --- the pipeline ---


@dataclass(slots=True)
class Progress:
    bytes_read: int
    total_bytes: int
    documents: int
    tokens: int
    elapsed_s: float
    label: str = "tokenizing"  # sharded: how many shards are done, running, queued


@dataclass(slots=True)
class Counts:
    empty: int = 0
    bad: int = 0
    truncated: int = 0  # preference pairs cut to --max-length
    bad_examples: list[str] = field(default_factory=list)
    per_source: list[int] = field(default_factory=list)


def prepare(config: PrepareConfig, progress: Callable[[Progress], None] | None = None) -> dict[str, Any]:
    """Write the token store config.out; returns its meta.json (with the eval split's under "eval").

    Bad input raises SpecError naming file:line (unless skip_bad_lines); any failure removes the
    staging directory, and an existing store is untouched until the new one is complete.
    """
    started = time.perf_counter()
    fmt = fmts.get_format(config.format)
    encoder = Encoder(config.tokenizer)
    inputs = resolve_inputs(config.inputs)
    options = [scan_options(fmt, path) for path in inputs]
    dtype = st.token_dtype(encoder.vocab_size)
    total_bytes = sum(hf.input_bytes(p) for p in inputs)
    out = Path(config.out)
    tmp = st.staging_dir(out)
    try:
        train = st.PartWriter(tmp / st.part_name(0), dtype, fmt.instruct)
        held = st.PartWriter(tmp / st.EVAL / st.part_name(0), dtype, fmt.instruct) if config.eval_fraction else None
        counts = Counts(per_source=[0] * len(inputs))
        # Chat: the encoder is built here (no chat template is refused before any work) and goes to the
        # workers. Preference pairs are rendered with a chat template when there is one, else as plain text.
        if fmt.pairs:
            chat = pair_chat_encoder(encoder.path, config.chat_options() or ChatOptions())
        else:
            chat = ChatEncoder(encoder.path, config.chat_options()) if config.chat_options() is not None else None
        args = (encoder.codec, config.format, options, config.eval_fraction, chat, config.max_length if fmt.pairs else 0)
        plain = not any(p.suffix == ".gz" or hf.is_dataset_input(p) for p in inputs)  # bytes read = chunk bytes
        workers = useful_workers(config.workers, total_bytes if plain else None, config.chunk_bytes)
        for chunk, enc in encode_chunks(read_chunks(inputs, fmt, config.chunk_bytes), args, workers):
            check_bad_lines(enc.bad, inputs[chunk.source], fmt, config.skip_bad_lines, counts)
            counts.empty += enc.empty
            counts.truncated += enc.truncated
            counts.per_source[chunk.source] += len(enc.lengths)
            write_encoded(train, held, enc)
            if progress:
                progress(Progress(chunk.position, total_bytes, train.documents + (held.documents if held else 0),
                                  train.tokens + (held.tokens if held else 0), time.perf_counter() - started))
        if train.documents + (held.documents if held else 0) == 0:
            raise SpecError(f"INPUT {', '.join(map(str, inputs))}: no documents ({counts.empty} empty, "
                            f"{counts.bad} bad lines skipped); is --format {fmt.name} right?")
        check_training_split(train.documents, held.documents if held else 0, config.eval_fraction)
        common = common_meta(fmt, dtype, encoder.describe(), inputs, counts.per_source, config.eval_fraction)
        if chat is not None:
            common["chat"] = {"template": config.chat_template or "tokenizer", "train_on": config.train_on,
                              "encoding": st.CHAT_ENCODING}
        if fmt.pairs:  # documents 2k and 2k + 1 are pair k's chosen and rejected answers
            common["pairs"] = {"max_length": config.max_length, "truncated": counts.truncated}
        meta = store_meta([train.close()], common, counts)
        if held is not None:
            eval_meta = store_meta([held.close()], {**common, "split": "eval"}, Counts())
            st.write_json(tmp / st.EVAL / st.META, eval_meta)
            meta["eval"] = {"path": st.EVAL, "documents": eval_meta["documents"], "tokens": eval_meta["tokens"]}
        st.write_json(tmp / st.META, meta)  # last: a directory with meta.json is a finished store
        st.commit(tmp, out, replace=config.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def check_training_split(train_documents: int, eval_documents: int, eval_fraction: float) -> None:
    """Refuse a store with nothing to train on: the eval split took every document (a training job
    on it would only fail on the node)."""
    if train_documents == 0 and eval_documents:
        raise SpecError(f"--eval-fraction {eval_fraction}: all {eval_documents} documents went to the eval split "
                        f"(by a hash of each document's id or text), none is left to train on; lower --eval-fraction "
                        f"or give more documents")


def eval_split_warning(meta: dict[str, Any]) -> str | None:
    """A line for the user when --eval-fraction held out nothing (few documents, or few distinct ids)."""
    held = meta.get("eval")
    if held is None or held["documents"]:
        return None
    return (f"warning: --eval-fraction {meta['eval_fraction']} held out none of the {meta['documents']:,} documents "
            f"(the split is by a hash of each document's id or text): the eval split is empty and no validation loss "
            f"will be measured; raise --eval-fraction or give more documents")


def scan_options(fmt: fmts.Format, path: Path) -> Any:
    """The format's per-file options (MedMCQA's answer numbering), from a first pass over the file."""
    if not fmt.needs_scan:
        return None
    try:
        if hf.is_dataset_input(path):
            with hf.DatasetReader(path) as reader:
                return fmt.scan(iter(reader))
        return fmt.scan(readers.iter_records(path, fmt))
    except readers.FileError as e:
        raise SpecError(f"{e.path}:{e.line}: {e.reason}") from None
    except mcq.NumberingError as e:  # MedMCQA's cop both 0 and 4: no numbering fits, no line to skip
        raise SpecError(f"{path}:{e.where}: {e}") from None


def check_bad_lines(bad: list[tuple[int, str]], path: Path, fmt: fmts.Format, skip: bool, counts: Counts,
                    base: int = 0) -> None:
    """Raise SpecError at the first bad line, or (skip) count them and keep the first few; a
    line is the file's line base + the chunk's line."""
    for line, reason in bad:
        where = f"{path}:{base + line}: {reason}"
        if not skip:
            hint = f"--format {fmt.name} expects {fmt.expects}" if "field" in reason or "object" in reason else ""
            raise SpecError(f"{where}; {hint + '; ' if hint else ''}pass --skip-bad-lines to skip such lines")
        counts.bad += 1
        if len(counts.bad_examples) < BAD_LINE_EXAMPLES:
            counts.bad_examples.append(where)


def write_encoded(train: st.PartWriter, held: st.PartWriter | None, enc: Encoded) -> None:
    if held is None or enc.held_out is None or not enc.held_out.any():
        train.write(enc.tokens, enc.lengths, enc.mask)
        return
    doc_of_token = np.repeat(enc.held_out, enc.lengths)
    for writer, docs, toks in ((train, ~enc.held_out, ~doc_of_token), (held, enc.held_out, doc_of_token)):
        writer.write(enc.tokens[toks], enc.lengths[docs], None if enc.mask is None else enc.mask[toks])


def common_meta(fmt: fmts.Format, dtype: str, tokenizer: dict[str, Any], inputs: Sequence[Path],
                per_source: list[int], eval_fraction: float) -> dict[str, Any]:
    return {"format": fmt.name, "dtype": dtype, "loss_mask": "uint8" if fmt.instruct else None,
            "tokenizer": tokenizer, "vocab_size": tokenizer["vocab_size"],
            "sources": [{"path": str(Path(p).resolve()), "bytes": hf.input_bytes(p), "documents": n}
                        for p, n in zip(inputs, per_source)],
            "eval_fraction": eval_fraction}


def store_meta(parts: list[dict[str, Any]], common: dict[str, Any], counts: Counts) -> dict[str, Any]:
    return {"kind": st.KIND, "format_version": st.FORMAT_VERSION, **common,
            "documents": sum(p["documents"] for p in parts), "tokens": sum(p["tokens"] for p in parts),
            "max_token_id": max((p["max_token_id"] for p in parts), default=-1),
            "skipped_empty": counts.empty, "skipped_bad_lines": counts.bad, "bad_line_examples": counts.bad_examples,
            "parts": parts}
