"""The operations behind the CLI (llamajobs/ops.py), called directly: run dirs written here the way
submit and the worker write them, and a fake cluster Backend where a cluster would answer. The
end-to-end runs through a real local cluster are in test_local_cluster.py."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from llamajobs import cluster, evaluate, events, monitor, ops, registry, spec
from llamajobs.errors import Failure, SpecError
from llamajobs.metrics import MetricsRow
from llamajobs.registry import Job
from llamajobs.spec import EvalSpec

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics_row(step: int, now: float) -> MetricsRow:
    return MetricsRow(step=step, total_steps=10, epoch=step / 10, loss=3.0 - 0.1 * step, lr=1e-3, grad_norm=1.0,
                      tokens=step * 1024, tokens_per_s=2000.0, tokens_per_s_per_gpu=1000.0, mfu=None,
                      peak="cpu-nominal", peak_flops=None, step_time_s=0.5, elapsed_s=step * 0.5,
                      time=now - 100 + step, mem_gib=0.5)


def make_run(runs: Path, job_id: int = 1, steps: int = 10, finished: bool = True, **spec_fields) -> Job:
    """A local job's run dir as submit and the worker leave it: spec.json, job.json, events and
    metrics; its controller pid is one no process has."""
    now = time.time()
    run_dir = runs / f"{job_id}-run{job_id}"
    run_dir.mkdir(parents=True)
    (run_dir / "spec.json").write_text(spec.build({"cluster": "local", "max_steps": max(steps, 1), **spec_fields})
                                       .to_json())
    job = Job(id=job_id, name=f"run{job_id}", run_dir=run_dir, cluster="local", cluster_job_id="999999999",
              submitted_at=now - 200)
    registry.write_job_file(job)
    events.record(run_dir, "started")
    (run_dir / "metrics.jsonl").write_text("".join(metrics_row(s, now).to_json() + "\n" for s in range(1, steps + 1)))
    if finished:
        events.record(run_dir, "finished")
    return job


class FakeBackend(cluster.Backend):
    """Records what was asked; signal_stop answers as node 0's launcher does (a "requeued" event)."""

    name = "local"

    def __init__(self, checkpoints: bool = True) -> None:
        self.calls: list[tuple[str, int]] = []
        self.checkpoints = checkpoints

    def executor(self, allocation, folder):
        raise AssertionError("not used")

    def _states(self, jobs):
        return {j.id: "RUNNING" for j in jobs}

    def reattach(self, job_ids, folder):
        raise AssertionError("not used")

    def cancel(self, job):
        self.calls.append(("cancel", job.id))

    def signal_stop(self, job):
        self.calls.append(("signal_stop", job.id))
        if self.checkpoints:
            events.record(job.run_dir, "requeued", latest="step-4")


@pytest.fixture
def runs(home: Path) -> Path:
    return home / "runs"


@pytest.fixture
def running(monkeypatch: pytest.MonkeyPatch):
    """Every job reads as RUNNING, and the cluster is a FakeBackend."""
    fake = FakeBackend()
    real_row = monitor.row

    def row(job, state=None, now=None):
        return real_row(job, "RUNNING", now)

    monkeypatch.setattr(ops.monitor, "row", row)
    monkeypatch.setattr(cluster, "backend", lambda name: fake)
    return fake


# --- plot (the README promises it after a plain install) ---


def test_plot_writes_a_png_from_the_typed_rows(runs, tmp_path):
    make_run(runs)
    out = tmp_path / "curves.png"
    assert ops.plot_job(runs, 1, out) == out
    assert out.read_bytes()[:8] == PNG_MAGIC


def test_plot_command_writes_a_png(cli, runs, tmp_path):
    make_run(runs)
    code, stdout, stderr = cli("plot", "1", "-o", str(tmp_path / "x.png"))
    assert code == 0, stderr
    assert (tmp_path / "x.png").read_bytes()[:8] == PNG_MAGIC
    assert str(tmp_path / "x.png") in stdout


def test_plot_without_metrics_is_one_line(runs, tmp_path):
    make_run(runs, steps=0)
    with pytest.raises(Failure, match="no metrics logged yet"):
        ops.plot_job(runs, 1, tmp_path / "x.png")


