"""The node launcher's shield under DeepSpeed's own per-node launcher (deepspeed.launcher.launch, what
`--launcher deepspeed` runs on each node): SLURM sends its SIGTERM to every process of the step, and
launch.py installs a SIGTERM handler that kills its workers whatever disposition it inherited. Real
launch.py, a stand-in worker (no training: what matters is who survives the signal)."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from llamajobs.cluster.local import exited
from llamajobs.launcher import NodeRun

WORKER = """\
import os, sys, time
from pathlib import Path
here = Path(sys.argv[1])
(here / "worker").write_text(str(os.getpid()))
while not (here / "done").exists():
    time.sleep(0.1)
"""


def launch_sh(run_dir: Path) -> None:
    """launch.sh as the deepspeed branch of the template ends: exec DeepSpeed's launch.py for this node."""
    (run_dir / "worker.py").write_text(WORKER)
    world = base64.urlsafe_b64encode(json.dumps({"localhost": [0]}).encode()).decode()
    (run_dir / "launch.sh").write_text(
        f"exec {sys.executable} -u -m deepspeed.launcher.launch --world_info={world} --master_addr=127.0.0.1 "
        f'--master_port=29599 --no_local_rank {run_dir / "worker.py"} {run_dir} > {run_dir / "out"} 2>&1\n')


def wait_for(predicate, timeout: float = 120):
    deadline = time.time() + timeout
    while not (value := predicate()):
        assert time.time() < deadline
        time.sleep(0.1)
    return value


def worker_pid(run_dir: Path) -> int:
    return int(wait_for(lambda: (run_dir / "worker").exists() and (run_dir / "worker").read_text().strip()))


def test_deepspeed_launch_py_keeps_its_workers_through_sigterm_under_the_shield(tmp_path, monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_NODEID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(name, raising=False)

    # Unshielded but for an ignored SIGTERM (the shield before DeepSpeed's launcher was considered):
    # launch.py's own handler takes the signal and starts killing its workers.
    bare = tmp_path / "ignored-only"
    bare.mkdir()
    launch_sh(bare)
    ignored = subprocess.Popen(["bash", str(bare / "launch.sh")],
                               preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
    worker = worker_pid(bare)
    os.kill(ignored.pid, signal.SIGTERM)
    wait_for(lambda: "Killing subprocess" in (bare / "out").read_text(), timeout=20)
    ignored.kill()  # (it would SIGKILL the worker after 30 s)
    os.kill(worker, signal.SIGKILL)
    ignored.wait()

    # The launcher's shield: SIGTERM to every process (as SLURM sends it) changes nothing.
    launch_sh(tmp_path)
    run = NodeRun(str(tmp_path), stop_wait_s=5)
    run.start(dict(os.environ))
    worker = worker_pid(tmp_path)
    for pid in (run.process.pid, worker):  # launch.py (bash exec'd it) and its worker
        os.kill(pid, signal.SIGTERM)
    time.sleep(1.0)
    assert not exited(run.process.pid) and not exited(worker)
    (tmp_path / "done").touch()  # the worker ends on its own, as after its save
    assert run.process.wait(timeout=30) == 0
    out = (tmp_path / "out").read_text()
    assert "Killing subprocess" not in out and "received SIGTERM" not in out, out
    assert "exits successfully" in out
