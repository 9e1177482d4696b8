"""Sharded `data prepare`: one array task per shard through submitit, restartable, merged into one store.

    llamajobs data prepare CORPUS... --tokenizer T --out DIR --shards N --cluster slurm|local

The plan cuts the inputs into N contiguous shards of about equal input bytes: JSON-lines files are
cut at line starts, gzip files and whole-file JSON (lists, LMFlow and PubMedQA documents) stay
whole, so a corpus of many .gz files is split by files. Shards follow the input order and the store
reads its parts end to end, so global document i is the same document as in a one-process prepare;
the eval split is decided per document (a hash of its id), so it is the same too. Each task streams
its pieces through prepare's chunk pipeline: its memory does not grow with the corpus or the shard.

Everything lives in the work directory DIR.parts (on the shared filesystem for SLURM):

    plan.json                       the settings (inputs with sizes and mtimes, tokenizer fingerprint,
                                    format, eval fraction) and each shard's pieces; written first
    jobs.json                       each command's submissions: shard -> cluster job id
    submitit/                       submitit's pickles and the tasks' logs
    work/shard-K.HOST-PID/          a shard in progress: its part(s) and progress.json (a heartbeat)
    slots/                          local cluster: flock slots bounding the shards that run at once
    part-K/, eval/part-K/           a finished shard's parts, moved into place
    shards/shard-K.json             the shard's completion marker: counts, tokenizer fingerprint,
                                    host, seconds, peak RSS; written after its parts are in place
    shards/shard-K.failed.json      why its latest attempt failed (removed when it is retried)

Markers, failures and heartbeats name the plan's id: a job of a plan discarded with --force that
still runs publishes nothing. A shard with a marker is never redone. Rerunning the command with the
same arguments adopts the shards whose jobs still run (SLURM: squeue; local: the controller's pid),
submits the missing ones, waits and merges. The merge checks every shard's tokenizer fingerprint against the plan's and each
part's files against its marker, writes eval/meta.json and meta.json (the parts stay as they are:
no token is copied), renames DIR.parts to DIR and removes the bookkeeping.

Fault injection for tests, in the tasks' environment: LLAMAJOBS_DATA_FAULT=crash:K (shard K raises
after writing its first chunk), kill:K (shard K SIGKILLs itself there), stall:K:S (it sleeps S s there).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import resource
import shutil
import signal
import socket
import time
import traceback
import uuid
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Sequence

from llamajobs.data import formats as fmts
from llamajobs.data import prepare as prep
from llamajobs.data import store as st
from llamajobs.errors import Failure, SpecError
from llamajobs.monitor import cmdline, is_local_controller

PLAN_KIND = "llamajobs sharded prepare"
PLAN, JOBS, PROGRESS = "plan.json", "jobs.json", "progress.json"
SHARDS_DIR, WORK_DIR, SUBMITIT_DIR, SLOTS_DIR = "shards", "work", "submitit", "slots"
CLUSTERS = ("slurm", "local")
HEARTBEAT_S = 1.0   # how often a shard rewrites its progress.json
STALE_S = 120.0     # a progress.json older than this: `data inspect` calls the shard stalled
FAULT_ENV = "LLAMAJOBS_DATA_FAULT"
LIVE_SLURM_STATES = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                     "REQUEUE_HOLD", "REQUEUE_FED", "SIGNALING", "STAGE_OUT"}


def work_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.parts")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


# --- configuration ---


@dataclass(frozen=True, kw_only=True, slots=True)
class ClusterConfig:
    """Where and how the shards run."""
    shards: int
    cluster: str = "local"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None           # each task's limit (SLURM syntax); None: the partition's MaxTime
    cpus_per_task: int | None = None  # default: the prepare's --workers
    mem: str | None = None            # SLURM --mem of each task; None: the cluster's default
    parallel: int | None = None       # local: shards running at once (default: CPUs / CPUs per task)
    wait: bool = True                 # wait for the shards and merge; else submit and return
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        if self.shards < 1:
            raise SpecError(f"--shards {self.shards}: must be at least 1")
        if self.cluster not in CLUSTERS:
            raise SpecError(f"--cluster {self.cluster!r}: shards run on {' or '.join(CLUSTERS)}")
        if self.time is not None:
            from llamajobs.spec import parse_slurm_time

            parse_slurm_time(self.time)
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SpecError(f"--cpus-per-task {self.cpus_per_task}: must be at least 1")
        if self.mem is not None and not re.match(r"^\d+[KMGT]?$", self.mem):
            raise SpecError(f"--mem {self.mem!r} is malformed; use SLURM's syntax: 4G, 16000")
        if self.parallel is not None and self.parallel < 1:
            raise SpecError(f"parallel {self.parallel}: must be at least 1")


def cluster_config(shards: int, **flags: Any) -> ClusterConfig:
    """A ClusterConfig from the flags given (None: not given), with the site profile's defaults for
    cluster, partition, account, qos and time; the cluster is otherwise slurm when `scontrol ping`
    answers, else local."""
    from llamajobs import site as site_mod

    _, defaults = site_mod.load()
    defaults = {k.replace("-", "_"): v for k, v in defaults.items()}
    values = {k: v for k, v in flags.items() if v is not None}
    for key in ("partition", "account", "qos", "time"):
        if key not in values and defaults.get(key) not in (None, ""):
            values[key] = str(defaults[key])
    if "cluster" not in values:
        if defaults.get("cluster") in CLUSTERS:
            values["cluster"] = defaults["cluster"]
        else:
            from llamajobs.submit import detect_cluster

            values["cluster"] = detect_cluster()
    return ClusterConfig(shards=shards, **values)


# --- the plan ---


def splittable(path: Path, fmt: fmts.Format, limit: int = 1 << 24) -> bool:
    """Whether a file is JSON lines that can be cut at any line start (as formats.records reads it):
    not gzip, not a JSON list, not a whole-file document of a format that has them."""
    if path.suffix == ".gz" or not path.is_file():
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
            "skip_bad_lines": config.skip_bad_lines, "shards": shards}


def make_plan(config: prep.PrepareConfig, shards: int, encoder: prep.Encoder) -> dict[str, Any]:
    fmt = fmts.get_format(config.format)
    inputs = prep.resolve_inputs(config.inputs)
    sizes = [p.stat().st_size for p in inputs]
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


def _pieces(plan: dict[str, Any], index: int) -> list[prep.Piece]:
    return [prep.Piece(*p) for p in plan["shards"][index]["pieces"]]


def _inputs(plan: dict[str, Any]) -> list[Path]:
    return [Path(i["path"]) for i in plan["settings"]["inputs"]]


def open_work(config: prep.PrepareConfig, shards: int, encoder: prep.Encoder) -> tuple[Path, dict[str, Any]]:
    """The work directory and its plan: the existing one when its settings match this command's
    (else SpecError, or with --force a fresh start), or a new one."""
    work = work_dir(config.out)
    plan_path = work / PLAN
    if plan_path.is_file():
        plan = read_json(plan_path)
        wanted = settings_of(config, shards, prep.resolve_inputs(config.inputs), encoder.fingerprint)
        differ = [k for k in wanted if plan["settings"].get(k) != wanted[k]]
        if not differ:
            return work, plan
        if not config.force:
            raise SpecError(f"{work} holds an unfinished preparation made with other {_differences(differ)}; "
                            f"rerun with its arguments to finish it (`llamajobs data inspect {config.out}` shows "
                            f"them), or pass --force to discard it and start over")
    shutil.rmtree(work, ignore_errors=True)  # no plan: stopped before it was written; nothing to keep
    plan = make_plan(config, shards, encoder)
    for d in (work / SHARDS_DIR, work / WORK_DIR):
        d.mkdir(parents=True)
    write_json_atomic(plan_path, plan)
    return work, plan


def _differences(keys: list[str]) -> str:
    names = {"inputs": "inputs (files, sizes or modification times)", "tokenizer_fingerprint": "--tokenizer",
             "format": "--format", "eval_fraction": "--eval-fraction", "skip_bad_lines": "--skip-bad-lines",
             "shards": "--shards"}
    return ", ".join(names[k] for k in keys)


# --- files of the work directory ---


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    st.write_json(tmp, data)
    os.replace(tmp, path)


def _maybe(path: Path) -> Any:
    try:
        return read_json(path)
    except (OSError, ValueError):  # absent, or being replaced on a filesystem without atomic rename
        return None


def marker_path(work: Path, index: int) -> Path:
    return work / SHARDS_DIR / f"{shard_name(index)}.json"


def failed_path(work: Path, index: int) -> Path:
    return work / SHARDS_DIR / f"{shard_name(index)}.failed.json"


def read_marker(work: Path, index: int, plan_id: str) -> dict[str, Any] | None:
    """The shard's completion marker, if it was written for this plan (a job of a plan discarded
    with --force may still finish and write one)."""
    marker = _maybe(marker_path(work, index))
    return marker if marker is not None and marker.get("plan") == plan_id else None


def read_failure(work: Path, index: int, plan_id: str) -> dict[str, Any] | None:
    failure = _maybe(failed_path(work, index))
    return failure if failure is not None and failure.get("plan") == plan_id else None


def _heartbeats(work: Path, plan_id: str) -> dict[int, dict[str, Any]]:
    """The latest progress.json of each shard of this plan in progress."""
    beats: dict[int, dict[str, Any]] = {}
    try:
        entries = list(os.scandir(work / WORK_DIR))
    except OSError:
        return beats
    for entry in entries:
        beat = _maybe(Path(entry.path) / PROGRESS)
        if beat and beat.get("plan") == plan_id and \
                beat.get("updated", 0) >= beats.get(beat["index"], {}).get("updated", 0):
            beats[beat["index"]] = beat
    return beats


def _history(work: Path) -> list[dict[str, Any]]:
    return _maybe(work / JOBS) or []


def _node() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def _job_id() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID")


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
        scratch = work / WORK_DIR / f"{shard_name(index)}.{_node()}-{os.getpid()}"
        failed_path(work, index).unlink(missing_ok=True)
        try:
            return _run_shard(work, plan, index, scratch, workers, chunk_bytes)
        except BaseException as e:
            write_json_atomic(failed_path(work, index), {
                "index": index, "plan": plan["id"], "error": str(e) or type(e).__name__, "type": type(e).__name__,
                "host": _node(), "time": time.time(), "traceback": traceback.format_exc()[-4000:]})
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


def _run_shard(work: Path, plan: dict[str, Any], index: int, scratch: Path, workers: int,
               chunk_bytes: int) -> dict[str, Any]:
    started = time.perf_counter()
    settings = plan["settings"]
    fmt = fmts.get_format(settings["format"])
    inputs, pieces = _inputs(plan), _pieces(plan, index)
    encoder = prep.Encoder(plan["tokenizer"]["path"])
    if encoder.fingerprint != plan["tokenizer"]["fingerprint"]:
        raise SpecError(f"--tokenizer {plan['tokenizer']['path']} on {_node()} has fingerprint "
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
    args = (encoder.path, fmt.name, plan["options"], eval_fraction)
    chunks = prep.read_chunks(inputs, fmt, chunk_bytes, pieces)
    for chunk, enc in prep.encode_chunks(chunks, args, workers, encoder):
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
    current = _maybe(work / PLAN)
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
        "host": _node(), "pid": os.getpid(), "job_id": _job_id(),
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
        self.info = {"index": index, "plan": plan_id, "host": _node(), "pid": os.getpid(), "bytes": total,
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


# --- the coordinator ---


def prepare_sharded(config: prep.PrepareConfig, cluster: ClusterConfig,
                    progress: Callable[[prep.Progress], None] | None = None,
                    on_submit: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Plan (or resume) DIR.parts, run the missing shards as array tasks, wait, merge into DIR.
    Returns the store's meta.json; with cluster.wait False, what `data inspect` shows, once the
    missing shards are submitted. Failed shards raise SpecError (bad input) or Failure, after the
    others finished (they are kept for the rerun)."""
    started = time.perf_counter()
    encoder = prep.Encoder(config.tokenizer)
    work, plan = open_work(config, cluster.shards, encoder)
    if not (work / st.META).is_file():
        runner = _Runner(work, plan, config, cluster, on_submit)
        runner.start()
        if not cluster.wait:
            return describe_work(work)
        runner.wait(progress, started)
        meta = merge(work, plan, cluster.cluster, time.perf_counter() - started)
    else:
        meta = read_json(work / st.META)  # merged by an earlier command that stopped before the rename
    finish(work, Path(config.out), config.force)
    return meta


