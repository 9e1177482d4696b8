"""Fault injection for tests, switched on in spec.json's debug section (spec.DebugSpec: fault, fault_step
= N; catalog.FAULTS), never by the environment:

crash    every rank raises when optimizer step N starts (a crashing worker must end up FAILED and a
         relaunch must resume from the last checkpoint).
oom      every rank raises torch's out-of-memory error when step N starts (status must say
         OUT_OF_MEMORY with advice).
stop     rank 0 writes RUN_DIR/stop-request at the boundary after step N, so the worker takes the
         real preemption path (checkpoint, exit 0 without final/) at a step a test can predict.
die      the last rank exits at the boundary after step N with no Python error (os._exit(1), as a
         rank killed by the OOM killer or a segfault would), leaving the others waiting for it in
         a collective.
hang     the last rank stops taking part at the boundary after step N and sleeps (as a rank on a node
         whose network is gone); step 0 stops it after it reached the rendezvous, before it joins the
         process group (as a node that rendezvoused but cannot connect, e.g. a wrong interface).
fsize    every rank lowers its file-size limit (RLIMIT_FSIZE, `ulimit -f`) to FSIZE_LIMIT at the boundary
         after step N, before that step's checkpoint, so the kernel fails the save's writes with EFBIG:
         a real write error, as a full filesystem's ENOSPC would be (SIGXFSZ ignored: the write fails
         instead of killing the process).

Besides the faults, debug.slow_checkpoint_write_s slows each rank's background checkpoint write
(slow_writer), so a test can see training go on while a save is in flight.

And debug.simulate_16bit_cpu, a CPU this one is not: DeepSpeed's CPU accelerator answers as on a CPU
with bf16 and fp16 instructions (AMD EPYC with avx512_bf16, Xeons with AMX), where its dtype
decisions differ from those on a CPU without them.
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import time
from pathlib import Path

from torch.distributed.checkpoint import FileSystemWriter

from llamajobs.spec import DebugSpec

# fsize's limit: above anything the worker writes but checkpoint shards (the tiny model's are ~1 MB).
FSIZE_LIMIT = 256 * 1024


def simulate_cpu(debug: DebugSpec) -> None:
    """debug.simulate_16bit_cpu: DeepSpeed's CPU accelerator reports bf16 and fp16 support and both
    among its dtypes. DeepSpeed 0.19 asks it in zero.Init (_set_dtype: fp16 where supported, else
    bf16), in the ZeRO-3 conversion of parameters built outside zero.Init (the same), in the engine's
    gradient buckets (supported_dtypes) and its dtype checks. A no-op when the switch is off."""
    if not debug.simulate_16bit_cpu:
        return
    import torch
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    CPU_Accelerator.is_bf16_supported = lambda self: True
    CPU_Accelerator.is_fp16_supported = lambda self: True
    CPU_Accelerator.supported_dtypes = lambda self: [torch.float32, torch.bfloat16, torch.float16]
    print("simulated CPU: DeepSpeed's CPU accelerator reports bf16 and fp16 support", flush=True)


def lose_a_rank(debug: DebugSpec, step: int, rank: int, world_size: int) -> None:
    """die and hang: the last rank leaves (dies, or hangs) at the boundary after step N. A no-op
    without such a fault, on the other ranks, and on one rank (nobody would be left to notice)."""
    if rank != world_size - 1 or world_size == 1:
        return
    if step == debug.fault_at("die"):
        print(f"injected fault: rank {rank} exits after step {step}", file=sys.stderr, flush=True)
        os._exit(1)
    if step == debug.fault_at("hang"):
        print(f"injected fault: rank {rank} hangs after step {step}", flush=True)
        while True:
            time.sleep(60)


def limit_file_size(debug: DebugSpec, step: int) -> None:
    """fsize: from the boundary after step N on, no file this process writes may grow past FSIZE_LIMIT."""
    if step == debug.fault_at("fsize"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        print(f"injected fault: files are limited to {FSIZE_LIMIT} bytes after step {step}", flush=True)


def slow_writer(folder: Path, delay_s: float) -> FileSystemWriter:
    """debug.slow_checkpoint_write_s: DCP's file writer, sleeping delay_s in the writing thread before it
    writes (a slow filesystem), so that a save stays in flight over several training steps."""
    class SlowWriter(FileSystemWriter):
        def write_data(self, plan, planner):
            time.sleep(delay_s)
            return super().write_data(plan, planner)
    return SlowWriter(folder)
