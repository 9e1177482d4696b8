"""Damage never spreads: each kind of damage to one run dir gives that job a row naming its problem
(with the state its cluster still knows), and every other job's row is as if nothing happened.
SLURM is faked at the subprocess boundary (tests/fake_runs.py's sacct and squeue on PATH)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llamajobs import monitor, registry
from llamajobs.registry import Job, Registry
from tests.fake_runs import fake_slurm_bin, make_runs
from tests.other_user import as_other_user, open_tmp

N, LIVE = 6, 2  # jobs 1-4 COMPLETED, 5-6 RUNNING (fake sacct)


@pytest.fixture
def runs(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bin_dir = fake_slurm_bin(tmp_path / "bin", N, LIVE)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    make_runs(tmp_path / "runs", N, LIVE, metrics_lines=20)
    return tmp_path / "runs"


def table(runs: Path) -> dict[int, monitor.Row]:
    return {r.id: r for r in monitor.rows(Registry(runs).jobs())}


def healthy(runs: Path) -> dict[int, dict]:
    """The rows as they are before any damage (elapsed and ages moved on: left out)."""
    return {i: _stable(r) for i, r in table(runs).items()}


def _stable(r: monitor.Row) -> dict:
    return {k: v for k, v in r.to_dict().items() if k not in ("elapsed_s", "last_metric_age_s", "eta_s")}


def run_dir(runs: Path, job_id: int) -> Path:
    return runs / f"{job_id}-job{job_id}"


def damage_spec(runs: Path) -> None:
    (run_dir(runs, 2) / "spec.json").write_text("{ this is not json")


def damage_spec_types(runs: Path) -> None:
    spec = json.loads((run_dir(runs, 2) / "spec.json").read_text())
    (run_dir(runs, 2) / "spec.json").write_text(json.dumps({**spec, "nodes": "two"}))


def damage_events_array(runs: Path) -> None:
    with open(run_dir(runs, 2) / "events" / "login-1.jsonl", "a") as f:
        f.write("[1, 2, 3]\n")


def damage_events_time(runs: Path) -> None:
    with open(run_dir(runs, 2) / "events" / "login-1.jsonl", "a") as f:
        f.write(json.dumps({"time": "yesterday", "event": "finished"}) + "\n")


def damage_metrics_time(runs: Path) -> None:
    path = run_dir(runs, 2) / "metrics.jsonl"
    last = json.loads(path.read_text().splitlines()[-1])
    with open(path, "a") as f:
        f.write(json.dumps({**last, "step": last["step"] + 1, "time": "now"}) + "\n")


def damage_metrics_truncated(runs: Path) -> None:
    path = run_dir(runs, 2) / "metrics.jsonl"
    path.write_bytes(path.read_bytes()[:-40])


def damage_metrics_huge_integer(runs: Path) -> None:
    """A row whose tokens/s is an integer of 400 digits: JSON allows it, a float cannot hold it."""
    path = run_dir(runs, 2) / "metrics.jsonl"
    last = json.loads(path.read_text().splitlines()[-1])
    with open(path, "a") as f:
        f.write(json.dumps({**last, "step": last["step"] + 1, "tokens_per_s": 10**400}) + "\n")


def damage_metrics_absurd_number(runs: Path) -> None:
    path = run_dir(runs, 2) / "metrics.jsonl"
    last = json.loads(path.read_text().splitlines()[-1])
    with open(path, "a") as f:
        f.write(json.dumps({**last, "step": last["step"] + 1, "step_time_s": 1e300}) + "\n")


def damage_job_file(runs: Path) -> None:
    (run_dir(runs, 2) / registry.JOB_FILE).write_text("\x00\x01garbage")


def damage_vanished(runs: Path) -> None:
    shutil.rmtree(run_dir(runs, 2))


DAMAGE = {  # what is done to job 2 (COMPLETED) -> what its row's problem says
    "garbage spec.json": (damage_spec, "spec.json: "),
    "spec.json of wrong types": (damage_spec_types, "spec.json: "),
    "an events line that is an array": (damage_events_array, "events: 1 damaged line"),
    "an event with a string time": (damage_events_time, "events: 1 damaged line"),
    "a metrics row with a string time": (damage_metrics_time, "metrics.jsonl: 1 damaged line"),
    "metrics truncated mid-line": (damage_metrics_truncated, "metrics.jsonl: 1 damaged line"),
    "a metrics row with an integer beyond float range": (damage_metrics_huge_integer, "metrics.jsonl: 1 damaged line"),
    "a metrics row with a step time of 1e300 s": (damage_metrics_absurd_number, "metrics.jsonl: 1 damaged line"),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_one_damaged_run_dir_gives_a_row_naming_it_and_spares_the_others(runs, kind):
    before = healthy(runs)
    damage, says = DAMAGE[kind]
    damage(runs)
    after = table(runs)
    assert sorted(after) == sorted(before)
    assert says in after[2].problem, after[2].problem
    assert after[2].state == "COMPLETED"  # what sacct says: damage to files does not hide it
    assert {i: _stable(r) for i, r in after.items() if i != 2} == {i: r for i, r in before.items() if i != 2}


def test_a_garbage_job_file_still_shows_the_job(runs):
    before = healthy(runs)
    Registry(runs).close()
    damage_job_file(runs)
    Registry(runs).rebuild()  # as when the runs directory's listing changes
    after = table(runs)
    assert "job.json: not JSON" in after[2].problem
    assert after[2].cluster_job_id == "1002" and after[2].state == "COMPLETED"  # indexed before: still known
    assert {i: _stable(r) for i, r in after.items() if i != 2} == {i: r for i, r in before.items() if i != 2}


def test_a_garbage_job_file_never_indexed_is_a_row_of_unknown_state(runs):
    damage_job_file(runs)
    after = table(runs)  # the first index of these runs sees it damaged
    assert after[2].state == "UNKNOWN" and "job.json" in after[2].problem and after[2].name == "job2"
    assert all(after[i].problem is None for i in after if i != 2)


def test_a_vanished_run_dir_keeps_its_cluster_state(runs):
    jobs = Registry(runs).jobs()
    damage_vanished(runs)
    found = {r.id: r for r in monitor.rows(jobs)}  # the registry listed it a moment ago
    assert found[2].problem == f"run dir {run_dir(runs, 2)} is gone" and found[2].state == "COMPLETED"
    assert found[5].state == "RUNNING" and found[5].problem is None
    assert 2 not in table(runs)  # on the next open, the index forgets it


def test_a_metrics_file_with_bad_lines_among_good_ones_counts_them(runs):
    path = run_dir(runs, 5) / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:5] + ["[]", '{"step": "x"}'] + lines[5:]) + "\n")
    row = table(runs)[5]
    assert row.problem == "metrics.jsonl: 2 damaged lines"
    assert row.step == 20 and row.state == "RUNNING" and row.eta_s is not None  # the good rows still count


def test_an_unreadable_run_dir_is_a_row_saying_so():
    with open_tmp() as tmp:
        make_runs(tmp / "runs", 2, 0, metrics_lines=5)
        jobs = [Job(id=i, name=f"job{i}", run_dir=run_dir(tmp / "runs", i), cluster="slurm",
                    cluster_job_id=str(1000 + i), submitted_at=time.time()) for i in (1, 2)]
        for path in [tmp / "runs", *(tmp / "runs").rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)  # readable by all, but for the damage below
        run_dir(tmp / "runs", 2).chmod(0)
        found = as_other_user(lambda: [monitor.row(j, state="COMPLETED") for j in jobs])
    assert not isinstance(found, Exception), found
    assert found[0].problem is None and found[0].step == 5
    assert "is not readable" in found[1].problem and found[1].state == "COMPLETED" and found[1].step is None


def test_a_cached_row_that_is_damaged_or_of_another_version_is_computed_again(runs):
    fresh = table(runs)
    cached = {1: {"id": 1, "no_such_field": 3}, 2: {**fresh[2].to_dict(), "problem": "events: 1 damaged line"},
              3: fresh[3].to_dict()}
    found = {r.id: r for r in monitor.rows(Registry(runs).jobs(), finished=cached)}
    assert _stable(found[1]) == _stable(fresh[1])
    assert found[2].problem is None  # computed again: the damage was repaired
    assert found[3] == monitor.Row(**cached[3])


def test_a_row_of_an_eval_job_with_a_damaged_result(runs):
    from llamajobs import spec

    evaluation = spec.build({"size": "tiny", "cluster": "slurm",
                             "evaluation": {"model": "/models/x", "task": "medqa", "data": "/data/test.jsonl"}})
    (run_dir(runs, 3) / "spec.json").write_text(evaluation.to_json())
    (run_dir(runs, 3) / "eval.json").write_text('["not", "a", "result"]')
    row = table(runs)[3]
    assert row.kind == "eval" and row.accuracy is None and row.problem is None
    (run_dir(runs, 3) / "eval.json").write_text('{"accuracy": "high"}')
    assert table(runs)[3].accuracy is None


def test_forensics_passes_over_damaged_logs(tmp_path):
    """The first error is found among log folders and error files that are not what torchrun writes."""
    from llamajobs import forensics

    run = tmp_path / "1-job"
    good = run / "logs" / "attempt-0" / "node-0" / "abc" / "attempt_0"
    for rank, error in ((0, {"message": {"message": "RuntimeError: boom", "extraInfo": {"timestamp": "20"}}}),
                        (1, {"message": ["not", "a", "dict"]})):
        (good / str(rank)).mkdir(parents=True)
        (good / str(rank) / "stderr.log").write_text("Traceback (most recent call last):\n")
        (good / str(rank) / "error.json").write_text(json.dumps(error))
    (run / "logs" / "attempt-x" / "node-y").mkdir(parents=True)  # not ours: passed over
    (run / "logs" / "attempt-0" / "node-zz").mkdir()
    (good / "local").mkdir()
    (good / "local" / "stderr.log").write_text("")
    (run / "logs" / "attempt-0" / "node-0" / "host").write_text("gpu007\n")
    (run / "submitit").mkdir(parents=True)
    (run / "submitit" / "5_0_log.err").write_text(
        "Root Cause (first observed failure):\n[0]:\n  time      : 2026-13-45_99:99:99\n  host      : gpu007\n"
        "  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 9638)\n  error_file: <N/A>\n")
    job = Job(id=1, name="job", run_dir=run, cluster="local", cluster_job_id="5", submitted_at=0.0)
    first = forensics.first_error(job)
    assert (first.rank, first.host, first.message) == (0, "gpu007", "RuntimeError: boom")  # at second 20
    (death,) = forensics.torchrun_deaths(job)  # its time is garbage: the log's mtime stands in
    assert death.rank == 1 and "killed by SIGKILL" in death.message and death.time > 20
    assert sorted(forensics.rank_logs(job)) == [0, 1]
    assert forensics.traceback_log(job) == good / "0" / "stderr.log"


# --- files that are not regular files: a FIFO blocks open() and read() for ever, /dev/zero never ends ---

def _fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.symlink_to("/dev/zero")


SPECIAL = {  # job 2's file replaced -> what its row's problem says
    "metrics.jsonl a FIFO": ("metrics.jsonl", _fifo, "metrics.jsonl: is a FIFO, not a regular file"),
    "metrics.jsonl linked to /dev/zero": ("metrics.jsonl", _zero, "metrics.jsonl: is a character device"),
    "spec.json a FIFO": ("spec.json", _fifo, "spec.json: is a FIFO, not a regular file"),
    "spec.json linked to /dev/zero": ("spec.json", _zero, "spec.json: is a character device"),
    "job.json a FIFO": ("job.json", _fifo, "job.json is a FIFO, not a regular file"),
    "an events file a FIFO": ("events/other-1.jsonl", _fifo, "events/other-1.jsonl is a FIFO, not a regular file"),
    "an events file linked to /dev/zero": ("events/other-1.jsonl", _zero,
                                           "events/other-1.jsonl is a character device, not a regular file"),
}


def _cli(runs: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI in a child process, which a hang cannot take with it (timeout) nor an endless read the
    machine's memory (an address-space limit of 2 GiB: today's reader of /dev/zero fails on it)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    return subprocess.run([sys.executable, "-m", "llamajobs", *args, "--runs-dir", str(runs)], capture_output=True,
                          text=True, timeout=60, preexec_fn=limit)


@pytest.mark.parametrize("kind", list(SPECIAL))
def test_a_fifo_or_device_in_a_run_dir_is_a_row_naming_it_and_spares_the_others(runs, kind):
    before = healthy(runs)
    name, replace, says = SPECIAL[kind]
    replace(run_dir(runs, 2) / name)
    (runs / "new").mkdir()  # the listing changed: the index reads every job.json again
    (runs / "new").rmdir()
    result = _cli(runs, "status", "--json", "--all")
    assert result.returncode == 0, result.stderr
    after = {r["id"]: r for r in json.loads(result.stdout)["jobs"]}
    assert says in after[2]["problem"], after[2]["problem"]
    stable = {i: {k: v for k, v in r.items() if k not in ("elapsed_s", "last_metric_age_s", "eta_s")}
              for i, r in after.items() if i != 2}
    assert stable == {i: r for i, r in before.items() if i != 2}
    detail = _cli(runs, "status", "2")  # the job's own detail shows what it can and names the file
    assert detail.returncode == 0 and says.split(" is ")[0].rstrip(":") in detail.stdout, detail.stderr


@pytest.mark.parametrize("command", [["plot", "2", "-o", "{tmp}/x.png"], ["estimate", "hours", "2"]])
@pytest.mark.parametrize("replace", [_fifo, _zero])
def test_per_job_commands_refuse_a_metrics_file_that_is_no_file_in_one_line(runs, tmp_path, command, replace):
    replace(run_dir(runs, 2) / "metrics.jsonl")
    result = _cli(runs, *(a.format(tmp=tmp_path) for a in command))
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "metrics.jsonl cannot be read (is a " in result.stderr, result.stderr


@pytest.mark.parametrize("damage", [damage_metrics_huge_integer, damage_metrics_absurd_number])
def test_per_job_commands_pass_over_a_number_beyond_range(runs, tmp_path, cli, damage):
    damage(runs)
    for command in (["status", "2"], ["plot", "2", "-o", str(tmp_path / "x.png")], ["estimate", "hours", "2", "--json"]):
        code, stdout, stderr = cli(*command, "--runs-dir", str(runs))
        assert code == 0, (command, stderr)
    assert json.loads(stdout)["step"] == 20  # the damaged row (step 21) is left out


def test_extreme_but_finite_metrics_never_break_status_estimate_or_plot(runs, tmp_path, cli):
    """Values within range whose products are not: a step of 1e-300 s, an epoch of 1e-300, an ETA of 1e30 s."""
    path = run_dir(runs, 6) / "metrics.jsonl"  # job 6 is RUNNING: it has an ETA
    last = json.loads(path.read_text().splitlines()[-1])
    with open(path, "a") as f:
        for step in (21, 22):
            f.write(json.dumps({**last, "step": step, "step_time_s": 1e-300, "epoch": 1e-300, "elapsed_s": 1e18,
                                "total_steps": 10**18, "time": time.time()}) + "\n")
        f.write(json.dumps({**last, "step": 23, "step_time_s": 1e12, "total_steps": 10**18, "time": time.time()}) + "\n")
    for command in (["status"], ["status", "6"], ["plot", "6", "-o", str(tmp_path / "x.png")], ["estimate", "hours", "6"]):
        code, stdout, stderr = cli(*command, "--runs-dir", str(runs))
        assert code == 0, (command, stderr)


def test_numbers_beyond_range_in_events_and_eval_results_never_break_a_command(runs, tmp_path, cli):
    """Integers of 400 digits (valid JSON, no float holds them) where times, seconds and accuracies go."""
    with open(run_dir(runs, 2) / "events" / "login-1.jsonl", "a") as f:
        f.write(json.dumps({"time": 10**400, "event": "finished"}) + "\n")  # no event: a damaged line
        f.write(json.dumps({"time": 1e300, "event": "stopped", "step": 3}) + "\n")  # an event, beyond any date
        f.write(json.dumps({"time": time.time(), "event": "checkpointed", "step": 10, "seconds": 10**400}) + "\n")
        f.write(json.dumps({"time": time.time(), "event": "checkpointed", "step": 12, "seconds": 1e300}) + "\n")
    from llamajobs import spec

    evaluation = spec.build({"size": "tiny", "cluster": "slurm",
                             "evaluation": {"model": "/models/x", "task": "medqa", "data": "/data/test.jsonl"}})
    (run_dir(runs, 3) / "spec.json").write_text(evaluation.to_json())
    (run_dir(runs, 3) / "eval.json").write_text(json.dumps({"accuracy": 10**400}))
    rows = table(runs)
    assert rows[2].problem == "events: 1 damaged line" and rows[2].checkpoint_s == 1e300
    assert rows[3].accuracy is None
    for command in (["status"], ["status", "2"], ["estimate", "hours", "2"], ["plot", "2", "-o", str(tmp_path / "x.png")]):
        code, _, stderr = cli(*command, "--runs-dir", str(runs))
        assert code == 0, (command, stderr)


@pytest.mark.parametrize("replace", [_fifo, _zero])
def test_logs_refuses_a_log_that_is_no_file_in_one_line(runs, replace):
    log = run_dir(runs, 2) / "submitit" / "2_0_log.out"
    log.parent.mkdir(exist_ok=True)
    replace(log)
    result = _cli(runs, "logs", "2")
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert "2_0_log.out" in result.stderr and "not a regular file" in result.stderr, result.stderr


def test_logs_prints_a_long_log_whole(runs):
    log = run_dir(runs, 2) / "submitit" / "2_0_log.out"
    log.parent.mkdir(exist_ok=True)
    text = "".join(f"line {i}\n" for i in range(50_000))  # several of read_log's pieces
    log.write_text(text)
    result = _cli(runs, "logs", "2")
    assert result.returncode == 0 and result.stdout == text, result.stderr
