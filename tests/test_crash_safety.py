"""SIGKILL at random points while checkpoints are being written never costs more than the steps
since the last complete checkpoint: `latest` and the newest complete checkpoint stay loadable, and a
relaunch resumes from it. Real torchrun, real DCP saves (one every step, so kills land in saves)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamajobs.cluster.local import descendants, exited
from llamajobs.spec import JobSpec
from llamajobs.worker.checkpoint import (complete_steps, describe_write_failure, mount_point, newest_complete_step,
                                         write_failure, write_synced)
from tests.conftest import REPO, assert_exit_0, set_fault, torchrun

pytestmark = pytest.mark.slow

KILLS = 3
STEPS = 120


def launch(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "llamajobs.worker", str(run_dir)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_during_saves_keeps_the_last_complete_checkpoint(tmp_path, tokenizer_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(tokenizer_dir, run_dir / "tokenizer")
    spec = JobSpec(size="tiny", seq_len=64, global_batch=8, micro_batch=2, max_steps=STEPS, lr=3e-3,
                   checkpoint_every_steps=1, keep_checkpoints=2, procs_per_node=2)
    (run_dir / "spec.json").write_text(spec.to_json())
    rng = random.Random(0)
    survived = []
    for _ in range(KILLS):
        before = newest_complete_step(run_dir / "checkpoints") or 0
        process = launch(run_dir)
        deadline = time.time() + 120
        while (newest_complete_step(run_dir / "checkpoints") or 0) < before + 2:  # resumed and saving again
            assert process.poll() is None and time.time() < deadline, "the worker did not resume and save"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.3))  # lands inside a save most of the time: one per 40 ms step
        # torchrun's workers live in sessions of their own: kill the whole tree, as SLURM does.
        tree = [process.pid, *descendants(process.pid)]
        for pid in tree:
            os.kill(pid, signal.SIGKILL)
        process.wait()
        while not all(exited(p) for p in tree):
            time.sleep(0.05)
        root = run_dir / "checkpoints"
        newest = newest_complete_step(root)
        assert newest is not None and newest >= before + 2
        assert json.loads((root / f"step-{newest}" / "meta.json").read_text())["complete"] is True
        latest = (root / "latest").read_text().strip()
        assert int(latest.removeprefix("step-")) in complete_steps(root)  # never names a broken one
        survived.append(newest)
    # The last relaunch resumes from the newest complete checkpoint and runs to the end.
    assert_exit_0(torchrun("-m", "llamajobs.worker", str(run_dir), timeout=300))
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))  # no step lost or logged twice
    resumed = [json.loads(line)["step"] for p in (run_dir / "events").glob("*.jsonl")
               for line in p.read_text().splitlines() if json.loads(line)["event"] == "resumed"]
    assert sorted(resumed) == sorted(survived)
    assert (run_dir / "final" / "config.json").exists()


# --- a full filesystem during a save ---

FULL_DISK_SPEC = dict(size="tiny", seq_len=64, global_batch=8, micro_batch=2, lr=3e-3, procs_per_node=2, max_steps=6,
                      checkpoint_every_steps=2)  # saves at 2 and 4: the one at 4 finds no room


def new_run(tmp_path: Path, tokenizer_dir: Path, **spec: object) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copytree(tokenizer_dir, run_dir / "tokenizer")
    (run_dir / "spec.json").write_text(JobSpec(**{**FULL_DISK_SPEC, **spec}).to_json())
    return run_dir


def run_worker(run_dir: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    """One torchrun launch to its end, each rank's output in RUN_DIR/logs (as the launch script does)."""
    set_fault(run_dir, fault)
    return torchrun("--max-restarts", "0", "--log-dir", str(run_dir / "logs"), "--redirects", "3",
                    "-m", "llamajobs.worker", str(run_dir), timeout=300)


def rank_logs(run_dir: Path, name: str) -> dict[int, Path]:
    """{rank: its file `name`} of the newest launch (torchrun: logs/<run id>/attempt_0/<rank>/)."""
    newest = max((run_dir / "logs").iterdir(), key=lambda p: p.stat().st_mtime)
    return {int(p.parent.name): p for p in newest.glob(f"attempt_0/*/{name}")}


