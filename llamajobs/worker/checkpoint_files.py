"""The checkpoints on disk: step-N folders, their meta.json, `latest`, and writing, committing,
discarding and pruning them (rank 0's bookkeeping; no collectives)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

LATEST = "latest"
META = "meta.json"

def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step}"


def read_meta(folder: Path) -> dict[str, Any] | None:
    """The checkpoint's metadata when it is complete, else None (missing, torn, or not marked complete)."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("complete") is True else None


def complete_steps(root: Path) -> list[int]:
    """Steps of the complete checkpoints under root, oldest first."""
    steps = []
    for folder in root.glob("step-*"):
        number = folder.name.removeprefix("step-")
        if number.isdigit() and read_meta(folder) is not None:
            steps.append(int(number))
    return sorted(steps)


def newest_complete_step(root: Path) -> int | None:
    """The step to resume from: the newest complete checkpoint. `latest` normally names it; when it
    names anything else (an incomplete directory, a missing one), say so and use the newest anyway."""
    steps = complete_steps(root)
    newest = steps[-1] if steps else None
    try:
        named = (root / LATEST).read_text().strip()
    except OSError:
        named = None
    if named is not None and named != f"step-{newest}":
        found = f"resuming from step-{newest}" if newest is not None else "starting from step 0"
        print(f"warning: {root / LATEST} names {named!r}, not the newest complete checkpoint; {found}", flush=True)
    return newest


def write_synced(path: Path, data: bytes) -> None:
    """On disk before anything written after it (the metadata must never outlive what it vouches for)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never a torn one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_synced(tmp, text.encode())
    os.replace(tmp, path)


def commit(root: Path, tmp: Path, step: int, meta: dict[str, Any]) -> Path:
    """Mark the written checkpoint complete (meta.json last), move it into place, point `latest` at it."""
    write_atomically(tmp / META, json.dumps({**meta, "complete": True}, indent=2) + "\n")
    final = step_dir(root, step)
    if final.exists():  # an incomplete leftover of a crashed attempt (or a redone step): superseded
        discard(final)
    os.replace(tmp, final)
    write_atomically(root / LATEST, final.name + "\n")
    return final


def discard(folder: Path) -> None:
    """Delete a checkpoint directory so that no kill can leave half of it looking complete: it
    leaves its step-N name in one atomic rename first (a partly deleted step-N would still hold
    meta.json, but not all of its shards)."""
    trash = folder.with_name(f".trash-{folder.name}-{os.getpid()}")
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def prune(root: Path, keep: int) -> None:
    """Keep the `keep` newest complete checkpoints; delete older ones, incomplete step directories
    and abandoned temporary or half-deleted ones. Called only after a new checkpoint is complete
    and `latest` names it."""
    kept = {f"step-{s}" for s in complete_steps(root)[-keep:]}
    for folder in root.iterdir():
        if not folder.is_dir() or folder.name in kept:
            continue
        if folder.name.startswith(".trash-"):
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.name.startswith(("step-", ".tmp-step-")):
            discard(folder)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def set_aside(root: Path) -> None:
    """--no-resume: an earlier attempt's checkpoints must not be resumed (nor outrank the new ones
    when pruning); they are moved to checkpoints.previous (replacing an older set aside)."""
    if not root.is_dir() or not any(root.iterdir()):
        return
    aside = root.with_name(root.name + ".previous")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(root, aside)
    print(f"resume is off: moved the earlier checkpoints to {aside}", flush=True)


