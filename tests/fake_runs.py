"""A runs directory of many SLURM jobs, written the way submit and the worker write them, for
status speed tests and bench/status.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

from llamajobs import registry, spec
from llamajobs.metrics import MetricsRow
from llamajobs.registry import Job

SPEC_JSON = spec.build({"size": "7b", "cluster": "slurm", "max_steps": 100}).to_json()


def make_runs(runs: Path, n: int, live: int, metrics_lines: int = 200) -> list[Job]:
    """n jobs with cluster ids 1000+i; the last `live` of them still running (recent metrics)."""
    now = time.time()
    jobs = []
    for i in range(1, n + 1):
        run_dir = runs / f"{i}-job{i}"
        (run_dir / "events").mkdir(parents=True)
        (run_dir / "spec.json").write_text(SPEC_JSON)
        started = now - 30 * 86400 + i * 60 if i <= n - live else now - metrics_lines * 3.2 - 1
        (run_dir / "events" / "login-1.jsonl").write_text(
            json.dumps({"time": started - 5, "event": "submitted"}) + "\n" +
            json.dumps({"time": started, "event": "started", "world_size": 8}) + "\n")
        with open(run_dir / "metrics.jsonl", "w") as f:
            for step in range(1, metrics_lines + 1):
                row = MetricsRow(step=step, total_steps=10 * metrics_lines, epoch=step / metrics_lines,
                                 loss=3.0 - step / metrics_lines, lr=2e-5, grad_norm=1.0, tokens=step * 65536,
                                 tokens_per_s=20000.0, tokens_per_s_per_gpu=2500.0, mfu=0.4, peak="a100-80g",
                                 peak_flops=312e12, step_time_s=3.2, elapsed_s=step * 3.2, time=started + step * 3.2,
                                 mem_gib=40.0)
                f.write(row.to_json() + "\n")
        job = Job(id=i, name=f"job{i}", run_dir=run_dir, cluster="slurm", cluster_job_id=str(1000 + i),
                  submitted_at=started - 5)
        registry.write_job_file(job)
        jobs.append(job)
    return jobs


def fake_slurm_bin(folder: Path, n: int, live: int) -> Path:
    """sacct/squeue that answer for the jobs above and count their calls in folder/calls."""
    folder.mkdir(parents=True, exist_ok=True)
    calls = folder / "calls"
    sacct = folder / "sacct"
    sacct.write_text(
        "#!/usr/bin/env python3\n"
        "import sys\n"
        f"open({str(calls)!r}, 'a').write('sacct\\n')\n"
        "ids = sys.argv[sys.argv.index('-j') + 1].split(',')\n"
        f"for i in ids:\n    print(i + '|' + ('RUNNING' if int(i) - 1000 > {n - live} else 'COMPLETED'))\n")
    squeue = folder / "squeue"
    squeue.write_text(f"#!/bin/sh\necho squeue >> {calls}\n")
    for f in (sacct, squeue):
        f.chmod(0o755)
    return folder