def assert_the_save_failed_cleanly(run_dir: Path, result: subprocess.CompletedProcess, reason: str,
                                   mount: Path) -> str:
    """The save of step 4 failed: non-zero exit, step-2 still `latest` and complete, nothing partial
    left, and one line on every rank's stderr naming the reason and the filesystem. Returns the line."""
    assert result.returncode != 0, result.stderr[-3000:]
    root = run_dir / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-2"]  # no .tmp-step-4-*, no .trash-*
    assert (root / "latest").read_text() == "step-2\n" and complete_steps(root) == [2]
    lines = []
    for rank, stderr in sorted(rank_logs(run_dir, "stderr.log").items()):
        errors = [line for line in stderr.read_text().splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and "Traceback" not in stderr.read_text(), stderr.read_text()[-3000:]
        lines.append(errors[0])
    assert len(lines) == 2 and lines[0] == lines[1]  # every rank says the same
    line = lines[0]
    assert "checkpoint of step 4 failed on rank " in line and reason in line
    assert f"filesystem mounted at {mount}: " in line and " bytes free; the save needs about " in line
    assert "step-2 is kept as the latest checkpoint" in line
    # torchrun's error file holds it too: `status JOB` shows it as the job's first error.
    error_file = json.loads(rank_logs(run_dir, "error.json")[0].read_text())
    assert line.removeprefix("error: ") in error_file["message"]["message"]
    return line


def test_a_save_past_the_file_size_limit_fails_cleanly_and_the_run_resumes(tmp_path, tokenizer_dir):
    """EFBIG, a real one: at step 3 every rank lowers its RLIMIT_FSIZE below a checkpoint shard's size."""
    run_dir = new_run(tmp_path, tokenizer_dir)
    result = run_worker(run_dir, "fsize:3")
    assert_the_save_failed_cleanly(run_dir, result, "file-size limit (ulimit -f) [EFBIG]", mount_point(run_dir))
    # The kept checkpoint is loadable: a relaunch resumes from it and runs to the end.
    assert_exit_0(run_worker(run_dir))
    resumed = [json.loads(line)["step"] for p in (run_dir / "events").glob("*.jsonl")
               for line in p.read_text().splitlines() if json.loads(line)["event"] == "resumed"]
    assert resumed == [2] and (run_dir / "final" / "config.json").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs (one checkpoint of the tiny model is 2.3 MB), where mounting is allowed."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN); the EFBIG test covers the save path")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_save_on_a_full_filesystem_fails_cleanly(tmp_path, tokenizer_dir, small_tmpfs):
    """ENOSPC, a real one: the checkpoints live on a tmpfs with room for one checkpoint, not two."""
    run_dir = new_run(tmp_path, tokenizer_dir)
    (run_dir / "checkpoints").symlink_to(small_tmpfs)
    result = run_worker(run_dir)
    # ENOSPC reaches DCP's writer as torch.save's "unexpected pos" (a short write), without the errno.
    line = assert_the_save_failed_cleanly(run_dir, result, "no space left on the filesystem", small_tmpfs)
    assert "free space there (or lower --keep-checkpoints)" in line


def test_a_real_enospc_is_described_by_errno_filesystem_and_the_kept_checkpoint(tmp_path):
    """The kernel's own ENOSPC (/dev/full), without a process group or a mount."""
    root = tmp_path / "checkpoints"
    (root / "step-2").mkdir(parents=True)
    (root / "step-2" / "__0_0.distcp").write_bytes(b"x" * 1000)
    (root / "step-2" / "meta.json").write_text('{"complete": true}')
    with pytest.raises(OSError) as caught:
        write_synced(Path("/dev/full"), b"shards")
    line = describe_write_failure(write_failure(1, caught.value, root), root / ".tmp-step-4-1", 4)
    assert line.startswith(f"checkpoint of step 4 failed on rank 1: no space left on the filesystem [ENOSPC] "
                           f"writing into {root / '.tmp-step-4-1'}; filesystem mounted at {mount_point(root)}: ")
    assert "the save needs about 1,018 bytes (the size of step-2)" in line
    assert "step-2 is kept as the latest checkpoint: free space there (or lower --keep-checkpoints)" in line
