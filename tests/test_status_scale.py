import json
import math
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from llamajobs import metrics
from llamajobs.estimate.measured import hours_from_metrics
from llamajobs.metrics import MetricsRow
from tests.fake_runs import fake_slurm_bin, make_runs


def test_status_over_a_thousand_jobs_asks_the_cluster_once(tmp_path):
    """1,000 registered jobs, most finished: one sacct call, no torch; later calls skip the finished."""
    runs = tmp_path / "runs"
    make_runs(runs, 1000, live=5, metrics_lines=20)
    bin_dir = fake_slurm_bin(tmp_path / "bin", 1000, live=5)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "LLAMAJOBS_RUNS": str(runs)}
    probe = ("import sys, json\nfrom llamajobs.cli import main\nsys.argv = ['llamajobs', 'status', '--json', '--all']\n"
             "try:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', [m for m in ('torch', 'transformers', 'submitit') if m in sys.modules], file=sys.stderr)\n")
    for _ in range(2):
        result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        jobs = json.loads(result.stdout)["jobs"]
        assert len(jobs) == 1000 and "HEAVY []" in result.stderr
        assert sum(j["state"] == "RUNNING" for j in jobs) == 5
    calls = (bin_dir / "calls").read_text().split()
    assert calls == ["sacct", "sacct"]  # one per invocation; the second asked only for the 5 live jobs


# --- per-job commands over a long metrics file: one streamed pass, bounded memory ---

def _history(rows: int, resume_at: int) -> tuple[list[MetricsRow], list[dict]]:
    """A run logged every 2 steps, its step time varying, a validation every 50 rows, checkpoints of
    a few seconds folded into their rows' step time, and a second attempt (elapsed_s starts again)
    resumed from an earlier step after row `resume_at`; and its checkpointed events."""
    found, saves, elapsed, step, attempt = [], [], 0.0, 0, 0
    for i in range(rows):
        if i == resume_at:
            step, elapsed, attempt = step - 40, 0.0, 1
        step += 2
        pause = 7.5 if i % 97 == 96 else 0.0
        if pause:
            saves.append({"time": 1e9 + i, "event": "checkpointed", "step": step - 1, "seconds": pause})
        step_time = 2.0 + 0.5 * math.sin(i / 30) + (3.0 if i % 50 < 2 else 0.0) + pause / 2
        elapsed += 2 * step_time
        found.append(MetricsRow(step=step, total_steps=2 * rows, epoch=step / rows, loss=3.0 - i / rows, lr=1e-5,
                                grad_norm=1.0, tokens=step * 4096, tokens_per_s=8192 / step_time,
                                tokens_per_s_per_gpu=1024 / step_time, mfu=0.3 + attempt / 10, peak="a100-80g",
                                peak_flops=312e12, step_time_s=step_time, elapsed_s=elapsed, time=1e9 + i,
                                mem_gib=30.0 + (i == rows // 3), checkpoint_s=pause,
                                val_loss=2.5 - i / rows if i % 50 == 49 else None, val_s=4.0 if i % 50 == 49 else 0.0))
    return found, saves


def _write(run_dir: Path, rows: list[MetricsRow]) -> int:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / metrics.METRICS_FILE).write_text("".join(r.to_json() + "\n" for r in rows))
    return (run_dir / metrics.METRICS_FILE).stat().st_size


def test_a_thinned_read_keeps_the_measured_throughput_and_samples_the_curves(tmp_path):
    rows, saves = _history(3000, resume_at=1800)
    _write(tmp_path, rows)
    thinned = metrics.read(tmp_path, tail_bytes=None, max_rows=200)
    assert 100 <= len(thinned.rows) <= 200 and thinned.bad_lines == 0
    exact, found = hours_from_metrics(rows, saves), hours_from_metrics(thinned.rows, saves)
    for key in ("tokens_per_s", "step_s", "hours_per_epoch", "remaining_s", "mfu", "checkpoint_s", "gpu_mem_gib"):
        assert getattr(found, key) == pytest.approx(getattr(exact, key), rel=1e-9), key
    assert found.steady_steps == exact.steady_steps
    last = thinned.rows[-1]
    assert (last.step, last.loss, last.tokens, last.elapsed_s) == (rows[-1].step, rows[-1].loss, rows[-1].tokens,
                                                                   rows[-1].elapsed_s)
    validated = [r for r in thinned.rows if r.val_loss is not None]
    assert len(validated) > 20 and validated[-1].val_loss == [r for r in rows if r.val_loss is not None][-1].val_loss
    resumed = next(i for i, r in enumerate(thinned.rows[1:], 1) if r.step <= thinned.rows[i - 1].step)
    assert thinned.rows[resumed].step == rows[1800].step  # the second attempt's first row is kept as it was
    assert metrics.read(tmp_path, tail_bytes=None, max_rows=3000).rows == rows  # not too many: every row, unchanged


def _peak_of_whole_read(run_dir: Path, max_rows: int) -> int:
    tracemalloc.start()
    try:
        metrics.read(run_dir, tail_bytes=None, max_rows=max_rows)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_whole_metrics_read_takes_the_same_memory_for_a_long_file_as_for_a_short_one(tmp_path):
    rows, _ = _history(8000, resume_at=6000)
    short = _write(tmp_path / "short", rows[:2000])
    long = _write(tmp_path / "long", rows)
    peaks = [_peak_of_whole_read(tmp_path / name, max_rows=256) for name in ("short", "long")]
    assert peaks[1] < long / 2 and peaks[1] < 1.3 * peaks[0], (peaks, short, long)


def test_one_overlong_line_is_a_damaged_line_never_held_whole(tmp_path):
    rows, _ = _history(10, resume_at=99)
    _write(tmp_path, rows)
    with open(tmp_path / metrics.METRICS_FILE, "ab") as f:
        f.write(b'{"step": ' + b"1" * (8 << 20) + b"\n")  # one line of 8 MB, no row
        f.write((rows[-1].to_json() + "\n").encode())
    tracemalloc.start()
    read = metrics.read(tmp_path, tail_bytes=None)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert read.bad_lines == 1 and len(read.rows) == 11 and peak < 2 << 20


@pytest.mark.parametrize("command", [["status", "{job}"], ["plot", "{job}", "-o", "{tmp}/x.png"], ["estimate", "hours", "{job}"]])
def test_per_job_commands_read_a_long_metrics_file_in_bounded_memory(cli, tmp_path, monkeypatch, command):
    """`status JOB`, `plot` and `estimate hours JOB` hold at most MAX_ROWS rows (here 128), not the file:
    on job 2's 8,000 rows they take no more memory than on job 1's 100 (plotting itself takes some)."""
    make_runs(tmp_path / "runs", 2, live=1, metrics_lines=8000)
    short = tmp_path / "runs" / "1-job1" / metrics.METRICS_FILE
    short.write_text("".join(short.read_text().splitlines(keepends=True)[:100]))
    monkeypatch.setenv("PATH", f"{fake_slurm_bin(tmp_path / 'bin', 2, 1)}:{os.environ['PATH']}")
    monkeypatch.setattr(metrics, "MAX_ROWS", 128, raising=False)

    def peak(job: int) -> int:
        args = [a.format(tmp=tmp_path, job=job) for a in command] + ["--runs-dir", str(tmp_path / "runs")]
        tracemalloc.start()
        try:
            code, _, stderr = cli(*args)
            assert code == 0, stderr
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(1)  # once before measuring: imports (matplotlib's) are not what is measured
    size = (tmp_path / "runs" / "2-job2" / metrics.METRICS_FILE).stat().st_size
    assert peak(2) - peak(1) < size / 4, size
