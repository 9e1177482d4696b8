"""Sweeps: expansion, sampling, validation, sweep.json and resubmission without a launch; then one
tiny grid end to end on the local cluster (status, pivot, overlaid plot)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from llamajobs import ops, sweep
from llamajobs.sweep import results
from llamajobs.errors import Failure, SpecError
from llamajobs.registry import Job
from tests.conftest import run_cli

LOCAL = ["--cluster", "local", "--size", "tiny", "--procs-per-node", "1", "--seq-len", "32", "--global-batch", "4",
         "--micro-batch", "2"]


def define(*axes: str, samples: int | None = None, seed: int | None = None, file: str | None = None,
           **flags) -> sweep.Definition:
    return sweep.definition(file, {"cluster": "local", **flags}, axes, samples, seed, None)


# --- expansion and sampling ---


def test_grid_is_the_cartesian_product_in_axis_order_with_flag_and_yaml_keys_alike():
    found = define("lr=1e-4,3e-4", "lora_r=8,16,32", mode="lora")
    assert [t for t in found.trial_values()] == [
        {"lr": lr, "lora_r": r} for lr in (1e-4, 3e-4) for r in (8, 16, 32)]
    assert define("lora-r=8,16", mode="lora").axes == define("lora_r=8,16", mode="lora").axes == {"lora_r": (8, 16)}


def test_samples_are_seeded_reproducible_and_inside_their_ranges():
    draws = define("lr=log:1e-5..1e-3", "lora-r=8,16", "warmup-ratio=0.0..0.1", samples=20, seed=7,
                   mode="lora").trial_values()
    assert draws == define("lr=log:1e-5..1e-3", "lora-r=8,16", "warmup-ratio=0.0..0.1", samples=20, seed=7,
                           mode="lora").trial_values()
    assert draws != define("lr=log:1e-5..1e-3", "lora-r=8,16", "warmup-ratio=0.0..0.1", samples=20, seed=8,
                           mode="lora").trial_values()
    assert all(1e-5 <= d["lr"] <= 1e-3 and d["lora_r"] in (8, 16) and 0 <= d["warmup_ratio"] <= 0.1 for d in draws)
    # log-uniform: about half the draws below the geometric middle (1e-4), not ~9% as uniform would give
    assert 5 <= sum(d["lr"] < 1e-4 for d in draws) <= 15
    integer = define("lora-r=4..64", samples=5, mode="lora").trial_values()
    assert all(isinstance(d["lora_r"], int) for d in integer)


def test_sweep_file_base_and_axes_with_the_command_line_over_them(tmp_path):
    path = tmp_path / "pmc.yaml"
    path.write_text("name: pmc\nbase: {size: tiny, mode: lora, max-steps: 10}\n"
                    "axes:\n  lr: {low: 1.0e-5, high: 1.0e-3, log: true}\n  lora_targets: [[q_proj, v_proj], [q_proj]]\n"
                    "samples: 3\nseed: 1\n")
    found = define(file=str(path), max_steps=20)
    assert found.name == "pmc" and found.base["max_steps"] == 20 and found.base["mode"] == "lora"
    assert found.axes["lora_targets"] == (("q_proj", "v_proj"), ("q_proj",))
    assert len(found.trial_values()) == 3 and found.file == str(path.absolute()) and "pmc" in found.file_text
    # a file of ranges only, sampled from the command line; its name taken from --name over the file's
    ranges = tmp_path / "ranges.yaml"
    ranges.write_text("base: {mode: lora}\naxes: {lr: {low: 1.0e-5, high: 1.0e-3, log: true}}\n")
    sampled = define(samples=4, seed=2, file=str(ranges), name="lr-search")
    assert sampled.name == "lr-search" and len(sampled.trial_values()) == 4
    assert define(file=str(ranges), samples=1).name == "ranges"  # the file's stem


# --- refused before anything is queued ---


@pytest.mark.parametrize("args, message", [
    (["--axis", "lorar=1,2"], "--axis lorar=1,2: unknown key 'lorar'"),
    (["--axis", "lr=fast,1e-4"], "axis lr: --lr 'fast' is not a valid float"),
    (["--axis", "lora-r=4,8"], "trial 0 (lora-r=4): --lora-r needs --mode lora"),
    (["--axis", "global-batch=4,7"], "trial 1 (global-batch=7): --global-batch 7 is not divisible"),
    (["--axis", "lr=1e-4,1e-4"], "axis lr: '1e-4' is listed twice"),
    (["--axis", "lr=1e-5..1e-3"], "axis lr: a range (1e-05..0.001) needs --samples N"),
    (["--axis", "name=a,b"], "axis name: not an axis"),
    (["--axis", "lr=1e-4,2e-4", "--axis", "seed=1,2,3", "--max-trials", "5"],
     "the sweep has 6 trials, above --max-trials 5"),
    (["--axis", "lr=1e-4", "--seed", "3"], "--seed 3 seeds the draws of --samples N"),
])
def test_bad_axes_are_refused_in_one_line_and_nothing_is_queued(cli, home, args, message):
    code, stdout, stderr = cli("sweep", "submit", *LOCAL, *args)
    assert code == 2 and message in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_a_trial_that_does_not_fit_is_named_before_anything_is_queued(cli, home):
    slurm = ["--cluster", "slurm", "--strategy", "fsdp", "--max-steps", "1000", "--time", "10:00:00",
             "--axis", "size=7b,65b"]
    code, _, stderr = cli("sweep", "submit", *slurm)
    assert code == 2 and stderr.startswith("Error: trial 1 (size=65b): --strategy fsdp: 65b full needs"), stderr
    assert "--force submits anyway" in stderr and not (home / "runs").exists()
    # --dry-run: every trial estimated, the one that does not fit warned about, nothing queued
    code, stdout, stderr = cli("sweep", "submit", *slurm, "--max-parallel", "1", "--dry-run", "--json")
    assert code == 0 and "warning: trial 1 (size=65b)" in stderr
    found = json.loads(stdout)
    assert found["sweep"] is None and [t["size"] for t in found["trials"]] == ["7b", "65b"]
    est = found["estimate"]
    assert [t["verdict"] for t in est["trials"]] == ["fits", "does not fit"] and est["gpu"] == "a100-80g"
    hours = [t["hours"] for t in est["trials"]]
    assert est["gpu_hours"] == pytest.approx(8 * sum(hours)) and est["wall_hours"] == pytest.approx(sum(hours))
    assert not (home / "runs").exists()
    code, stdout, _ = cli("sweep", "submit", *slurm, "--max-parallel", "2", "--dry-run")
    assert code == 0 and "GPU-hours in all" in stdout and "at 2 in parallel" in stdout


def test_wall_clock_fills_k_slots_in_trial_order():
    trials = tuple(sweep.TrialEstimate(trial=i, label="", hours_per_epoch=None, hours=h, gpus=8, gpu_hours=8 * h,
                                       gpu_mem_gib=1.0, verdict="fits") for i, h in enumerate([3.0, 1.0, 1.0, 2.0]))
    assert sweep.Estimate(trials=trials, max_parallel=2, gpu="h100").wall_hours == 4.0  # 3 | 1+1+2
    assert sweep.Estimate(trials=trials, max_parallel=4, gpu="h100").wall_hours == 3.0
    assert sweep.Estimate(trials=trials, max_parallel=2, gpu="h100").gpu_hours == 56.0


# --- sweep.json and submitting again ---


def test_sweep_json_records_the_trials_and_a_second_submit_queues_only_those_without_a_job(home, monkeypatch):
    runs = home / "runs"
    calls: list[tuple[int, tuple[int, ...]]] = []
    fail_at = {2}

    def fake_submit(spec, profile, runs_dir, fit=None, after_any=()):
        if len(calls) in fail_at:
            fail_at.clear()
            raise Failure("the cluster refused")
        job = Job(id=100 + len(calls), name=spec.run_name, run_dir=runs_dir / f"{100 + len(calls)}-x", cluster="local",
                  cluster_job_id="1", submitted_at=0.0)
        calls.append((job.id, tuple(j.id for j in after_any)))
        return ops.Submitted(job)

    monkeypatch.setattr(ops, "submit_job", fake_submit)
    found = define("lr=1e-4,2e-4", "seed=1,2", size="tiny", max_steps=5)
    checked = sweep.plan(found, runs, max_parallel=1)
    with pytest.raises(Failure):
        sweep.submit(checked, runs, max_parallel=1)
    # the first two trials kept their jobs; trial 1 waited for trial 0 (one slot)
    assert calls == [(100, ()), (101, (100,))]
    recorded = sweep.find(runs, "sweep")
    assert [t.job for t in recorded.trials] == [100, 101, None, None]
    assert [dict(t.values) for t in recorded.trials] == found.trial_values()
    assert json.loads((recorded.dir / "sweep.json").read_text())["base"]["max_steps"] == 5
    assert [p.name for p in recorded.dir.iterdir()] == ["sweep.json"]  # no temporary file left
    again = sweep.submit(sweep.plan(found, runs, max_parallel=1), runs, max_parallel=1)
    assert again.submitted == (2, 3) and again.sweep.id == recorded.id
    assert [t.job for t in sweep.find(runs, str(recorded.id)).trials] == [100, 101, 102, 103]
    # nothing left to submit; another definition is another sweep
    assert sweep.submit(sweep.plan(found, runs), runs).submitted == ()
    other = sweep.submit(sweep.plan(define("lr=1e-4", size="tiny", max_steps=5), runs), runs)
    assert other.sweep.id == recorded.id + 1 and other.submitted == (0,)


def test_sweep_cancel_cancels_the_live_trials_last_first_and_nothing_else(cli, home, monkeypatch):
    from types import SimpleNamespace

    runs = home / "runs"
    found = define("lr=1e-4,2e-4,3e-4,4e-4", size="tiny")
    made = sweep.create(runs, found, found.trial_values(), 1)
    for trial, job in ((0, 10), (1, 11), (2, 12)):  # trial 3 was never submitted
        made = made.with_job(trial, job)
    sweep.save(made)
    states = {10: "COMPLETED", 11: "RUNNING", 12: "PENDING"}
    asked = []
    monkeypatch.setattr(ops, "job_rows", lambda runs, ids: asked.extend(ids) or {
        i: SimpleNamespace(state=states[i]) for i in ids})
    cancelled = []
    monkeypatch.setattr(ops, "cancel", lambda runs, job_id: cancelled.append(job_id))
    code, stdout, _ = cli("sweep", "cancel", "sweep")
    assert code == 0 and asked == [10, 11, 12] and cancelled == [12, 11]  # the waiting one first
    assert "trial 1 (job 11), trial 2 (job 12) cancelled" in stdout


def test_pivot_sort_and_best_from_trial_rows(tmp_path):
    found = define("lr=1e-4,2e-4", "seed=1,2")
    made = sweep.Sweep(id=3, dir=tmp_path, definition=found, trials=tuple(
        sweep.Trial(trial=i, values=v, job=10 + i) for i, v in enumerate(found.trial_values())))
    losses = [(2.0, None), (1.5, 1.9), (1.2, 1.7), (1.0, None)]
    status = results.Status(sweep=made, rows=tuple(results.TrialRow(trial=t, state="COMPLETED", loss=loss, val_loss=val)
                                                 for t, (loss, val) in zip(made.trials, losses)))
    assert status.best == 2  # the lowest validation loss wins over a lower training loss without one
    assert status.to_json()["trials"][2] == {"trial": 2, "job": 12, "lr": 2e-4, "seed": 1, "state": "COMPLETED",
                                             "step": None, "total_steps": None, "loss": 1.2, "val_loss": 1.7,
                                             "accuracy": None, "tokens_per_s": None, "gpu_hours": None, "error": None}
    table = results.pivot(status, "lr,seed", "loss")
    assert (table.rows, table.columns, table.cells) == ((1e-4, 2e-4), (1, 2), ((2.0, 1.5), (1.2, 1.0)))
    with pytest.raises(SpecError, match="'lora-r' is not an axis"):
        results.pivot(status, "lr,lora_r", "loss")
    with pytest.raises(SpecError, match="--metric 'state' is not a numeric column"):
        results.pivot(status, "lr,seed", "state")


def test_a_damaged_sweep_json_is_one_line_naming_it(cli, home):
    folder = home / "runs" / "sweeps" / "1-grid"
    folder.mkdir(parents=True)
    (folder / "sweep.json").write_text('{"id": 1, "trials": [')
    code, _, stderr = cli("sweep", "status", "grid")
    assert code == 1 and stderr.startswith(f"Error: {folder / 'sweep.json'}: damaged") and len(stderr.splitlines()) == 1
    code, _, stderr = cli("sweep", "status", "other")
    assert code == 2 and "sweep 'other' is not known" in stderr and "known: 1-grid" in stderr


# --- --max-parallel's wait, per backend ---


def test_a_local_job_waits_pending_until_the_one_before_it_ended(tmp_path):
    import threading

    from llamajobs import cluster, events
    from llamajobs.cluster import local
    from tests.test_cluster import spawn

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    before = spawn("submitit.local._local", "a")
    waiting = spawn("submitit.local._local", "b")
    try:
        first = Job(id=1, name="a", run_dir=tmp_path / "a", cluster="local", cluster_job_id=str(before.pid),
                    submitted_at=0.0)
        second = Job(id=2, name="b", run_dir=tmp_path / "b", cluster="local", cluster_job_id=str(waiting.pid),
                     submitted_at=0.0)
        assert cluster.backend("local").waits_for([first]) == (first,)
        assert local.state(second) == "RUNNING"
        local.hold(second.run_dir, [first])  # what submit does before it submits a job that waits
        assert local.state(second) == "PENDING"
        waiter = threading.Thread(target=local.wait_ended, args=(second.run_dir, [first], 0.05))
        waiter.start()
        deadline = time.time() + 10
        while local.state(second) != "PENDING":
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(0.3)
        assert waiter.is_alive() and local.state(first) == "RUNNING"
        before.kill()
        before.wait(timeout=10)
        waiter.join(timeout=10)
        assert not waiter.is_alive() and local.state(second) == "RUNNING"  # released: its launcher goes on
        assert [e["event"] for e in events.read(second.run_dir)] == ["waiting", "released"]
    finally:
        before.kill()
        waiting.kill()


def test_on_slurm_the_wait_is_an_afterany_dependency_and_the_launcher_does_not_wait():
    from llamajobs import cluster

    jobs = [Job(id=i, name="t", run_dir=Path("/x"), cluster="slurm", cluster_job_id=str(700 + i), submitted_at=0.0)
            for i in (1, 2)]
    backend = cluster.backend("slurm")
    assert backend.after_any_dependency(jobs) == "afterany:701:702" and backend.waits_for(jobs) == ()
    assert backend.after_any_dependency([]) is None


# --- end to end on the local cluster ---

GRID = [*LOCAL, "--mode", "lora", "--max-steps", "8", "--name", "grid", "--axis", "lr=1e-3,3e-3",
        "--axis", "lora-r=8", "--max-parallel", "1"]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("sweep")
    return {"LLAMAJOBS_HOME": str(root / "home"), "XDG_CACHE_HOME": str(root / "cache")}


@pytest.fixture(scope="module")
def finished(env) -> dict:
    """A 2x1 grid of tiny LoRA runs, one at a time, polled until both ended; shared by the checks below."""
    submitted = json.loads(run_cli("sweep", "submit", *GRID, "--json", env=env, check=True).stdout)
    deadline = time.time() + 400
    seen = set()
    runs = Path(env["LLAMAJOBS_HOME"]) / "runs"
    with pytest.MonkeyPatch.context() as patch:  # polled in this process: a CLI start a second would slow the runs
        for name, value in env.items():
            patch.setenv(name, value)
        while (states := tuple(r.state for r in results.status(runs, str(submitted["sweep"])).rows)) != (
                "COMPLETED", "COMPLETED"):
            seen.add(states)
            assert time.time() < deadline and not {"FAILED", "CANCELLED", "UNKNOWN"} & set(states), states
            time.sleep(1.0)
    found = json.loads(run_cli("sweep", "status", str(submitted["sweep"]), "--json", env=env, check=True).stdout)
    return {"submitted": submitted, "status": found, "seen": seen}


@pytest.mark.slow
def test_a_local_grid_runs_one_trial_at_a_time_and_completes(env, finished):
    submitted, found = finished["submitted"], finished["status"]
    assert [(t["trial"], t["lr"], t["lora_r"]) for t in submitted["trials"]] == [(0, 1e-3, 8), (1, 3e-3, 8)]
    assert [t["state"] for t in found["trials"]] == ["COMPLETED", "COMPLETED"]
    assert ("RUNNING", "RUNNING") not in finished["seen"] and ("RUNNING", "PENDING") in finished["seen"]
    runs = Path(env["LLAMAJOBS_HOME"]) / "runs"
    first, second = (sorted(runs.glob(f"{t['job']}-grid-*"))[0] for t in submitted["trials"])
    from llamajobs import events

    ended = next(e["time"] for e in events.read(first) if e["event"] == "finished")
    started = next(e["time"] for e in events.read(second) if e["event"] == "started")
    assert started > ended  # --max-parallel 1: the second trial waited for the first
    # each trial is an ordinary job: `status JOB` knows it
    row = json.loads(run_cli("status", str(submitted["trials"][1]["job"]), "--json", env=env, check=True).stdout)
    assert row["state"] == "COMPLETED" and row["name"] == "grid-1"
    # submitting the same sweep again queues nothing
    again = json.loads(run_cli("sweep", "submit", *GRID, "--json", env=env, check=True).stdout)
    assert again["sweep"] == submitted["sweep"] and again["submitted"] == []


@pytest.mark.slow
def test_sweep_status_json_table_and_pivot(env, finished):
    found = finished["status"]
    assert set(found) == {"sweep", "name", "axes", "trials", "best"} and found["axes"] == ["lr", "lora_r"]
    for t in found["trials"]:
        assert {"trial", "job", "lr", "lora_r", "state", "step", "loss", "val_loss", "accuracy", "tokens_per_s",
                "gpu_hours"} <= set(t)
        assert t["step"] == 8 and t["loss"] > 0 and t["tokens_per_s"] > 0 and t["gpu_hours"] is None  # CPU
    assert found["best"] == min(found["trials"], key=lambda t: t["loss"])["trial"]
    table = run_cli("sweep", "status", "grid", env=env, check=True).stdout
    assert f"* best trial: {found['best']}" in table and "COMPLETED" in table
    pivot = json.loads(run_cli("sweep", "status", "grid", "--pivot", "lr,lora-r", "--metric", "loss", "--json",
                               env=env, check=True).stdout)["pivot"]
    assert pivot["rows"] == [1e-3, 3e-3] and pivot["columns"] == [8]
    assert [c[0] for c in pivot["cells"]] == [t["loss"] for t in found["trials"]]
    shown = run_cli("sweep", "status", "grid", "--pivot", "lr,lora-r", "--metric", "loss", env=env, check=True).stdout
    assert "lr \\ lora-r" in shown and f"{found['trials'][1]['loss']:.4f}" in shown
    ordered = json.loads(run_cli("sweep", "status", "grid", "--sort", "loss", "--json", env=env, check=True).stdout)
    assert [t["loss"] for t in ordered["trials"]] == sorted(t["loss"] for t in found["trials"])


@pytest.mark.slow
def test_plot_overlays_the_sweep_and_several_jobs(env, finished, tmp_path):
    png = tmp_path / "curves.png"
    run_cli("plot", "--sweep", "grid", "-o", str(png), "--x", "tokens", env=env, check=True)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    jobs = [str(t["job"]) for t in finished["submitted"]["trials"]]
    run_cli("plot", *jobs, "-o", str(tmp_path / "jobs.png"), env=env, check=True)
    assert (tmp_path / "jobs.png").stat().st_size > 0
    refused = run_cli("plot", "-o", str(png), env=env)
    assert refused.returncode == 2 and "give JOB ids or --sweep S" in refused.stderr


def test_overlay_has_one_legend_entry_per_run(tmp_path, monkeypatch):
    from llamajobs import plot
    from llamajobs.metrics import MetricsRow

    def rows(scale: float, val: bool) -> list[MetricsRow]:
        return [MetricsRow(step=s, total_steps=4, epoch=s / 4, loss=scale / s, lr=1e-3, grad_norm=1.0, tokens=64 * s,
                           tokens_per_s=10.0, tokens_per_s_per_gpu=10.0, mfu=None, peak="cpu-nominal", peak_flops=None,
                           step_time_s=1.0, elapsed_s=s, time=s, mem_gib=1.0, val_loss=scale / s if val else None)
                for s in range(1, 5)]

    drawn = {}
    monkeypatch.setattr(plot, "_save", lambda fig, out: drawn.setdefault("fig", fig) and out)
    plot.overlay([("trial 0: lr=0.001", rows(2.0, True)), ("trial 1: lr=0.003", rows(3.0, False))], "sweep 1",
                 tmp_path / "x.png", "tokens")
    ax = drawn["fig"].axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["trial 0: lr=0.001", "trial 1: lr=0.003"]
    assert ax.get_xlabel() == "tokens trained on" and list(ax.lines[0].get_xdata()) == [64, 128, 192, 256]


def test_a_sweep_takes_a_preset_as_its_base(tmp_path) -> None:
    found = sweep.definition(None, {}, ["lr=1e-5,2e-5"], None, None, "7b-lora-fsdp")
    assert found.config == "7b-lora-fsdp"
    checked = sweep.plan(found, tmp_path, dry_run=True, cluster_default="slurm", gpu="a100-80g")
    assert [(p.spec.size, p.spec.mode, p.spec.lr) for p in checked.trials] == [("7b", "lora", 1e-5), ("7b", "lora", 2e-5)]
