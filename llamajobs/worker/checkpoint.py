"""Checkpoints: when to save (every N steps, every M minutes, on a stop request), how (atomically,
every rank writing its own shards), and where a relaunched worker resumes.

    RUN_DIR/checkpoints/
      step-N/
        .metadata, __R_0.distcp   model + optimizer (torch.distributed.checkpoint, FSDP2 shards: each
                                  rank writes its own; pp: the one process per node). LoRA and the
                                  prompt-learning modes save only the trainable adapter and its
                                  optimizer state: the frozen base is rebuilt at start-up from
                                  --model-path or the seed, exactly as the first attempt built it.
        engine/, zero_to_fp32.py  instead, under the ds-* strategies: DeepSpeed's own checkpoint
                                  (engine.save_checkpoint with tag "engine" and no `latest` of its
                                  own; each rank writes its ZeRO partitions; adapters only, as above).
                                  It resumes on the same number of processes only.
                                  (The strategy writes and reads this part: Strategy.save_checkpoint,
                                  load_checkpoint; check_checkpoint refuses another format's.)
        rng-rank{R}.pt            rank R's python, numpy, torch (and CUDA) generator states
        train_state.json          step, scheduler and sampler positions (the same on every rank)
        meta.json                 written last: {"step", "mode", "strategy", "world_size", "device", "time",
                                  "complete"}
      latest                      "step-N", the newest complete checkpoint (the launcher waits on it)

Atomic: all of it is written into a hidden sibling (.tmp-step-N-<token>), meta.json last; the
directory is then renamed to step-N and `latest` replaced (tmp file + os.replace); only then are
older checkpoints deleted. A directory without complete metadata never counts: resume skips it and
the next save deletes it.

Every decision that ranks must agree on (save now? stop now?) is taken on rank 0 and broadcast, in
one small tensor per optimizer step; the step-based schedule needs no message (every rank counts).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.optim.lr_scheduler import LRScheduler

from llamajobs import events
from llamajobs.control import STOP_REQUEST
from llamajobs.data.sampler import WindowSampler
from llamajobs.spec import JobSpec
from llamajobs.worker import rng
# (LATEST and META are read by tests as checkpoint.LATEST and checkpoint.META.)
from llamajobs.worker.checkpoint_files import (LATEST, META, commit, complete_steps, discard, folder_bytes,  # noqa: F401
                                               newest_complete_step, prune, read_meta, set_aside, step_dir,
                                               write_synced)
from llamajobs.worker.faults import limit_file_size, lose_a_rank
from llamajobs.worker.parallel import Dist, Strategy

TRAIN_STATE = "train_state.json"


@dataclass(slots=True)
class TrainState:
    """What a checkpoint saves and a resume restores (besides the RNG states). The model and optimizer
    are what the strategy's wrap returned (DeepSpeed: its engine, which saves the optimizer's
    partitions itself)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    sampler: WindowSampler


# --- a save that cannot write ---

# What a write that found no room says: the filesystem is full, the quota is used up, or a file-size
# limit (`ulimit -f`, RLIMIT_FSIZE) was reached.
NO_ROOM = {errno.ENOSPC: "no space left on the filesystem", errno.EDQUOT: "disk quota exceeded",
           errno.EFBIG: "a file grew past this process's file-size limit (ulimit -f)"}


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact. Its message is the whole story."""


# Free bytes below which a failed write is taken for a full filesystem when the writer's error has
# no errno (torch.save's zip writer reports a short write as a RuntimeError: "unexpected pos").
NEARLY_FULL_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class WriteFailure:
    """One rank's failed write, small enough to gather to rank 0."""

    rank: int
    errno: int | None  # None: the writer's error carried none
    path: str
    reason: str
    free_bytes: int  # on the checkpoint's filesystem when it failed (before the partial files go)


def _attempt(write: Callable[[], None], root: Path) -> WriteFailure | None:
    """Run `write`; None when it worked, else what failed. DCP reports every rank's failures on every
    rank; anything that is neither an OSError nor DCP's is a bug, raised."""
    try:
        write()
    except OSError as error:
        return write_failure(dist.get_rank(), error, root)
    except CheckpointException as error:
        return min((write_failure(rank, exception, root) for rank, (exception, _) in error.failures.items()),
                   key=lambda f: (f.errno is None, f.rank))  # one with an errno tells the most
    return None


