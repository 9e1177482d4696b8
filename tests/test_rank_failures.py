"""Failures end fast and say why: a rank that dies, a rank that hangs, a rank that reached the
rendezvous but never joins the process group. Real torchrun launches of the tiny model on this CPU
(gloo), the faults injected through spec.json's debug section (die:N, hang:N, hang:0); every launch runs
with --max-restarts 0, as the launch script does. The local-cluster test of `status` naming the dead
rank is in test_local_cluster.py."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from llamajobs import forensics
from llamajobs.spec import JobSpec
from llamajobs.worker.parallel import STAGES, preflight_report
from tests.conftest import REPO, set_fault

TIMEOUT_MINUTES = 0.05  # 3 s: the collective timeout (and so the preflight's) of these launches
# Start-up of a launch here (imports, the model, two ranks on 2 shared cores) takes 5-10 s; exits
# are measured from the moment of the fault, with room for a loaded machine.
EXIT_WITHIN_S = 30


def new_run(tmp_path: Path, tokenizer_dir: Path, procs_per_node: int = 2) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(tokenizer_dir, run_dir / "tokenizer")
    spec = JobSpec(size="tiny", seq_len=64, global_batch=8, micro_batch=2, lr=3e-3, max_steps=6,
                   procs_per_node=procs_per_node, collective_timeout_minutes=TIMEOUT_MINUTES)
    (run_dir / "spec.json").write_text(spec.to_json())
    return run_dir


class Launch:
    """One torchrun (one node), its output read as it comes, with the time of each line."""

    def __init__(self, run_dir: Path, fault: str, *, nnodes: int = 1, node_rank: int = 0, port: int = 0) -> None:
        if node_rank == 0:  # (the nodes share the run dir)
            set_fault(run_dir, fault)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        where = ["--standalone"] if nnodes == 1 else ["--nnodes", str(nnodes), "--node-rank", str(node_rank),
                                                       "--master-addr", "127.0.0.1", "--master-port", str(port)]
        self.log_dir = run_dir / "logs" / f"node-{node_rank}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *where, "--nproc-per-node", str(2 // nnodes),
             "--max-restarts", "0", "--log-dir", str(self.log_dir), "--redirects", "3", "--tee", "3",
             "-m", "llamajobs.worker", str(run_dir)],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.ended: float | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.monotonic(), line))
        self.process.wait()
        self.ended = time.monotonic()

    def wait(self, timeout: float = 180) -> int:
        try:
            self._reader.join(timeout)
            assert self.ended is not None, f"still running after {timeout} s:\n{self.output[-3000:]}"
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, 9)
        return self.process.returncode

    def time_of(self, text: str) -> float:
        return next(t for t, line in self.lines if text in line)

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)

    def error_files(self) -> dict[int, str]:
        """{local rank: the message of its torchrun error file}."""
        return {int(p.parent.name): json.loads(p.read_text())["message"]["message"]
                for p in self.log_dir.glob("*/attempt_0/*/error.json")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_preflight_report_names_the_ranks_that_lag_furthest() -> None:
    store = dist.HashStore()
    for rank, stage in [(0, "passed"), (1, "joining"), (2, "joining"), (3, "joined")]:
        for earlier in list(STAGES)[:list(STAGES).index(stage) + 1]:
            store.set(f"{earlier}/{rank}", f"node{rank // 2}")
    assert preflight_report(store, 4, timedelta(seconds=3)).startswith(
        "preflight: rank 1 on node0, rank 2 on node1 did not finish joining the process group (every pair of hosts "
        "must reach each other) within 3 s; check that node's network")
    assert preflight_report(store, 6, timedelta(minutes=5)).startswith(
        "preflight: rank(s) 4, 5 of 6 never reached the rendezvous store within 300 s")


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_other_node_within_seconds(tmp_path, tokenizer_dir):
    """Two nodes (two torchruns, one rank each): node 1's rank exits without a Python error after
    step 3; node 0's torchrun cannot kill it for us, so its rank must notice by itself (gloo sees the
    connection close) and end, not wait out the collective timeout or hang."""
    run_dir = new_run(tmp_path, tokenizer_dir, procs_per_node=1)
    port = free_port()
    nodes = [Launch(run_dir, "die:3", nnodes=2, node_rank=n, port=port) for n in (0, 1)]
    codes = [node.wait() for node in nodes]
    assert codes[0] != 0 and codes[1] != 0, nodes[0].output[-3000:]
    died = nodes[1].time_of("injected fault: rank 1 exits after step 3")
    print(f"rank 1 died; node 0 exited {nodes[0].ended - died:.2f} s later, node 1 {nodes[1].ended - died:.2f} s")
    assert nodes[0].ended - died < EXIT_WITHIN_S
    error = nodes[0].error_files()[0]  # "Connection closed by peer", or "reset": a gloo pair error
    assert "gloo/transport/tcp/pair.cc" in error and "Connection" in error, error


@pytest.mark.slow
def test_a_rank_that_hangs_fails_the_job_after_the_collective_timeout(tmp_path, tokenizer_dir):
    """Rank 1 stops taking part after step 3 (alive, silent): rank 0 waits in the next collective
    for the collective timeout (3 s here, --collective-timeout-minutes), fails, and torchrun stops
    rank 1: the job ends instead of hanging."""
    run_dir = new_run(tmp_path, tokenizer_dir)
    launch = Launch(run_dir, "hang:3")
    assert launch.wait() != 0
    waited = launch.ended - launch.time_of("injected fault: rank 1 hangs after step 3")
    print(f"rank 1 hung; the job exited {waited:.2f} s later (collective timeout {TIMEOUT_MINUTES * 60:g} s)")
    assert TIMEOUT_MINUTES * 60 <= waited < TIMEOUT_MINUTES * 60 + EXIT_WITHIN_S
    assert "Timed out waiting 3000ms" in launch.error_files()[0]
    # status explains it: the rank named is the one that waited, not the one that hung
    assert "waited --collective-timeout-minutes" in forensics.collective_timeout_hint(launch.error_files()[0])
    assert forensics.collective_timeout_hint("RuntimeError: injected fault at step 3") is None


@pytest.mark.slow
def test_the_preflight_names_a_rank_that_reached_the_rendezvous_but_never_joined(tmp_path, tokenizer_dir):
    """hang:0: rank 1 reaches torchrun's rendezvous and stops before joining the process group (as a
    node with a wrong network interface would). Within the preflight's timeout rank 0 says which
    rank and host, in one line and in its torchrun error file, which `status` shows."""
    run_dir = new_run(tmp_path, tokenizer_dir)
    launch = Launch(run_dir, "hang:0")
    assert launch.wait() != 0
    waited = launch.ended - launch.time_of("injected fault: rank 1 hangs after step 0")
    print(f"rank 1 never joined; the job exited {waited:.2f} s later (preflight timeout {TIMEOUT_MINUTES * 60:g} s)")
    assert waited < TIMEOUT_MINUTES * 60 + EXIT_WITHIN_S
    expected = (f"preflight: rank 1 on {socket.gethostname()} reached the rendezvous but did not start joining the "
                f"process group within 3 s; check that node's network")
    assert expected in launch.error_files()[0]
    assert f"error: {expected}" in launch.output