class _LocalPid:
    """A local shard adopted from an earlier command: its submitit controller, by pid."""

    def __init__(self, pid: int, folder: Path) -> None:
        self.job_id, self.pid, self.folder = str(pid), pid, folder

    def done(self) -> bool:
        return not _controller_alive(self.pid, self.folder)


def _controller_alive(pid: int, folder: Path) -> bool:
    """A live submitit local controller of this work folder (not a recycled pid)."""
    return is_local_controller(pid) and str(folder).encode() in cmdline(pid)


class _Runner:
    """Submits the missing shards (all at once: SLURM runs them as one array, the local cluster
    bounds them with slots), adopts running ones, and waits for them (reading the markers)."""

    def __init__(self, work: Path, plan: dict[str, Any], config: prep.PrepareConfig, cluster: ClusterConfig,
                 on_submit: Callable[[str], None] | None) -> None:
        self.work, self.plan, self.config, self.cluster = work, plan, config, cluster
        self.on_submit = on_submit
        self.n = len(plan["shards"])
        self.folder = work / SUBMITIT_DIR
        self.handles: dict[int, Any] = {}   # running in this command: submitit jobs or adopted pids
        self.failed: dict[int, dict[str, Any]] = {}
        self.markers: dict[int, dict[str, Any]] = {}
        self.done_at: dict[int, float] = {}
        self.history = _history(work)
        self.entry: dict[str, Any] = {"time": time.time(), "cluster": cluster.cluster, "submitted": {}, "adopted": {}}
        self.history.append(self.entry)
        cpus = cluster.cpus_per_task or config.workers
        self.slots = (cluster.parallel or max(1, (os.cpu_count() or 1) // cpus)) if cluster.cluster == "local" else 0

    def _done(self, k: int) -> bool:
        if k not in self.markers:
            marker = read_marker(self.work, k, self.plan["id"])
            if marker is None:
                return False
            self.markers[k] = marker
        return True

    def start(self) -> None:
        todo = [k for k in range(self.n) if not self._done(k)]
        adopted = self._adopt(todo)
        self.handles.update(adopted)
        self.entry["adopted"] = {str(k): h.job_id for k, h in adopted.items()}
        self._submit([k for k in todo if k not in adopted])
        write_json_atomic(self.work / JOBS, self.history)

    def _last_jobs(self) -> dict[int, str]:
        """Each shard's latest job on this kind of cluster, from earlier commands."""
        last: dict[int, str] = {}
        for entry in self.history[:-1]:
            if entry["cluster"] == self.cluster.cluster:
                for kind in ("submitted", "adopted"):
                    last.update({int(k): v for k, v in entry[kind].items()})
        return last

    def _adopt(self, todo: list[int]) -> dict[int, Any]:
        last = {k: v for k, v in self._last_jobs().items() if k in todo}
        if not last:
            return {}
        if self.cluster.cluster == "local":
            found = {k: _LocalPid(int(job_id), self.folder) for k, job_id in last.items()}
            return {k: h for k, h in found.items() if not h.done()}
        import submitit

        live = _live_slurm_jobs()
        return {k: submitit.SlurmJob(folder=self.folder, job_id=job_id) for k, job_id in last.items()
                if job_id in live}

    def _submit(self, shards: list[int]) -> None:
        if not shards:
            return
        for k in shards:  # what an earlier attempt of these shards left
            failed_path(self.work, k).unlink(missing_ok=True)
            for stale in (self.work / WORK_DIR).glob(f"{shard_name(k)}.*"):
                shutil.rmtree(stale, ignore_errors=True)
        from llamajobs.submit import _detached_stdio

        executor = make_executor(self.work, self.cluster, self.config.workers, Path(self.config.out).name)
        n = len(shards)
        with _detached_stdio():  # the local controllers outlive us: they must not hold our stdio
            jobs = executor.map_array(run_shard, [str(self.work)] * n, shards, [self.config.workers] * n,
                                      [self.config.chunk_bytes] * n, [self.slots] * n)
        for k, job in zip(shards, jobs):
            self.handles[k] = job
            self.entry["submitted"][str(k)] = str(job.job_id)
        write_json_atomic(self.work / JOBS, self.history)  # now: a rerun must find these jobs
        if self.on_submit:
            ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
            where = f"{self.slots} at a time" if self.slots else f"job {', '.join(ids)}"
            self.on_submit(f"submitted {n} of {self.n} shards to the {self.cluster.cluster} cluster ({where}); "
                           f"logs in {self.folder}")

    def wait(self, progress: Callable[[prep.Progress], None] | None, started: float) -> None:
        while self.handles:
            time.sleep(self.cluster.poll_s)
            for k, handle in list(self.handles.items()):
                if self._done(k):
                    if self._settled(k, handle):
                        del self.handles[k]
                    continue
                failure = read_failure(self.work, k, self.plan["id"])
                if failure is None and handle.done():
                    if self._done(k):  # the marker came just before the end
                        continue
                    failure = read_failure(self.work, k, self.plan["id"]) or self._ended(k, handle)
                if failure is not None:
                    self.failed[k] = failure
                    del self.handles[k]
            if progress:
                progress(self._progress(started))
        if self.failed:
            raise self._failure()

    def _settled(self, k: int, handle: Any, grace_s: float = 30.0) -> bool:
        """A done shard's task has also finished writing into the work directory (its result pickle
        in submitit/), so the rename to DIR cannot pull the directory from under it; after grace_s
        the merge goes on anyway (the store does not depend on it)."""
        paths = getattr(handle, "paths", None)
        if paths is not None and paths.result_pickle.exists():
            return True
        if time.monotonic() - self.done_at.setdefault(k, time.monotonic()) > grace_s:
            return True
        return paths is None and handle.done()

    def _ended(self, k: int, handle: Any) -> dict[str, Any]:
        state = getattr(handle, "state", "exited")
        log = getattr(getattr(handle, "paths", None), "stderr", self.folder)
        return {"index": k, "type": "Ended", "error": f"job {handle.job_id} ended without finishing the shard "
                f"(state {state}: killed, out of memory or out of time?); log {log}"}

    def _failure(self) -> Exception:
        lines = [f"shard {k} of {self.n}: {f['error']}" + (f" (on {f['host']})" if f.get("host") else "")
                 for k, f in sorted(self.failed.items())]
        done = sum(self._done(k) for k in range(self.n))
        if all(f.get("type") == "SpecError" for f in self.failed.values()):
            return SpecError("; ".join(lines) + f" ({done} finished shards are kept in {self.work}; after changing "
                             f"the inputs or the flags, pass --force to start over)")
        return Failure("; ".join(lines) + f"; {done} of {self.n} shards are finished and kept: rerun the same "
                       f"command to redo only the others (logs in {self.folder})")

    def _progress(self, started: float) -> prep.Progress:
        beats = _heartbeats(self.work, self.plan["id"])
        bytes_read = documents = tokens = running = 0
        for k in range(self.n):
            if k in self.markers:
                m = self.markers[k]
                bytes_read += m["bytes"]
                documents += m["part"]["documents"] + (m["eval"]["documents"] if m["eval"] else 0)
                tokens += m["part"]["tokens"] + (m["eval"]["tokens"] if m["eval"] else 0)
            elif k in beats:
                running += k in self.handles
                bytes_read += beats[k]["bytes_read"]
                documents += beats[k]["documents"]
                tokens += beats[k]["tokens"]
        total = sum(s["bytes"] for s in self.plan["shards"])
        waiting = sum(k not in self.markers for k in self.handles) - running
        label = (f"shards {len(self.markers)}/{self.n} done, {running} running"
                 + (f", {waiting} waiting" if waiting else "")
                 + (f", {len(self.failed)} failed" if self.failed else ""))
        return prep.Progress(bytes_read, total, documents, tokens, time.perf_counter() - started, label)


def _live_slurm_jobs() -> set[str]:
    """This user's jobs that slurmctld holds as pending or running, one id per array element
    (squeue, not sacct: accounting learns of a new job only after a while)."""
    import pwd
    import subprocess

    user = pwd.getpwuid(os.getuid()).pw_name
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-u", user, "-o", "%i|%T"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()  # resubmit rather than wait for jobs nobody can see
    return {job for job, _, state in (line.partition("|") for line in out.stdout.split())
            if state in LIVE_SLURM_STATES}


def make_executor(work: Path, cluster: ClusterConfig, workers: int, name: str) -> Any:
    """submitit's executor for the shards: one task per shard, 1 node, --cpus-per-task (default
    --workers) CPUs; SLURM options from the flags and the site profile (setup lines, python)."""
    import submitit

    from llamajobs import site as site_mod
    from llamajobs.spec import parse_slurm_time
    from llamajobs.submit import LOCAL_DEFAULT_MINUTES, partition_time_limit

    folder = work / SUBMITIT_DIR
    minutes = parse_slurm_time(cluster.time) if cluster.time else None
    if cluster.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=0)
        executor.update_parameters(timeout_min=minutes or LOCAL_DEFAULT_MINUTES, tasks_per_node=1, gpus_per_node=0)
        return executor
    site, _ = site_mod.load()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    options = {
        "job_name": f"prepare-{name}", "nodes": 1, "ntasks_per_node": 1,
        "cpus_per_task": cluster.cpus_per_task or workers,
        "time": minutes if minutes is not None else partition_time_limit(cluster.partition),
        "partition": cluster.partition, "account": cluster.account, "qos": cluster.qos, "mem": cluster.mem,
        "setup": list(site.setup) or None, "srun_args": list(site.srun_args) or None, "stderr_to_stdout": False,
    }
    executor.update_parameters(**{k: v for k, v in options.items() if v is not None})
    if site.python:
        executor.python = site.python
    return executor


# --- the merge ---


def merge(work: Path, plan: dict[str, Any], cluster: str = "", seconds: float = 0.0) -> dict[str, Any]:
    """Check every shard (marker, tokenizer fingerprint, part files) and write eval/meta.json and
    meta.json over the parts where they are; returns meta.json."""
    started = time.perf_counter()
    n = len(plan["shards"])
    markers = [read_marker(work, k, plan["id"]) for k in range(n)]
    missing = [k for k, m in enumerate(markers) if m is None]
    if missing:
        raise Failure(f"shards {', '.join(map(str, missing))} of {n} are not finished in {work}")
    expected = plan["tokenizer"]["fingerprint"]
    for k, m in enumerate(markers):
        if m["fingerprint"] != expected:
            raise SpecError(f"shard {k} was tokenized on {m['host']} with tokenizer {m['fingerprint'][:16]}, but the "
                            f"plan's is {expected[:16]} ({plan['tokenizer']['path']}); the tokenizer must be the "
                            f"same on every node: pass --force to prepare again")
    fmt = fmts.get_format(plan["settings"]["format"])
    parts, held_parts = [], []
    counts = prep.Counts(per_source=[0] * len(plan["settings"]["inputs"]))
    for k, m in enumerate(markers):
        parts.append(_checked_part(work, m["part"], plan["dtype"], fmt.instruct))
        if m["eval"] is not None:
            held_parts.append(_checked_part(work / st.EVAL, m["eval"], plan["dtype"], fmt.instruct))
        counts.empty += m["empty"]
        counts.bad += m["bad"]
        counts.bad_examples.extend(m["bad_examples"][:prep.BAD_LINE_EXAMPLES - len(counts.bad_examples)])
        for source, documents in m["per_source"].items():
            counts.per_source[int(source)] += documents
    inputs = _inputs(plan)
    documents = sum(p["documents"] for p in parts + held_parts)
    if documents == 0:
        raise SpecError(f"INPUT {', '.join(map(str, inputs))}: no documents ({counts.empty} empty, {counts.bad} bad "
                        f"lines skipped); is --format {fmt.name} right?")
    eval_fraction = plan["settings"]["eval_fraction"]
    common = prep.common_meta(fmt, plan["dtype"], plan["tokenizer"], inputs, counts.per_source, eval_fraction)
    meta = prep.store_meta(parts, common, counts)
    if eval_fraction:
        eval_meta = prep.store_meta(held_parts, {**common, "split": "eval"}, prep.Counts())
        st.write_json(work / st.EVAL / st.META, eval_meta)
        meta["eval"] = {"path": st.EVAL, "documents": eval_meta["documents"], "tokens": eval_meta["tokens"]}
    keys = ("index", "bytes", "host", "job_id", "workers", "seconds", "peak_rss_bytes", "workers_peak_rss_bytes")
    meta["preparation"] = {
        "shards": n, "shards_requested": plan["settings"]["shards"], "cluster": cluster, "seconds": seconds,
        "merge_seconds": time.perf_counter() - started,
        "shard_stats": [{**{key: m.get(key) for key in keys}, "documents": m["part"]["documents"],
                         "tokens": m["part"]["tokens"]} for m in markers],
        "commands": [{k: v for k, v in e.items() if k != "time"} for e in _history(work)],
    }
    st.write_json(work / st.META, meta)  # last: the work directory is now a finished store
    return meta


def _checked_part(root: Path, info: dict[str, Any], dtype: str, with_mask: bool) -> dict[str, Any]:
    """The part the marker describes, with files of the sizes its counts say."""
    d = root / info["name"]
    if _maybe(d / st.PART_META) != info:
        raise Failure(f"{d}: its part.json does not match the shard's marker; pass --force to prepare again")
    sizes = {st.TOKENS: info["tokens"] * st.DTYPES[dtype].itemsize,
             st.OFFSETS: (info["documents"] + 1) * st.OFFSET_DTYPE.itemsize}
    if with_mask:
        sizes[st.LOSS_MASK] = info["tokens"]
    for name, size in sizes.items():
        if not (d / name).is_file() or (d / name).stat().st_size != size:
            raise Failure(f"{d / name}: not the {size} bytes its part.json says; pass --force to prepare again")
    return info


def finish(work: Path, out: Path, replace: bool) -> None:
    """Rename the merged work directory to DIR, then drop the bookkeeping (a leftover of it in a
    finished store is harmless)."""
    st.commit(work, out, replace=replace)
    for name in (PLAN, JOBS):
        (out / name).unlink(missing_ok=True)
    for name in (SHARDS_DIR, WORK_DIR, SUBMITIT_DIR, SLOTS_DIR):
        shutil.rmtree(out / name, ignore_errors=True)


# --- inspect ---


def describe_work(work: Path) -> dict[str, Any]:
    """An unfinished preparation: every shard's state (done, failed, running, stalled, killed,
    submitted, pending) from the work directory's files, without asking the cluster (killed: its
    process on this host is gone; stalled: no progress for STALE_S)."""
    plan = read_json(work / PLAN)
    beats = _heartbeats(work, plan["id"])
    last: dict[int, str] = {}
    for entry in _history(work):
        for kind in ("submitted", "adopted"):
            last.update({int(k): f"{entry['cluster']} {v}" for k, v in entry[kind].items()})
    now = time.time()
    rows = []
    for k, shard in enumerate(plan["shards"]):
        row: dict[str, Any] = {"index": k, "bytes": shard["bytes"], "job": last.get(k)}
        marker, failure = read_marker(work, k, plan["id"]), read_failure(work, k, plan["id"])
        if marker is not None:
            row.update(state="done", documents=marker["part"]["documents"], tokens=marker["part"]["tokens"],
                       host=marker["host"], seconds=round(marker["seconds"], 1))
        elif failure is not None:
            row.update(state="failed", error=failure["error"], host=failure.get("host"))
        elif k in beats:
            beat = beats[k]
            age = now - beat["updated"]
            gone = beat["host"] == _node() and not Path(f"/proc/{beat['pid']}").exists()
            row.update(state="killed" if gone else "running" if age < STALE_S else "stalled", host=beat["host"],
                       done_fraction=round(beat["bytes_read"] / max(1, shard["bytes"]), 3),
                       documents=beat["documents"], tokens=beat["tokens"], updated_s_ago=round(age, 1))
        else:
            row["state"] = "submitted" if k in last else "pending"
        rows.append(row)
    states = [r["state"] for r in rows]
    return {"path": str(work.with_name(work.name[:-len(".parts")])), "workdir": str(work), "unfinished": True,
            "format": plan["settings"]["format"], "tokenizer": plan["tokenizer"]["path"],
            "fingerprint": plan["tokenizer"]["fingerprint"], "eval_fraction": plan["settings"]["eval_fraction"],
            "inputs": len(plan["settings"]["inputs"]), "bytes": sum(s["bytes"] for s in plan["shards"]),
            "shards": rows, "counts": {s: states.count(s) for s in dict.fromkeys(states)}}