def write_failure(rank: int, error: BaseException, root: Path) -> WriteFailure:
    """What rank's failed write (error) says, with the room left on root's filesystem right now."""
    free = free_bytes(root)
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):  # an OSError may hide in the chain
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, OSError):
        return WriteFailure(rank=rank, errno=cause.errno, path=str(cause.filename or ""), free_bytes=free,
                            reason=NO_ROOM.get(cause.errno) or cause.strerror or str(cause))
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return WriteFailure(rank=rank, errno=None, path="", reason=first_line, free_bytes=free)


def _existing(path: Path) -> Path:
    """path, or its nearest ancestor that exists; symlinks (a checkpoints directory linked to scratch
    space) followed."""
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still write on the filesystem that holds path."""
    vfs = os.statvfs(_existing(path))
    return vfs.f_bavail * vfs.f_frsize


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem that holds path (path need not exist any more)."""
    path = _existing(path)
    while not os.path.ismount(path):
        path = path.parent
    return path


def describe_write_failure(failure: WriteFailure, tmp: Path, step: int) -> str:
    """One line: what failed, on which filesystem, how much room there is and the save needs (when an
    earlier checkpoint tells), and where the run resumes. tmp: the (removed) directory it was writing."""
    root = tmp.parent
    reason = failure.reason
    if failure.errno in errno.errorcode:
        reason += f" [{errno.errorcode[failure.errno]}]"
    elif failure.free_bytes < NEARLY_FULL_BYTES:
        reason = f"no space left on the filesystem ({failure.free_bytes:,} bytes free when it failed: {reason})"
    room = f"filesystem mounted at {mount_point(root)}: {free_bytes(root):,} bytes free"
    steps = complete_steps(root)
    if steps:
        last = step_dir(root, steps[-1])
        room += f"; the save needs about {folder_bytes(last):,} bytes (the size of {last.name})"
    kept = f"step-{steps[-1]} is kept as the latest checkpoint" if steps else "there is no earlier checkpoint"
    advice = ("raise the file-size limit (ulimit -f) where the job runs" if failure.errno == errno.EFBIG
              else "free space there (or lower --keep-checkpoints)")
    where = failure.path or f"into {tmp}"
    return (f"checkpoint of step {step} failed on rank {failure.rank}: {reason} writing {where}; {room}. "
            f"The partial checkpoint was removed and {kept}: {advice}, then resubmit to resume")


# --- collectives ---


