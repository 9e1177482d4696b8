"""The work directory of a sharded `data prepare` (data/sharded_prepare.py runs one; data/shard_plan.py
makes its plan and prepares each shard): its layout, the files in it, and what `data inspect` shows
of an unfinished one. It imports nothing of the pipeline (data/prepare.py's inspect imports it).

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
still runs publishes nothing. A shard with a marker is never redone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from llamajobs.cluster.local import exited
from llamajobs.data import store as st

PLAN_KIND = "llamajobs sharded prepare"
PLAN, JOBS, PROGRESS = "plan.json", "jobs.json", "progress.json"
SHARDS_DIR, WORK_DIR, SUBMITIT_DIR, SLOTS_DIR = "shards", "work", "submitit", "slots"
HEARTBEAT_S = 1.0   # how often a shard rewrites its progress.json
STALE_S = 120.0     # a progress.json older than this: `data inspect` calls the shard stalled


def work_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.parts")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


# --- files of the work directory ---


def plan_inputs(plan: dict[str, Any]) -> list[Path]:
    return [Path(i["path"]) for i in plan["settings"]["inputs"]]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")
    st.write_json(tmp, data)
    os.replace(tmp, path)


def maybe_json(path: Path) -> Any:
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
    marker = maybe_json(marker_path(work, index))
    return marker if marker is not None and marker.get("plan") == plan_id else None


def read_failure(work: Path, index: int, plan_id: str) -> dict[str, Any] | None:
    failure = maybe_json(failed_path(work, index))
    return failure if failure is not None and failure.get("plan") == plan_id else None


def heartbeats(work: Path, plan_id: str) -> dict[int, dict[str, Any]]:
    """The latest progress.json of each shard of this plan in progress."""
    beats: dict[int, dict[str, Any]] = {}
    try:
        entries = list(os.scandir(work / WORK_DIR))
    except OSError:
        return beats
    for entry in entries:
        beat = maybe_json(Path(entry.path) / PROGRESS)
        if beat and beat.get("plan") == plan_id and \
                beat.get("updated", 0) >= beats.get(beat["index"], {}).get("updated", 0):
            beats[beat["index"]] = beat
    return beats


def history(work: Path) -> list[dict[str, Any]]:
    return maybe_json(work / JOBS) or []


def node_name() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def task_job_id() -> str | None:
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID")



# --- inspect ---


def describe_work(work: Path) -> dict[str, Any]:
    """An unfinished preparation: every shard's state (done, failed, running, stalled, killed,
    submitted, pending) from the work directory's files, without asking the cluster (killed: its
    process on this host is gone; stalled: no progress for STALE_S)."""
    plan = read_json(work / PLAN)
    beats = heartbeats(work, plan["id"])
    last: dict[int, str] = {}
    for entry in history(work):
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
            gone = beat["host"] == node_name() and exited(beat["pid"])
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