# --- status ---


def test_status_rows_cache_finished_jobs_and_hide_old_ones(runs):
    make_run(runs, 1)
    rows = ops.status_rows(runs)
    assert [(r.id, r.state, r.step) for r in rows] == [(1, "COMPLETED", 10)]
    assert registry.Registry(runs).finished_rows().keys() == {1}
    week_later = time.time() + 8 * 86400
    assert ops.status_rows(runs, now=week_later) == []
    assert [r.id for r in ops.status_rows(runs, show_all=True, now=week_later)] == [1]


def test_detail_carries_the_losses_and_the_events(runs):
    make_run(runs, 1, steps=5)
    d = ops.detail(runs, 1)
    assert d.losses == pytest.approx([2.9, 2.8, 2.7, 2.6, 2.5])
    assert [e["event"] for e in d.events] == ["started", "finished"]
    assert d.spec is not None and d.spec.max_steps == 5 and d.eval_result is None


@pytest.mark.parametrize("job_id", [0, 10**12, 10**30])
def test_a_job_id_out_of_range_is_bad_input(runs, job_id):
    with pytest.raises(SpecError, match=f"JOB {job_id} is not a job id"):
        ops.find_job(runs, job_id)


def test_an_unknown_job_lists_the_known_ones(runs):
    make_run(runs, 3)
    with pytest.raises(SpecError, match="JOB 4 is not known .*; known: 3"):
        ops.find_job(runs, 4)


