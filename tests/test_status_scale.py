import json
import os
import subprocess
import sys

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
