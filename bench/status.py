"""How long `llamajobs status` takes over 1,000 registered jobs (995 finished), against reading every
run's metrics and events naively; and what a per-job command (`status JOB`, `plot`, `estimate hours
JOB`) costs on one long metrics file, read whole (as before) against the streamed, thinned read, each
in a fresh process (time and peak RSS). Run from the repository root:
    python bench/status.py [--lines 400000]    (400,000 rows: a metrics file of ~170 MB)"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from llamajobs import metrics  # noqa: E402
from llamajobs.estimate.measured import hours_from_metrics  # noqa: E402
from llamajobs.metrics import MetricsRow  # noqa: E402
from tests.fake_runs import fake_slurm_bin, make_runs  # noqa: E402

N, LIVE, LINES = 1000, 5, 2000


def naive(runs: Path) -> int:
    """What a script without the index does: parse every metrics and events file in full."""
    parsed = 0
    for run_dir in runs.iterdir():
        for path in [run_dir / "metrics.jsonl", *run_dir.glob("events/*.jsonl")]:
            parsed += len([json.loads(line) for line in path.read_text().splitlines()])
    return parsed


def whole_file_rows(run_dir: Path) -> list[MetricsRow]:
    """The per-job read before the streamed one: the whole file in memory, every row parsed and kept."""
    rows = []
    for line in (run_dir / metrics.METRICS_FILE).read_bytes().decode(errors="replace").splitlines():
        if (row := metrics.parse(line.encode())) is not None:
            rows.append(row)
    return rows


def measure(way: str, run_dir: Path) -> None:
    """One way of reading, in this (fresh) process: its seconds and the process's peak RSS growth, as JSON."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    rows = whole_file_rows(run_dir) if way == "before" else metrics.read(run_dir, tail_bytes=None).rows
    hours_from_metrics(rows)
    seconds = time.perf_counter() - start
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(json.dumps({"seconds": seconds, "peak_mb": grown_kib / 1024, "rows": len(rows)}))


def per_job(lines: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        with open(run_dir / metrics.METRICS_FILE, "w") as f:
            for step in range(1, lines + 1):
                f.write(MetricsRow(step=step, total_steps=2 * lines, epoch=step / lines, loss=3.0 - step / lines,
                                   lr=2e-5, grad_norm=1.0, tokens=step * 65536, tokens_per_s=20000.0 + step % 7,
                                   tokens_per_s_per_gpu=2500.0, mfu=0.4, peak="a100-80g", peak_flops=312e12,
                                   step_time_s=3.2 + step % 5 / 10, elapsed_s=step * 3.2, time=1.7e9 + step * 3.2,
                                   mem_gib=40.0).to_json() + "\n")
        size = (run_dir / metrics.METRICS_FILE).stat().st_size
        found = {}
        for way in ("before", "after"):
            result = subprocess.run([sys.executable, __file__, "--measure", way, str(run_dir)], check=True,
                                    capture_output=True, text=True)
            found[way] = json.loads(result.stdout)
        b, a = found["before"], found["after"]
        print(f"per-job read of one metrics file: {lines:,} rows, {size / 1e6:.0f} MB")
        print(f"  before (whole file, every row kept): {b['seconds']:.2f} s, peak RSS +{b['peak_mb']:.0f} MB, "
              f"{b['rows']:,} rows")
        print(f"  after (streamed, thinned):           {a['seconds']:.2f} s, peak RSS +{a['peak_mb']:.0f} MB, "
              f"{a['rows']:,} rows")
        print(f"  ratio before / after: time {b['seconds'] / a['seconds']:.2f}x, "
              f"peak memory {b['peak_mb'] / max(a['peak_mb'], 1):.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=400_000, help="rows of the per-job metrics file")
    parser.add_argument("--only", choices=("status", "per-job"))
    parser.add_argument("--measure", nargs=2, metavar=("WAY", "RUN_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.measure[0], Path(args.measure[1]))
        return
    if args.only != "per-job":
        all_jobs()
    if args.only != "status":
        per_job(args.lines)


def all_jobs() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_runs(root / "runs", N, LIVE, LINES)
        bin_dir = fake_slurm_bin(root / "bin", N, LIVE)
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "XDG_CACHE_HOME": str(root / "cache"),
               "LLAMAJOBS_RUNS": str(root / "runs")}
        command = [sys.executable, "-m", "llamajobs", "status", "--json", "--all"]

        def timed(fn) -> float:
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        cold = timed(lambda: subprocess.run(command, env=env, check=True, capture_output=True))
        warm = statistics.median(timed(lambda: subprocess.run(command, env=env, check=True, capture_output=True))
                                 for _ in range(5))
        start_only = statistics.median(timed(lambda: subprocess.run([sys.executable, "-m", "llamajobs", "--help"],
                                                                    env=env, check=True, capture_output=True))
                                       for _ in range(5))
        baseline = statistics.median(timed(lambda: naive(root / "runs")) for _ in range(3))
        print(f"{N} jobs ({N - LIVE} finished), {LINES} metric lines each")
        print(f"status, first call (index built, every row computed): {cold:.3f} s")
        print(f"status, later calls (finished rows from the index):   {warm:.3f} s "
              f"(of which interpreter + CLI start {start_only:.3f} s)")
        print(f"naive read of every metrics and events file (in process): {baseline:.3f} s")
        print(f"ratio naive / status: {baseline / warm:.1f}x")


if __name__ == "__main__":
    main()
