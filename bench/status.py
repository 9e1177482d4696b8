"""How long `llamajobs status` takes over 1,000 registered jobs (995 finished), against reading every
run's metrics and events naively. Run from the repository root: python bench/status.py"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.fake_runs import fake_slurm_bin, make_runs  # noqa: E402

N, LIVE, LINES = 1000, 5, 2000


def naive(runs: Path) -> int:
    """What a script without the index does: parse every metrics and events file in full."""
    parsed = 0
    for run_dir in runs.iterdir():
        for path in [run_dir / "metrics.jsonl", *run_dir.glob("events/*.jsonl")]:
            parsed += len([json.loads(line) for line in path.read_text().splitlines()])
    return parsed


def main() -> None:
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