def broadcast_object(value: Any) -> Any:
    """Rank 0's value on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def find_resume_step(run_dir: Path, spec: JobSpec, env: Dist) -> int | None:
    """The step this attempt resumes from (None: from scratch), decided by rank 0 for every rank.
    Collective. Known before the model is built: resuming a full fine-tune needs no base weights."""
    step = None
    if env.rank == 0:
        root = run_dir / "checkpoints"
        if spec.resume:
            step = newest_complete_step(root)
        else:
            set_aside(root)
    return broadcast_object(step)


@dataclass(slots=True)
class PendingSave:
    """A periodic save written in the background: what its commit needs once every rank's files are
    written. The train state is taken when the save starts: the sampler and scheduler move on."""

    step: int
    tmp: Path
    written: Future  # this rank's DCP files (Strategy.save_checkpoint_async)
    train_state: dict[str, Any]
    start: float  # perf_counter when the save started
    stalled: float  # seconds training stood still to stage it (the copy to host memory)


class Checkpointer:
    """Saves at optimizer-step boundaries when due, and restores a resumed attempt.

    Periodic saves (every N steps or M minutes) run in the background where the strategy can
    (DCP's async_save: the shards are copied to host memory, then written by a thread while training
    goes on); a save for a stop request is synchronous, as the requeue waits for it. Either way a
    checkpoint is committed (meta.json, then `latest`) only once every rank's files are written: at
    each step boundary the ranks agree whether the background save is done (one tiny all-reduce,
    only while one is in flight). One save at a time: a new one, a stop, or the end waits for the
    one in flight."""

    def __init__(self, run_dir: Path, spec: JobSpec, env: Dist, state: TrainState, strategy: Strategy, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.run_dir = run_dir
        self.root = run_dir / "checkpoints"
        self.spec = spec
        self.env = env
        self.state = state
        self.strategy = strategy  # writes and reads the model's and optimizer's part, in its format
        self.every_steps = spec.checkpoint_every_steps
        self.every_seconds = spec.checkpoint_every_minutes * 60 if spec.checkpoint_every_minutes else None
        self.clock = clock
        self.last_save = clock()
        self.seconds_saving = 0.0  # this attempt's time spent in save(), for the metrics rows
        self.stop_at = spec.debug.fault_at("stop")  # tests: a stop request at a step they can predict
        # Names this attempt's temporary directories: the same on every rank, new on every attempt.
        self.token = broadcast_object(f"{os.getpid()}-{int(time.time())}")
        self.pending: PendingSave | None = None
        periodic = bool(self.every_steps or self.every_seconds)
        # DCP's background writes run their own collectives from a thread: a gloo group of their own
        # keeps them apart from the training's (torchtitan does the same). Created once, collectively.
        self.async_group = dist.new_group(backend="gloo") if periodic and strategy.async_checkpoints else None

    # --- at every optimizer-step boundary ---

    def after_step(self, step: int) -> bool:
        """Save when due (every N steps, every M minutes, or on a stop request); True when a stop was
        requested: the checkpoint of this step is then complete and the worker should exit."""
        lose_a_rank(self.spec.debug, step, self.env.rank, self.env.world_size)  # fault injection (die, hang)
        if step == self.spec.debug.fault_at("fsize"):
            self.wait()  # the injected limit is for the saves after this step, not one still being written
        limit_file_size(self.spec.debug, step)  # fault injection (fsize)
        minutes_due, stop = self._rank0_decisions(step)
        self._commit_if_written()
        steps_due = bool(self.every_steps) and step % self.every_steps == 0
        if stop:
            self.save(step)  # synchronous: the launcher requeues once `latest` names this step
        elif steps_due or minutes_due:
            self.save_in_background(step) if self.async_group is not None else self.save(step)
        if stop and self.env.rank == 0:
            # Consumed: the requeued attempt must not stop again. (Gone already: someone withdrew it.)
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.run_dir / STOP_REQUEST, self.run_dir / f"{STOP_REQUEST}.done-step-{step}")
            events.record(self.run_dir, "stopped", step=step)
            print(f"stop request: saved step {step}; exiting", flush=True)
        return stop

    def _rank0_decisions(self, step: int) -> tuple[bool, bool]:
        """(minutes due, stop requested), rank 0's view, on every rank: one broadcast of one small
        CPU tensor (over gloo, so a GPU run's host never waits for the device here)."""
        flags = torch.zeros(2, dtype=torch.int32)
        if self.env.rank == 0:
            flags[0] = self.every_seconds is not None and self.clock() - self.last_save >= self.every_seconds
            if step == self.stop_at:  # fault injection: as if the launcher had written the request now
                (self.run_dir / STOP_REQUEST).touch()
            flags[1] = (self.run_dir / STOP_REQUEST).exists()
        dist.broadcast(flags, src=0)
        minutes_due, stop = flags.tolist()
        return bool(minutes_due), bool(stop)

    # --- save ---

    def save(self, step: int) -> Path:
        """Collective: every rank writes its shards and RNG state; rank 0 commits and prunes. When a write
        fails on any rank (a full filesystem, a quota, a file-size limit), every rank raises the same
        CheckpointWriteError, the partial directory is removed and the previous checkpoint stays `latest`."""
        self.wait()  # the one in flight first: checkpoints are committed in step order
        start = time.perf_counter()
        tmp = self._make_tmp(step)
        failure = _attempt(lambda: self._write_shards(tmp), self.root)
        self._agree_or_raise(failure, tmp, step)  # every rank's files are written before rank 0 commits
        final = self._commit_everywhere(tmp, step, start, self._train_state(step))
        self.seconds_saving += time.perf_counter() - start
        return final

    def save_in_background(self, step: int) -> None:
        """Collective: start a periodic save of this step; training goes on while it is written, and a
        later step boundary commits it (_commit_if_written). The loop waits only for the copy to host
        memory (and for an earlier save still in flight)."""
        self.wait()
        start = time.perf_counter()
        tmp = self._make_tmp(step)
        started: list[Future] = []

        def begin() -> None:
            started.append(self.strategy.save_checkpoint_async(self.state.model, self.state.optimizer, tmp,
                                                               self.async_group))
            self._write_rng(tmp)  # (small: written now, with the state it holds)
        self._agree_or_raise(_attempt(begin, self.root), tmp, step)
        staged = time.perf_counter() - start
        self.pending = PendingSave(step, tmp, started[0], self._train_state(step), start, staged)
        self.last_save = self.clock()  # the minute schedule counts from the state saved, not the commit
        self.seconds_saving += staged
        if self.env.rank == 0:
            print(f"checkpoint: step {step} staged in {staged:.2f} s; writing in the background", flush=True)

    def _commit_if_written(self) -> None:
        """Collective while a background save is in flight: commit it once every rank's files are
        written (a rank that finished waits for the others; nobody blocks on the writes)."""
        if self.pending is None:
            return
        done = torch.tensor([int(self.pending.written.done())], dtype=torch.int32)
        dist.all_reduce(done, op=dist.ReduceOp.MIN)  # (a CPU tensor over gloo: no device sync)
        if done.item():
            self.wait()

    def wait(self) -> None:
        """Collective: finish the background save in flight, if any: wait for this rank's writes, agree
        that every rank's succeeded, commit. The worker calls it before it exports final/ or exits."""
        pending, self.pending = self.pending, None
        if pending is None:
            return
        waited = time.perf_counter()
        self._agree_or_raise(_attempt(pending.written.result, self.root), pending.tmp, pending.step)
        self._commit_everywhere(pending.tmp, pending.step, pending.start, pending.train_state,
                                background=(pending.stalled, waited))
        self.seconds_saving += time.perf_counter() - waited

    def _make_tmp(self, step: int) -> Path:
        """Collective: rank 0 creates the save's temporary directory before any rank writes into it."""
        tmp = self.root / f".tmp-step-{step}-{self.token}"
        failure = None
        if self.env.rank == 0:
            failure = _attempt(lambda: tmp.mkdir(parents=True, exist_ok=True), self.root)
        failure = broadcast_object(failure)
        if failure is not None:
            self._agree_or_raise(failure, tmp, step)
        return tmp

    def _commit_everywhere(self, tmp: Path, step: int, start: float, train_state: dict[str, Any],
                           background: tuple[float, float] | None = None) -> Path:
        """Collective: rank 0 commits; every rank learns whether that worked. background: a background
        save's (seconds training stood still to stage it, perf_counter when the wait for it began)."""
        failure = None
        if self.env.rank == 0:
            failure = _attempt(lambda: self._commit(tmp, step, start, train_state, background), self.root)
        self._agree_or_raise(failure, tmp, step)
        self.last_save = self.clock()
        return step_dir(self.root, step)

    def _train_state(self, step: int) -> dict[str, Any]:
        return {"step": step, "scheduler": self.state.scheduler.state_dict(),
                "sampler": self.state.sampler.state_dict()}

    def _write_shards(self, tmp: Path) -> None:
        """This rank's files: its shards (DCP is collective and raises the same error on every rank
        when one failed) and its RNG state."""
        self.strategy.save_checkpoint(self.state.model, self.state.optimizer, tmp)
        self._write_rng(tmp)

    def _write_rng(self, tmp: Path) -> None:
        buffer = io.BytesIO()
        torch.save(rng.get_state(self.env.device), buffer)
        write_synced(tmp / f"rng-rank{self.env.rank}.pt", buffer.getvalue())  # (DCP syncs its own files)

    def _commit(self, tmp: Path, step: int, start: float, train_state: dict[str, Any],
                background: tuple[float, float] | None) -> None:
        """Rank 0: the train state, then meta.json and `latest` (commit), then the pruning of older ones."""
        write_synced(tmp / TRAIN_STATE, (json.dumps(train_state, indent=2) + "\n").encode())
        final = commit(self.root, tmp, step, {"step": step, "mode": self.spec.mode, "strategy": self.spec.strategy,
                                              "world_size": self.env.world_size, "device": self.env.device.type,
                                              "time": time.time()})
        prune(self.root, self.spec.keep_checkpoints)
        now = time.perf_counter()
        written = now - start
        # seconds: how long training stood still for this save (what measured throughput leaves out);
        # in the background the copy to host memory and the wait and commit at the end, and written_s
        # the time from the start to the commit.
        seconds = written if background is None else background[0] + now - background[1]
        extra = {"background": background is not None} | ({"written_s": round(written, 3)} if background else {})
        events.record(self.run_dir, "checkpointed", step=step, seconds=round(seconds, 3),
                      bytes=folder_bytes(final), path=str(final), **extra)
        how = f" (written in the background in {written:.2f} s)" if background else ""
        print(f"checkpoint: step {step} in {seconds:.2f} s{how} -> {final}", flush=True)

    def _agree_or_raise(self, failure: WriteFailure | None, tmp: Path, step: int) -> None:
        """Collective: go on when no rank failed; otherwise rank 0 removes the partial directory and
        every rank raises rank 0's description of the first failure (the same line everywhere)."""
        failures: list[WriteFailure | None] = [None] * self.env.world_size
        dist.all_gather_object(failures, failure)
        first = next((f for f in failures if f is not None), None)
        if first is None:
            return
        message = None
        if self.env.rank == 0:
            if tmp.exists():
                discard(tmp)
            message = describe_write_failure(first, tmp, step)
        raise CheckpointWriteError(broadcast_object(message))

    # --- resume ---

    def resume(self, step: int | None) -> int:
        """Restore the checkpoint of `step` (from find_resume_step) on every rank; returns the step
        training continues after (0 when there is none). Collective."""
        if step is None:
            return 0
        folder = step_dir(self.root, step)
        meta = read_meta(folder) or {}
        saved_mode = meta.get("mode")
        if saved_mode != self.spec.mode:  # a LoRA checkpoint holds no base weights; a full one no adapters
            raise ValueError(f"{folder} was saved by a --mode {saved_mode} run; resume it with --mode {saved_mode}, "
                             f"or turn resume off (--no-resume) to start over")
        self.strategy.check_checkpoint(folder, meta)  # its format, and what else it needs (ZeRO: the world size)
        self.strategy.load_checkpoint(self.state.model, self.state.optimizer, folder)
        train_state = json.loads((folder / TRAIN_STATE).read_text())
        self.state.scheduler.load_state_dict(train_state["scheduler"])
        self.state.sampler.load_state_dict(train_state["sampler"])
        self._restore_rng(folder, step)
        self.last_save = self.clock()
        if self.env.rank == 0:
            events.record(self.run_dir, "resumed", step=step, path=str(folder))
            print(f"resumed from {folder}", flush=True)
        return step

    def _restore_rng(self, folder: Path, step: int) -> None:
        """Each rank's generators as they were, when the ranks are the same ones; otherwise there is
        no rank to take them from: reseed from (seed, rank, step), reproducibly but not bitwise."""
        meta = read_meta(folder) or {}
        same = (meta.get("world_size"), meta.get("device")) == (self.env.world_size, self.env.device.type)
        if same:
            rng.set_state(torch.load(folder / f"rng-rank{self.env.rank}.pt", weights_only=True), self.env.device)
            return
        rng.seed_all(self.spec.seed, self.env.rank, step)
        if self.env.rank == 0:
            print(f"warning: {folder} was saved by {meta.get('world_size')} {meta.get('device')} processes, this "
                  f"run has {self.env.world_size} {self.env.device.type}; random streams (dropout) are reseeded, "
                  f"so the losses will not match an uninterrupted run exactly", flush=True)