def test_a_runs_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    with pytest.raises(SpecError, match="is a file, not a directory"):
        ops.runs_dir(str(tmp_path / "runs" / "deeper"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: no read-only directory to test with")
def test_a_read_only_runs_dir_is_refused_for_submit_but_not_for_status(tmp_path):
    (tmp_path / "runs").mkdir(mode=0o555)
    assert ops.runs_dir(str(tmp_path / "runs")) == tmp_path / "runs"
    with pytest.raises(SpecError, match="is not writable"):
        ops.runs_dir(str(tmp_path / "runs"), writable=True)


# --- cancel, requeue, logs ---


def test_cancel_records_it_and_asks_the_backend(runs, running):
    job = make_run(runs, 1, finished=False)
    ops.cancel(runs, 1)
    assert running.calls == [("cancel", 1)]
    assert any(e["event"] == "cancelled" for e in events.read(job.run_dir))


def test_cancel_of_a_finished_job_fails(runs, monkeypatch):
    job = make_run(runs, 1)
    monkeypatch.setattr(cluster.LocalBackend, "cancel", lambda self, job: pytest.fail("a finished job is not cancelled"))
    with pytest.raises(Failure, match="already ended COMPLETED"):
        ops.cancel(runs, 1)
    assert not any(e["event"] == "cancelled" for e in events.read(job.run_dir))


def test_requeue_waits_for_the_checkpoint(runs, running):
    make_run(runs, 1, finished=False)
    assert ops.requeue(runs, 1, timeout_s=5, poll_s=0.01) == "step-4"
    assert running.calls == [("signal_stop", 1)]


def test_requeue_gives_up_after_its_timeout(runs, running):
    make_run(runs, 1, finished=False)
    running.checkpoints = False
    with pytest.raises(Failure, match="did not checkpoint within 0 s"):
        ops.requeue(runs, 1, timeout_s=0.05, poll_s=0.01)


def test_log_file_by_rank_and_the_launchers(runs):
    job = make_run(runs, 1)
    rank_dir = job.run_dir / "logs" / "attempt-0" / "node-0" / "run" / "attempt_0" / "1"
    rank_dir.mkdir(parents=True)
    (rank_dir / "stdout.log").write_text("rank one\n")
    (job.run_dir / "submitit").mkdir()
    (job.run_dir / "submitit" / "999999999_0_log.out").write_text("launcher\n")
    assert "".join(ops.read_log(ops.log_file(runs, 1, rank=1))) == "rank one\n"
    assert "".join(ops.read_log(ops.log_file(runs, 1))) == "launcher\n"
    with pytest.raises(Failure, match="no log yet for job 1 rank 5"):
        ops.log_file(runs, 1, rank=5)


# --- submit's checks ---


def test_fit_check_names_the_assumed_gpu():
    # (a local run is checked against this host's RAM: test_submit_checks.py)
    on_slurm = spec.JobSpec(size="tiny", cluster="slurm", global_batch=32)
    fit = ops.fit_check(on_slurm, None)
    assert fit.accelerator.name == "a100-80g" and "assumed" in fit.note and fit.warning is None


def test_init_from_a_job_names_its_final_dir(runs, tmp_path):
    job = make_run(runs, 1)
    with pytest.raises(SpecError, match="holds neither a model"):
        ops.resolve_init_from("1", runs)
    (job.run_dir / "final").mkdir()
    (job.run_dir / "final" / "config.json").write_text("{}")
    assert ops.resolve_init_from("1", runs) == str(job.run_dir / "final")
    waited_for = make_run(runs, 2, finished=False)  # --after 2: its final/ need not exist yet
    assert ops.resolve_init_from("2", runs, after=("2",)) == str(waited_for.run_dir / "final")


# --- eval: the scoring is never lost to an unwritable --predictions ---


def test_unwritable_predictions_are_refused_before_scoring(tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: pytest.fail("scored before checking --predictions"))
    options = EvalSpec(model=str(tmp_path), task="medqa", data=str(tmp_path / "q.jsonl"))
    with pytest.raises(SpecError, match="--predictions .*cannot be written"):
        ops.evaluate_here(options, "cpu", tmp_path / "no such dir" / "p.jsonl")
    with pytest.raises(SpecError, match="a directory"):
        ops.evaluate_here(options, "cpu", tmp_path)
    assert not (tmp_path / "no such dir").exists()


# A scored eval as evaluate.evaluate returns it (the predictions beside it).
SCORED = evaluate.EvalResult(task="medqa", data="q.jsonl", model="m", adapter=None, shots=0, mode="loglik-letter", n=2,
                             n_labelled=2, correct=1, accuracy=0.5, choices={"A": 2}, gold={"A": 1, "B": 1}, truncated=0,
                             seconds=1.0, questions_per_s=2.0, notes=())


def test_predictions_that_fail_to_write_keep_the_result(tmp_path, monkeypatch):
    scored = SCORED
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: (scored, [{"gold": "A", "choice": "A"}]))

    def disk_full(path, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(evaluate, "write_predictions", disk_full)
    options = EvalSpec(model=str(tmp_path), task="medqa", data=str(tmp_path / "q.jsonl"))
    done = ops.evaluate_here(options, "cpu", tmp_path / "p.jsonl")
    assert done.result == scored
    assert "No space left on device" in done.predictions_error and "the scores above stand" in done.predictions_error


# --- the CLI boundary: a user's mistake is one line on stderr, never a traceback ---


@pytest.mark.parametrize("args, code, says", [
    (["status", "99999999999999999999999"], 2, "is not in the range"),
    (["cancel", "1000000000000"], 2, "is not in the range"),
    (["status", "--runs-dir", "{file}"], 2, "is a file, not a directory"),
    (["status", "1", "--runs-dir", "{file}/sub"], 2, "is a file, not a directory"),
    (["plot", "1", "-o", "{tmp}/nowhere/x.png"], 1, "cannot be written"),
    (["data", "prepare", "{tmp}/corpus.jsonl", "--tokenizer", "{tmp}", "--out", "{tmp}/s", "--workers", "100000"],
     2, "--workers 100000: must be 1 to"),
    (["data", "prepare", "{tmp}/corpus.jsonl", "--tokenizer", "{tmp}", "--out", "{tmp}", "--force"],
     2, "holds the input"),
    (["estimate", "hours", "2"], 1, "cannot be read"),
])
def test_user_mistakes_are_one_line(cli, runs, tmp_path, args, code, says):
    (tmp_path / "file").write_text("a file")
    (tmp_path / "corpus.jsonl").write_text('{"text": "a document"}\n')
    make_run(runs, 1)
    damaged = make_run(runs, 2)
    (damaged.run_dir / "spec.json").write_bytes(b"\xff\xfe garbage \x00")  # wrong bytes in a run file
    args = [a.format(file=tmp_path / "file", tmp=tmp_path) for a in args]
    got, stdout, stderr = cli(*args)
    assert (got, len(stderr.strip().splitlines())) == (code, 1), stderr
    assert says in stderr and "Traceback" not in stderr


def test_a_damaged_run_shows_its_problem_in_the_table_the_detail_and_json(cli, runs, monkeypatch):
    """monitor names what is wrong with a damaged run dir (Row.problem); every view shows it."""
    make_run(runs, 1)
    real_rows = monitor.rows

    def damaged(jobs, now=None, finished=None):
        return [monitor.Row(**{**r.to_dict(), "state": "COMPLETED", "problem": "spec.json is not JSON"})
                for r in real_rows(jobs, now, {})]

    monkeypatch.setattr(monitor, "rows", damaged)
    code, stdout, _ = cli("status")
    assert code == 0 and "COMPLETED: spec.json is not JSON" in stdout
    code, stdout, _ = cli("status", "--json")
    assert json.loads(stdout)["jobs"][0]["problem"] == "spec.json is not JSON"
    code, stdout, _ = cli("status", "1")
    assert code == 0 and "problem   spec.json is not JSON" in stdout
    assert registry.Registry(runs).finished_rows() == {}, "a damaged row is not cached as the job's last word"


def test_python_dash_m_runs_the_cli():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "llamajobs", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "submit" in result.stdout


def test_eval_prints_its_scores_then_one_line_when_predictions_fail(cli, tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: (SCORED, []))

    def read_only_filesystem(path, rows):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(evaluate, "write_predictions", read_only_filesystem)
    code, stdout, stderr = cli("eval", "--model", str(tmp_path), "--task", "medqa", "--data", str(tmp_path / "q.jsonl"),
                               "--predictions", str(tmp_path / "p.jsonl"), "--json")
    assert code == 1 and json.loads(stdout) == SCORED.to_json()
    assert stderr.count("\n") == 1 and "Read-only file system" in stderr and "Traceback" not in stderr
    code, stdout, stderr = cli("eval", "--model", str(tmp_path), "--task", "medqa", "--data", str(tmp_path / "q.jsonl"),
                               "--predictions", str(tmp_path / "missing" / "p.jsonl"))
    assert (code, stdout) == (2, "") and "cannot be written" in stderr


def test_a_filesystem_refusal_is_one_line_naming_the_path(cli, runs, running, monkeypatch):
    make_run(runs, 1, finished=False)

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(runs / "1-run1" / "events"))

    monkeypatch.setattr(events, "record", refused)
    code, _, stderr = cli("cancel", "1")
    assert code == 1 and stderr == f"Error: {runs / '1-run1' / 'events'}: Permission denied\n"


def test_submit_warns_when_the_partition_preempts_faster_than_the_job_saves(monkeypatch):
    from llamajobs.cluster.slurm import Partition, SlurmBackend

    low = Partition(name="low", max_minutes=0, grace_s=40, preempt_mode="REQUEUE")
    monkeypatch.setattr(SlurmBackend, "partition", lambda self, name: low)
    big = spec.build({"size": "7b", "cluster": "slurm", "partition": "low", "procs_per_node": 8, "global_batch": 128})
    assert "partition low preempts with GraceTime 40 s" in ops.preemption_warning(big)
    assert ops.preemption_warning(spec.build({"size": "tiny", "cluster": "local"})) is None


def test_a_model_without_its_tokenizer_is_refused_before_anything_is_queued(runs, tmp_path):
    from transformers import LlamaConfig

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                   intermediate_size=172, vocab_size=512).to_json_string())
    s = spec.build({"cluster": "local", "model_path": str(model), "mode": "lora"})
    with pytest.raises(SpecError, match="no tokenizer.json or tokenizer.model there"):
        ops.checked_spec(s, runs)
    (model / "tokenizer.json").write_text("{}")
    assert ops.checked_spec(s, runs) == s
