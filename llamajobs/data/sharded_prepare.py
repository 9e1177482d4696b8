"""Sharded `data prepare`: one array task per shard through submitit, restartable, merged into one store.

    llamajobs data prepare CORPUS... --tokenizer T --out DIR --shards N --cluster slurm|local

The plan cuts the inputs into N contiguous shards of about equal input bytes: JSON-lines files are
cut at line starts, gzip files and whole-file JSON (lists, LMFlow and PubMedQA documents) stay
whole, so a corpus of many .gz files is split by files. Shards follow the input order and the store
reads its parts end to end, so global document i is the same document as in a one-process prepare;
the eval split is decided per document (a hash of its id), so it is the same too. Each task streams
its pieces through prepare's chunk pipeline: its memory does not grow with the corpus or the shard.

Everything lives in the work directory DIR.parts (on the shared filesystem for SLURM; its files
are data/shards.py's). A shard with a marker is never redone. Rerunning the command with the same
arguments adopts the shards whose jobs still run (SLURM: squeue; local: the controller's pid),
submits the missing ones, waits and merges. The merge checks every shard's tokenizer fingerprint
against the plan's and each part's files against its marker, writes eval/meta.json and meta.json
(the parts stay as they are: no token is copied), renames DIR.parts to DIR and removes the
bookkeeping. The plan and what each task runs are data/shard_plan.py's; the executor, the cluster layer's.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from llamajobs import catalog
from llamajobs import cluster as clusters
from llamajobs import site as site_mod
from llamajobs.data import formats as fmts
from llamajobs.data import prepare as prep
from llamajobs.data import store as st
from llamajobs.data.shard_plan import open_work, run_shard
from llamajobs.data.shards import (JOBS, PLAN, SHARDS_DIR, SLOTS_DIR, SUBMITIT_DIR, WORK_DIR, describe_work,
                                   failed_path, heartbeats, history, maybe_json, read_failure, read_json,
                                   plan_inputs, read_marker, shard_name, write_json_atomic)
from llamajobs.errors import Failure, SpecError
from llamajobs.spec import parse_slurm_time

CLUSTERS = tuple(name for name, info in catalog.CLUSTER.items() if info.runs_arrays)


# --- configuration ---

# Upper bounds, checked before anything is planned. Shards: SLURM's default MaxArraySize allows
# 1001 array tasks; ten thousand shards of a 10 TB corpus are still a gigabyte each, and --shards
# 100000000 (a typo) planned for minutes and gigabytes before anything was submitted.
MAX_SHARDS = 10_000
MAX_CPUS_PER_TASK = 1024  # above any node's CPUs
MAX_MEM_MIB = 64 << 20    # 64T: above any node's memory
_MEM = re.compile(r"^(\d+)([KMGT]?)$")
_MEM_MIB = {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1 << 20}  # SLURM's --mem counts MiB without a unit


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
        if not 1 <= self.shards <= MAX_SHARDS:
            raise SpecError(f"--shards {self.shards}: must be 1 to {MAX_SHARDS:,}")
        if self.cluster not in CLUSTERS:
            raise SpecError(f"--cluster {self.cluster!r}: shards run on {' or '.join(CLUSTERS)}")
        if self.time is not None:
            parse_slurm_time(self.time)
        if self.cpus_per_task is not None and not 1 <= self.cpus_per_task <= MAX_CPUS_PER_TASK:
            raise SpecError(f"--cpus-per-task {self.cpus_per_task}: must be 1 to {MAX_CPUS_PER_TASK}")
        if self.mem is not None:
            m = _MEM.match(self.mem)
            if not m:
                raise SpecError(f"--mem {self.mem!r} is malformed; use SLURM's syntax: 4G, 16000")
            if int(m[1]) * _MEM_MIB[m[2]] > MAX_MEM_MIB:  # (0 is SLURM's "all of the node's memory")
                raise SpecError(f"--mem {self.mem}: must be at most 64T")
        if self.parallel is not None and self.parallel < 1:
            raise SpecError(f"parallel {self.parallel}: must be at least 1")


def cluster_config(shards: int, **flags: Any) -> ClusterConfig:
    """A ClusterConfig from the flags given (None: not given), with the site profile's defaults for
    cluster, partition, account, qos and time; the cluster is otherwise slurm when `scontrol ping`
    answers, else local."""
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
            values["cluster"] = clusters.detect()
    return ClusterConfig(shards=shards, **values)


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
        self.history = history(work)
        self.entry: dict[str, Any] = {"time": time.time(), "cluster": cluster.cluster, "submitted": {}, "adopted": {}}
        self.history.append(self.entry)
        cpus = cluster.cpus_per_task or config.workers
        # On a cluster whose node is this host, the shards share its cores: bounded by slots.
        on_host = catalog.CLUSTER[cluster.cluster].host_is_node
        self.slots = (cluster.parallel or max(1, (os.cpu_count() or 1) // cpus)) if on_host else 0

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
        live = clusters.backend(self.cluster.cluster).reattach(list(dict.fromkeys(last.values())), self.folder)
        return {k: live[job_id] for k, job_id in last.items() if job_id in live}

    def _submit(self, shards: list[int]) -> None:
        if not shards:
            return
        for k in shards:  # what an earlier attempt of these shards left
            failed_path(self.work, k).unlink(missing_ok=True)
            for stale in (self.work / WORK_DIR).glob(f"{shard_name(k)}.*"):
                shutil.rmtree(stale, ignore_errors=True)
        backend = clusters.backend(self.cluster.cluster)
        executor = backend.executor(allocation(self.cluster, self.config.workers, Path(self.config.out).name),
                                    self.folder)
        n = len(shards)
        with clusters.detached_stdio():  # the local controllers outlive us: they must not hold our stdio
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
        beats = heartbeats(self.work, self.plan["id"])
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


def allocation(config: ClusterConfig, workers: int, name: str) -> clusters.Allocation:
    """Each shard's task: 1 node, --cpus-per-task (default --workers) CPUs; SLURM options from the
    flags and the site profile (setup lines, srun arguments, python)."""
    site, _ = site_mod.load()
    return clusters.Allocation(
        name=f"prepare-{name}", cpus_per_task=config.cpus_per_task or workers,
        minutes=parse_slurm_time(config.time) if config.time else None, partition=config.partition,
        account=config.account, qos=config.qos, mem=config.mem, setup=site.setup, srun_args=site.srun_args,
        python=site.python)


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
    inputs = plan_inputs(plan)
    documents = sum(p["documents"] for p in parts + held_parts)
    if documents == 0:
        raise SpecError(f"INPUT {', '.join(map(str, inputs))}: no documents ({counts.empty} empty, {counts.bad} bad "
                        f"lines skipped); is --format {fmt.name} right?")
    eval_fraction = plan["settings"]["eval_fraction"]
    prep.check_training_split(sum(p["documents"] for p in parts), sum(p["documents"] for p in held_parts),
                              eval_fraction)
    common = prep.common_meta(fmt, plan["dtype"], plan["tokenizer"], inputs, counts.per_source, eval_fraction)
    if fmt.chat:
        common["chat"] = {"template": plan["settings"].get("chat_template") or "tokenizer",
                          "train_on": plan["settings"].get("train_on", "assistant"),
                          "encoding": plan["settings"].get("chat_encoding", 1)}
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
        "commands": [{k: v for k, v in e.items() if k != "time"} for e in history(work)],
    }
    st.write_json(work / st.META, meta)  # last: the work directory is now a finished store
    return meta


def _checked_part(root: Path, info: dict[str, Any], dtype: str, with_mask: bool) -> dict[str, Any]:
    """The part the marker describes, with files of the sizes its counts say."""
    d = root / info["name"]
    if maybe_json(d / st.PART_META) != info:
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


