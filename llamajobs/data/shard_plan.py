"""The plan of a sharded `data prepare` and one shard of it: how the inputs are cut into shards of
about equal bytes (plan.json in the work directory), and what each array task runs to prepare its
shard (run_shard). See data/sharded_prepare.py for the whole.

Fault injection for tests, in the tasks' environment: LLAMAJOBS_DATA_FAULT=crash:K (shard K raises
after writing its first chunk), kill:K (shard K SIGKILLs itself there), stall:K:S (it sleeps S s there).
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import signal
import time
import traceback
import uuid
from bisect import bisect_right
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Sequence

from llamajobs.data import formats as fmts
from llamajobs.data import readers
from llamajobs.data import hf_datasets
from llamajobs.data.chat import ChatEncoder, ChatOptions
from llamajobs.data import prepare as prep
from llamajobs.data import store as st
from llamajobs.data.shards import (PLAN, PLAN_KIND, PROGRESS, SHARDS_DIR, SLOTS_DIR, WORK_DIR, HEARTBEAT_S,
                                   failed_path, maybe_json, marker_path, node_name, plan_inputs, read_json,
                                   read_marker, shard_name, task_job_id, work_dir, write_json_atomic)
from llamajobs.errors import Failure, SpecError

FAULT_ENV = "LLAMAJOBS_DATA_FAULT"


# --- the plan ---


def splittable(path: Path, fmt: fmts.Format, limit: int = 1 << 24) -> bool:
    """Whether a file is JSON lines that can be cut at any line start (as readers.records reads it):
    not gzip, not a JSON list, not a whole-file document of a format that has them."""
    if path.suffix == ".gz" or not path.is_file() or hf_datasets.is_dataset_input(path):
        return False
    with open(path, "rb") as f:
        first = b""
        while not first.strip():
            first = f.readline(limit)
            if not first:
                return False
    if first.lstrip()[:1] == b"[":
        return False
    try:
        json.loads(first)
        return True
    except ValueError:
        return type(fmt).expand is fmts.Format.expand  # JSON lines whose first line is bad


def line_start(path: Path, offset: int) -> int:
    """The first line start at or after `offset` (the file's size when there is none)."""
    if offset <= 0:
        return 0
    with open(path, "rb") as f:
        f.seek(offset - 1)
        return offset - 1 + len(f.readline())


def split(sizes: Sequence[int], cuttable: Sequence[bool], shards: int,
          align: Callable[[int, int], int]) -> list[list[prep.Piece]]:
    """Cut files of these sizes, in order, into at most `shards` contiguous runs of pieces of about
    equal bytes. A cuttable file is cut at align(file, offset) (the line start at or after it); a
    file that is not stays whole, with the cut at whichever of its ends is nearer. Runs that would be
    empty (fewer whole files than shards) are left out."""
    starts = list(accumulate(sizes, initial=0))
    total = starts[-1]
    if total == 0:
        return []
    bounds = [(0, 0)]  # (file, offset): where each shard starts; (len(sizes), 0) is the end
    for k in range(1, shards):
        target = total * k // shards
        i = bisect_right(starts, target) - 1  # the file holding byte `target` (zero-size files skipped)
        local = target - starts[i]
        if cuttable[i]:
            offset = align(i, local)
            bound = (i, offset) if offset < sizes[i] else (i + 1, 0)
        else:
            bound = (i, 0) if 2 * local < sizes[i] else (i + 1, 0)
        bounds.append(max(bound, bounds[-1]))
    bounds.append((len(sizes), 0))
    runs = []
    for (i, a), (j, b) in zip(bounds, bounds[1:]):
        pieces = []
        for f in range(i, min(j, len(sizes) - 1) + 1):
            start, end = (a if f == i else 0), (b if f == j else sizes[f])
            if end > start:
                pieces.append(prep.Piece(f, start, end, start == 0 and end == sizes[f]))
        if pieces:
            runs.append(pieces)
    return runs


def settings_of(config: prep.PrepareConfig, shards: int, inputs: Sequence[Path], fingerprint: str) -> dict[str, Any]:
    """What decides a shard's output: a rerun must match the plan's settings to reuse its shards."""
    return {"inputs": [{"path": str(p.resolve()), "bytes": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns}
                       for p in inputs],
            "tokenizer_fingerprint": fingerprint, "format": config.format, "eval_fraction": config.eval_fraction,
            "skip_bad_lines": config.skip_bad_lines, "shards": shards,
            **({"chat_template": config.chat_template, "train_on": config.train_on,
                "chat_encoding": st.CHAT_ENCODING} if config.chat_options() else {})}


def make_plan(config: prep.PrepareConfig, shards: int, encoder: prep.Encoder) -> dict[str, Any]:
    fmt = fmts.get_format(config.format)
    inputs = prep.resolve_inputs(config.inputs)
    sizes = [hf_datasets.input_bytes(p) for p in inputs]
    runs = split(sizes, [splittable(p, fmt) for p in inputs], shards, lambda i, offset: line_start(inputs[i], offset))
    if not runs:
        raise SpecError(f"INPUT {', '.join(map(str, config.inputs))}: empty; nothing to prepare")
    return {"kind": PLAN_KIND, "version": 1, "id": uuid.uuid4().hex,  # markers name it: a stale job's are not taken
            "settings": settings_of(config, shards, inputs, encoder.fingerprint),
            "given": [str(p) for p in inputs],  # as the user named them: for messages
            "tokenizer": encoder.describe(), "dtype": st.token_dtype(encoder.vocab_size),
            "options": [prep.scan_options(fmt, p) for p in inputs],
            "shards": [{"pieces": [[p.source, p.start, p.end, p.whole] for p in run],
                        "bytes": sum(p.bytes for p in run)} for run in runs]}


def shard_pieces(plan: dict[str, Any], index: int) -> list[prep.Piece]:
    return [prep.Piece(*p) for p in plan["shards"][index]["pieces"]]


def open_work(config: prep.PrepareConfig, shards: int, encoder: prep.Encoder) -> tuple[Path, dict[str, Any]]:
    """The work directory and its plan: the existing one when its settings match this command's
    (else SpecError, or with --force a fresh start), or a new one."""
    work = work_dir(config.out)
    plan_path = work / PLAN
    plan = maybe_json(plan_path)
    if _ours(plan):
        wanted = settings_of(config, shards, prep.resolve_inputs(config.inputs), encoder.fingerprint)
        differ = [k for k in wanted if plan["settings"].get(k) != wanted[k]]
        if not differ:
            return work, plan
        if not config.force:
            raise SpecError(f"{work} holds an unfinished preparation made with other {_differences(differ)}; "
                            f"rerun with its arguments to finish it (`llamajobs data inspect {config.out}` shows "
                            f"them), or pass --force to discard it and start over")
    elif not _only_a_start(work):
        raise SpecError(f"{work} exists and holds no preparation of llamajobs (no plan.json of its own); it is left "
                        f"as it is: move it away or choose another --out")
    if work.exists() and (given := st.held_input(work, config.inputs)) is not None:
        raise SpecError(f"INPUT {given} is inside {work}, which a sharded preparation discards; move it")
    shutil.rmtree(work, ignore_errors=True)  # ours: discarded with --force, or a start stopped before its plan
    plan = make_plan(config, shards, encoder)
    for d in (work / SHARDS_DIR, work / WORK_DIR):
        d.mkdir(parents=True)
    write_json_atomic(plan_path, plan)
    return work, plan


def _ours(plan: Any) -> bool:
    return isinstance(plan, dict) and plan.get("kind") == PLAN_KIND and isinstance(plan.get("settings"), dict)


def _only_a_start(work: Path) -> bool:
    """Nothing there, or only what a start makes before its plan is in place: the empty folders and
    the plan's temporary file."""
    try:
        entries = list(work.iterdir())
    except FileNotFoundError:
        return True
    return all(e.name.startswith(f"{PLAN}.tmp-") and e.is_file()
               or e.name in (SHARDS_DIR, WORK_DIR) and e.is_dir() and not any(e.iterdir()) for e in entries)


def _differences(keys: list[str]) -> str:
    names = {"inputs": "inputs (files, sizes or modification times)", "tokenizer_fingerprint": "--tokenizer",
             "format": "--format", "eval_fraction": "--eval-fraction", "skip_bad_lines": "--skip-bad-lines",
             "shards": "--shards", "chat_template": "--chat-template", "train_on": "--train-on",
             "chat_encoding": "llamajobs version (how chat messages become ids)"}
    return ", ".join(names[k] for k in keys)



# --- one shard (what each array task runs) ---


def run_shard(workdir: str, index: int, workers: int = 1, chunk_bytes: int = prep.CHUNK_BYTES,
              slots: int = 0) -> dict[str, Any]:
    """Prepare shard `index` of the plan in `workdir` into part-K (and eval/part-K); returns its
    marker. A shard that has one is not redone. With slots > 0 (the local cluster, where every
    shard starts at once), it first waits for one of that many slots."""
    work = Path(workdir)
    plan = read_json(work / PLAN)
    done = read_marker(work, index, plan["id"])
    if done is not None:
        return done
    slot = _take_slot(work, slots)
    try:
        scratch = work / WORK_DIR / f"{shard_name(index)}.{node_name()}-{os.getpid()}"
        failed_path(work, index).unlink(missing_ok=True)
        try:
            return prepare_shard(work, plan, index, scratch, workers, chunk_bytes)
        except BaseException as e:
            write_json_atomic(failed_path(work, index), {
                "index": index, "plan": plan["id"], "error": str(e) or type(e).__name__, "type": type(e).__name__,
                "host": node_name(), "time": time.time(), "traceback": traceback.format_exc()[-4000:]})
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    finally:
        if slot is not None:
            slot.close()


def _take_slot(work: Path, slots: int) -> Any:
    """An open file holding an flock on one of `slots` slot files (released when it closes, or
    when the process dies), or None without slots."""
    if slots <= 0:
        return None
    directory = work / SLOTS_DIR
    directory.mkdir(exist_ok=True)
    while True:
        for i in range(slots):
            f = open(directory / f"slot-{i}.lock", "a")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return f
            except BlockingIOError:
                f.close()
        time.sleep(0.1)


def prepare_shard(work: Path, plan: dict[str, Any], index: int, scratch: Path, workers: int,
                  chunk_bytes: int) -> dict[str, Any]:
    started = time.perf_counter()
    settings = plan["settings"]
    fmt = fmts.get_format(settings["format"])
    inputs, pieces = plan_inputs(plan), shard_pieces(plan, index)
    encoder = prep.Encoder(plan["tokenizer"]["path"])
    if encoder.fingerprint != plan["tokenizer"]["fingerprint"]:
        raise SpecError(f"--tokenizer {plan['tokenizer']['path']} on {node_name()} has fingerprint "
                        f"{encoder.fingerprint[:16]}, but the plan was made with "
                        f"{plan['tokenizer']['fingerprint'][:16]}; the tokenizer must be the same file on every "
                        f"node (a shared filesystem)")
    eval_fraction = settings["eval_fraction"]
    name = st.part_name(index)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    train = st.PartWriter(scratch / name, plan["dtype"], fmt.instruct)
    held = st.PartWriter(scratch / st.EVAL / name, plan["dtype"], fmt.instruct) if eval_fraction else None
    counts = prep.Counts(per_source=[0] * len(inputs))
    bases: dict[int, int] = {}
    beat = _Heartbeat(scratch / PROGRESS, plan["id"], index, plan["shards"][index]["bytes"])
    fault = _fault(index)
    chat = None
    if fmt.chat:  # built once here and pickled to this shard's workers, which then import no transformers
        chat = ChatEncoder(encoder.path, ChatOptions(settings.get("chat_template"), settings.get("train_on", "assistant")))
    args = (encoder.codec, fmt.name, plan["options"], eval_fraction, chat)
    chunks = prep.read_chunks(inputs, fmt, chunk_bytes, pieces)
    for chunk, enc in prep.encode_chunks(chunks, args, workers):
        base = 0
        if enc.bad and pieces[chunk.piece].start > 0:  # a piece's lines count from its start
            piece = pieces[chunk.piece]
            base = bases.setdefault(chunk.piece, prep.line_base(inputs[piece.source], piece.start))
        prep.check_bad_lines(enc.bad, Path(plan["given"][chunk.source]), fmt, settings["skip_bad_lines"], counts,
                             base)
        counts.empty += enc.empty
        counts.per_source[chunk.source] += len(enc.lengths)
        prep.write_encoded(train, held, enc)
        documents = train.documents + (held.documents if held else 0)
        beat(chunk.position, documents, train.tokens + (held.tokens if held else 0))
        if fault:
            _inject(fault, train, held)
            fault = None
    part = train.close()
    held_part = held.close() if held is not None else None
    current = maybe_json(work / PLAN)
    if current is None or current["id"] != plan["id"]:
        raise Failure(f"{work} was restarted (--force) while shard {index} ran; this attempt is discarded")
    # publish: the parts into place (replacing what an attempt killed between these renames left),
    # then the marker, which makes the shard done
    for src, dst in ((scratch / name, work / name), (scratch / st.EVAL / name, work / st.EVAL / name)):
        if src.is_dir():
            shutil.rmtree(dst, ignore_errors=True)
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    marker = {
        "index": index, "plan": plan["id"], "part": part, "eval": held_part, "fingerprint": encoder.fingerprint,
        "bytes": plan["shards"][index]["bytes"], "empty": counts.empty, "bad": counts.bad,
        "bad_examples": counts.bad_examples,
        "per_source": {str(s): n for s, n in enumerate(counts.per_source) if n},
        "host": node_name(), "pid": os.getpid(), "job_id": task_job_id(),
        "workers": workers, "seconds": time.perf_counter() - started, "finished": time.time(),
        "peak_rss_bytes": me.ru_maxrss * 1024, "workers_peak_rss_bytes": children.ru_maxrss * 1024,
    }
    write_json_atomic(marker_path(work, index), marker)
    shutil.rmtree(scratch, ignore_errors=True)
    return marker


class _Heartbeat:
    """Rewrites the shard's progress.json at most every HEARTBEAT_S: what the coordinator's progress
    bar and `data inspect` read."""

    def __init__(self, path: Path, plan_id: str, index: int, total: int) -> None:
        self.path, self.last = path, 0.0
        self.info = {"index": index, "plan": plan_id, "host": node_name(), "pid": os.getpid(), "bytes": total,
                     "started": time.time()}
        self(0, 0, 0, force=True)

    def __call__(self, bytes_read: int, documents: int, tokens: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < HEARTBEAT_S:
            return
        self.last = now
        write_json_atomic(self.path, {**self.info, "bytes_read": bytes_read, "documents": documents,
                                      "tokens": tokens, "updated": time.time()})


def _fault(index: int) -> tuple[str, float] | None:
    value = os.environ.get(FAULT_ENV, "")
    if not value:
        return None
    kind, _, rest = value.partition(":")
    shard, _, arg = rest.partition(":")
    if kind not in ("crash", "kill", "stall") or not shard.isdigit():
        raise ValueError(f"{FAULT_ENV}={value!r}: expected crash:K, kill:K or stall:K:SECONDS")
    return (kind, float(arg or 5)) if int(shard) == index else None


def _inject(fault: tuple[str, float], *writers: st.PartWriter | None) -> None:
    for w in filter(None, writers):  # what was written so far reaches the disk, as in a real crash
        w.flush()
    kind, seconds = fault
    if kind == "crash":
        raise RuntimeError(f"{FAULT_ENV}: injected crash")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(seconds)


