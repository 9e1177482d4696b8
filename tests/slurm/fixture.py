"""A real single-host SLURM cluster for tests, started by ``tests/slurm/cluster.sh``.

Use it from a session-scoped fixture (starting the cluster takes 2 s, or about 20 s the first
time on a machine, when apt installs the packages)::

    @pytest.fixture(scope="session")
    def slurm():
        yield from slurm_cluster()

Without root or apt-get the tests that request it are skipped. Where they can run, a cluster
that does not start is an error, not a skip: CI must fail rather than silently test nothing.

Each start is fresh, so job ids restart at 1: give submitit a new folder per cluster start
(pytest's ``tmp_path``), or result pickles of an earlier run answer for new jobs.

The cluster's whole configuration lives under its base directory (no /etc, its own munged), so it
runs beside any other SLURM on the host; every SLURM command must then be given its SLURM_CONF. The
fixture sets SLURM_CONF in this process's environment for the session (the CLI subprocesses, sbatch,
scontrol and the jobs inherit it) and restores it afterwards.

There is one cluster per base directory (fixed ports), and ``cluster.sh start`` stops a running one
first. So two test sessions on one host would pull the cluster from under each other: a lock file
held for the whole session makes a second session wait for the first.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).resolve().parent / "cluster.sh"
DEFAULT_BASE = "/tmp/llamajobs-slurm"
START_TIMEOUT_S = 300  # apt install on a cold machine included
STOP_TIMEOUT_S = 120
IDLE_TIMEOUT_S = 60
LOCK_TIMEOUT_S = 1800  # how long a second test session on this host waits for the first
_active = False  # a slurm_cluster() generator is between start and stop in this process


@dataclass(frozen=True)
class SlurmCluster:
    nodes: list[str]    # node names, e.g. ["n1", "n2"] (they need not resolve: NodeAddr is 127.0.0.1)
    gpus_per_node: int  # fake GPUs advertised per node as gres gpu
    base: Path          # state, logs, database and configuration of the cluster (LLAMAJOBS_SLURM_BASE)
    conf: Path          # its slurm.conf: SLURM_CONF for every SLURM command
    grace_s: int        # GraceTime of partition "low", which a job on partition "high" preempts


def _run_script(action: str, timeout: float) -> tuple[int, str]:
    """Run ``cluster.sh ACTION``; return (exit code, combined output).

    Output goes through a file, not a pipe: the daemons it starts must not be able to hold a
    pipe of ours open, or reading it to EOF would wait for them.
    """
    with tempfile.TemporaryFile(mode="w+") as out:
        try:
            code = subprocess.run([str(CLUSTER_SH), action], stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
        out.seek(0)
        text = out.read()
    if code is None:
        return 124, text + f"\n[cluster.sh {action} did not finish within {timeout:.0f} s]"
    return code, text


def _lock(path: Path):
    """Take an exclusive flock on path (waiting up to LOCK_TIMEOUT_S); return the open file."""
    f = open(path, "a")
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    told = False
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return f
        except BlockingIOError:
            if time.monotonic() > deadline:
                f.close()
                raise RuntimeError(f"another test session held {path} for {LOCK_TIMEOUT_S} s")
            if not told:
                print(f"\nwaiting for another test session's SLURM cluster ({path})", flush=True)
                told = True
            time.sleep(1)


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _sinfo_nodes() -> dict[str, tuple[str, str]]:
    """{node: (state, gres)} as sinfo reports it now ({} if sinfo fails)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T %G"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    if out.returncode != 0:
        return {}
    nodes: dict[str, tuple[str, str]] = {}
    for line in out.stdout.splitlines():
        name, state, gres = (line.split() + ["", ""])[:3]
        nodes[name] = (state, gres)  # -N lists a node once per partition: same values
    return nodes


def _gpus(gres: str) -> int:
    """8 from 'gpu:8' or 'gpu:a100:8(S:0)'; 0 without gpus."""
    for item in gres.split(","):
        parts = item.split("(")[0].split(":")
        if parts[0] == "gpu" and parts[-1].isdigit():
            return int(parts[-1])
    return 0


def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start the cluster, yield a SlurmCluster, stop it afterwards (a generator for a fixture)."""
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (it installs packages and starts daemons)")
    if shutil.which("apt-get") is None:
        pytest.skip("the local SLURM cluster needs apt-get (Debian/Ubuntu) to install slurm-wlm")

    global _active
    if _active:
        # flock would make this process wait for itself
        raise RuntimeError("slurm_cluster() is already running in this test session: request one "
                           "session fixture that wraps it, do not define a second")
    base = Path(os.environ.get("LLAMAJOBS_SLURM_BASE", DEFAULT_BASE))
    base.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(Path(f"{base}.lock"))  # released when the file closes, at the very end
    _active = True
    try:
        yield from _started(base)
    finally:
        _active = False
        lock.close()


def _started(base: Path) -> Iterator[SlurmCluster]:
    conf = base / "etc" / "slurm.conf"
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield from _started_with_conf(base, conf)
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous


def _started_with_conf(base: Path, conf: Path) -> Iterator[SlurmCluster]:
    t0 = time.monotonic()
    code, out = _run_script("start", START_TIMEOUT_S)
    if code != 0:
        # leave nothing half-started behind, then fail loudly
        _run_script("stop", STOP_TIMEOUT_S)
        raise RuntimeError(f"{CLUSTER_SH} start failed (exit {code}); last lines:\n{_tail(out)}")

    try:
        # cluster.sh waits for this too; checking again here costs nothing and guards the
        # contract the tests rely on
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while True:
            nodes = _sinfo_nodes()
            if nodes and all(state == "idle" for state, _ in nodes.values()):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"SLURM nodes not idle {IDLE_TIMEOUT_S} s after start: {nodes}\n"
                                   f"cluster.sh output:\n{_tail(out)}")
            time.sleep(0.5)
        names = sorted(nodes, key=lambda n: (len(n), n))  # n1, n2, ..., n10
        gpus = {_gpus(gres) for _, gres in nodes.values()}
        print(f"\nlocal SLURM cluster up in {time.monotonic() - t0:.1f} s: nodes {names}, "
              f"gpus per node {sorted(gpus)}, base {base}")
        cluster = SlurmCluster(nodes=names, gpus_per_node=min(gpus), base=base, conf=conf,
                               grace_s=int(os.environ.get("LLAMAJOBS_SLURM_GRACE", "30")))
    except BaseException:
        _run_script("stop", STOP_TIMEOUT_S)
        raise

    try:
        yield cluster
    finally:
        code, out = _run_script("stop", STOP_TIMEOUT_S)
        if code != 0:
            # daemons or job steps would be left running: make it visible
            raise RuntimeError(f"{CLUSTER_SH} stop failed (exit {code}); last lines:\n{_tail(out)}")
