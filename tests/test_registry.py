import multiprocessing
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from llamajobs import registry, spec, submit
from llamajobs.cluster import SubmitError
from llamajobs.cluster.local import LocalBackend
from llamajobs.errors import SpecError
from llamajobs.registry import Job, Registry
from llamajobs.site import Site
from tests.other_user import as_other_user, open_tmp


def _claim(runs_dir, queue):
    queue.put([registry.claim_id(runs_dir) for _ in range(10)])


def test_concurrent_submits_never_share_an_id(tmp_path):
    queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_claim, args=(tmp_path, queue)) for _ in range(4)]
    for w in workers:
        w.start()
    ids = [i for _ in workers for i in queue.get(timeout=30)]
    for w in workers:
        w.join()
    assert sorted(ids) == list(range(1, 41))


def _make_run(runs_dir, job_id, name="tiny"):
    run_dir = runs_dir / f"{job_id}-{name}"
    run_dir.mkdir(parents=True)
    job = Job(id=job_id, name=name, run_dir=run_dir, cluster="local", cluster_job_id=str(1000 + job_id),
              submitted_at=time.time())
    registry.write_job_file(job)
    return job


def test_registry_is_rebuilt_from_the_run_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    for i in (1, 2):
        _make_run(runs, i)
    (runs / "3-half-written").mkdir()  # no job.json: never registered
    reg = Registry(runs)
    assert [j.id for j in reg.jobs()] == [1, 2]
    reg.close()
    registry.database_path(runs).unlink()  # lost cache: rebuilt on the next open
    assert [j.id for j in Registry(runs).jobs()] == [1, 2]


def test_a_run_dir_added_by_another_login_node_is_seen(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    _make_run(runs, 1)
    assert [j.id for j in Registry(runs).jobs()] == [1]
    time.sleep(0.01)
    _make_run(runs, 2)  # written to the shared runs dir without touching our index
    assert [j.id for j in Registry(runs).jobs()] == [1, 2]
    assert Registry(runs).get(2).cluster_job_id == "1002"


def test_a_job_file_written_after_a_scan_is_still_indexed(tmp_path, monkeypatch):
    """A scan that sees a run dir before its job.json (a submit in flight) looks at it again later,
    although writing job.json does not change the runs directory's listing."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    (runs / "1-inflight").mkdir(parents=True)
    assert Registry(runs).jobs() == []
    job = Job(id=1, name="inflight", run_dir=runs / "1-inflight", cluster="slurm", cluster_job_id="77",
              submitted_at=time.time())
    registry.write_job_file(job)
    assert [j.cluster_job_id for j in Registry(runs).jobs()] == ["77"]


# --- ids that cannot collide or destroy ---


def _claim_one(runs_dir, queue):
    queue.put(registry.claim_id(runs_dir))


def test_ten_concurrent_claims_give_ten_ids_above_every_run_dir(tmp_path):
    (tmp_path / "7-copied-in").mkdir()  # a run dir without a claim (copied from elsewhere) still holds its id
    queue = multiprocessing.Queue()
    workers = [multiprocessing.Process(target=_claim_one, args=(tmp_path, queue)) for _ in range(10)]
    for w in workers:
        w.start()
    ids = [queue.get(timeout=30) for _ in workers]
    for w in workers:
        w.join()
    assert sorted(ids) == list(range(8, 18))


def _finished_job(runs: Path, job_id: int, name: str) -> Path:
    job = _make_run(runs, job_id, name)
    (job.run_dir / "final").mkdir()
    (job.run_dir / "final" / "model.safetensors").write_bytes(b"weights")
    return job.run_dir


class _Refusing:
    """An executor whose cluster refuses the job (as sbatch does with a bad partition)."""

    def submit(self, fn):
        raise RuntimeError("sbatch: error: invalid partition specified: nope")


class _Accepting:
    def submit(self, fn):
        return type("ClusterJob", (), {"job_id": "4242"})()


def test_runs_copied_without_their_claims_keep_their_files_and_ids(tmp_path, monkeypatch):
    """`cp -r runs/* elsewhere/` leaves runs/.ids behind: a failed submit there must not delete a
    copied job's run dir (final/ included), with its name or another, and a new job gets a new id."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    original = tmp_path / "runs"
    _finished_job(original, 1, "tiny-full-fsdp")
    _finished_job(original, 2, "other")
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    subprocess.run(f"cp -r {original}/* {copy}/", shell=True, check=True)
    assert not (copy / registry.CLAIMS).exists()
    before = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()}

    monkeypatch.setattr(LocalBackend, "executor", lambda self, allocation, folder: _Refusing())
    s = spec.build({"size": "tiny", "cluster": "local"})
    for name in (None, "other"):  # the default name is the copied job 1's; "other" is job 2's
        with pytest.raises(SubmitError, match="invalid partition specified"):
            submit.submit(s if name is None else spec.build({"size": "tiny", "cluster": "local", "name": name}),
                          Site(), copy)
    assert {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in copy.iterdir()) == [registry.CLAIMS, "1-tiny-full-fsdp", "2-other"]

    monkeypatch.setattr(LocalBackend, "executor", lambda self, allocation, folder: _Accepting())
    done = submit.submit(s, Site(), copy)
    assert done.job.id == 3 and done.job.run_dir == copy / "3-tiny-full-fsdp"
    assert [j.id for j in Registry(copy).jobs()] == [1, 2, 3]
    old_jobs = {p.relative_to(copy): p.read_bytes() for p in copy.rglob("*")
                if p.is_file() and p.relative_to(copy).parts[0] != "3-tiny-full-fsdp"}
    assert old_jobs == before


def test_submit_removes_only_what_it_created(tmp_path, monkeypatch):
    """A run dir that appears under the claimed id meanwhile (another tool, a copy) is not touched."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    runs.mkdir()
    real_claim = registry.claim_id

    def claim_then_copy_in(runs_dir):
        job_id = real_claim(runs_dir)
        _finished_job(runs_dir, job_id, "tiny-full-fsdp")  # the same name a default submit renders
        return job_id

    monkeypatch.setattr(registry, "claim_id", claim_then_copy_in)
    monkeypatch.setattr(LocalBackend, "executor", lambda self, allocation, folder: _Accepting())
    with pytest.raises(SubmitError, match="exists already; nothing was submitted"):
        submit.submit(spec.build({"size": "tiny", "cluster": "local"}), Site(), runs)
    assert (runs / "1-tiny-full-fsdp" / "final" / "model.safetensors").read_bytes() == b"weights"
    assert not list(runs.glob(".staging-*"))


# --- a damaged index, damaged run dirs, a runs directory that cannot serve ---


def test_a_garbage_index_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    _make_run(runs, 1)
    Registry(runs).close()
    registry.database_path(runs).write_bytes(b"this is not a database" * 100)
    assert [j.id for j in Registry(runs).jobs()] == [1]


def test_an_index_of_an_older_schema_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    _make_run(runs, 1)
    path = registry.database_path(runs)
    path.parent.mkdir(parents=True)
    old = sqlite3.connect(path)
    old.executescript("CREATE TABLE jobs (id INTEGER PRIMARY KEY, name TEXT NOT NULL, run_dir TEXT NOT NULL UNIQUE, "
                      "cluster TEXT NOT NULL, cluster_job_id TEXT NOT NULL, submitted_at REAL NOT NULL);")
    old.close()
    assert [j.id for j in Registry(runs).jobs()] == [1]


def test_a_huge_id_is_no_job(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    reg = Registry(tmp_path / "runs")
    assert reg.get(2**70) is None and reg.get(-1) is None and reg.get(2**63) is None


@pytest.mark.parametrize("text, says", [
    ("{not json", "job.json: not JSON"),
    ("[1, 2]", "job.json: not an object"),
    ('{"id": "1", "name": "x", "cluster": "local", "cluster_job_id": "5", "submitted_at": 1.0}', "job.json: id '1'"),
    ('{"id": 1, "name": "x", "cluster": "local", "cluster_job_id": "5", "submitted_at": "soon"}', "submitted_at"),
    ('{"id": 2, "name": "x", "cluster": "local", "cluster_job_id": "5", "submitted_at": 1.0}', "do not fit"),
    ('{"id": 1, "name": "x", "cluster": "local", "cluster_job_id": null, "submitted_at": 1.0}', "cluster_job_id"),
])
def test_a_damaged_job_file_is_a_job_with_a_problem(tmp_path, monkeypatch, text, says):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    _make_run(runs, 2, "fine")
    (runs / "1-damaged").mkdir()
    (runs / "1-damaged" / registry.JOB_FILE).write_text(text)
    jobs = Registry(runs).jobs()
    assert [(j.id, j.name) for j in jobs] == [(1, "damaged"), (2, "fine")]
    assert says in jobs[0].problem and jobs[0].cluster_job_id == "" and jobs[1].problem is None


def test_a_job_file_damaged_later_keeps_the_cluster_job(tmp_path, monkeypatch):
    """Once indexed, a job whose job.json turns to garbage keeps its cluster id (its state is still
    known) and says what is wrong; repaired, the problem goes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    job = _make_run(runs, 1)
    Registry(runs).close()
    good = (job.run_dir / registry.JOB_FILE).read_text()
    (job.run_dir / registry.JOB_FILE).write_text("garbage")
    Registry(runs).rebuild()
    (damaged,) = Registry(runs).jobs()
    assert damaged.cluster_job_id == "1001" and "not JSON" in damaged.problem
    (job.run_dir / registry.JOB_FILE).write_text(good)
    (repaired,) = Registry(runs).jobs()  # damaged rows are looked at again on every open
    assert repaired == job


def test_a_submit_that_died_is_shown_once_it_is_not_in_flight(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    (runs / "1-inflight").mkdir(parents=True)
    assert Registry(runs).jobs() == []
    old = time.time() - registry.SUBMIT_GRACE_S - 1
    os.utime(runs / "1-inflight", (old, old))
    (job,) = Registry(runs).jobs()
    assert job.id == 1 and "submission did not finish" in job.problem
    (runs / "notes-2024").mkdir()  # not a run dir: no id
    os.utime(runs / "notes-2024", (old, old))
    assert [j.id for j in Registry(runs).jobs()] == [1]


def test_damaged_rows_are_not_remembered_as_finished(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    _make_run(runs, 1)
    _make_run(runs, 2)
    reg = Registry(runs)
    reg.set_finished([{"id": 1, "state": "COMPLETED", "problem": None},
                      {"id": 2, "state": "COMPLETED", "problem": "metrics.jsonl: 1 damaged line"}])
    assert list(reg.finished_rows()) == [1]
    reg.db.execute("INSERT OR REPLACE INTO finished VALUES (2, 'garbage')")
    assert list(reg.finished_rows()) == [1]


def test_a_runs_directory_that_is_a_file_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    runs.write_text("oops")
    with pytest.raises(SpecError, match=f"runs directory {runs} is a file, not a directory; .*--runs-dir"):
        Registry(runs)
    with pytest.raises(SpecError, match="is a file"):
        registry.claim_id(runs)
    with pytest.raises(SpecError, match="is a file"):
        submit.submit(spec.build({"size": "tiny", "cluster": "local"}), Site(), runs)


def test_a_runs_directory_not_writable_is_one_clear_error():
    with open_tmp() as tmp:
        runs = tmp / "runs"
        _make_run(runs, 1)
        runs.chmod(0o555)
        error = as_other_user(registry.claim_id, runs)
    assert isinstance(error, SpecError) and f"runs directory {runs} is not writable" in str(error)
    assert not (runs / registry.CLAIMS).exists()


def test_a_cache_folder_that_cannot_be_written_is_one_clear_error():
    with open_tmp() as tmp:
        runs, cache = tmp / "runs", tmp / "cache"
        _make_run(runs, 1)
        cache.mkdir(mode=0o555)
        cache.chmod(0o555)

        def open_registry():
            old = os.environ.get("XDG_CACHE_HOME")
            os.environ["XDG_CACHE_HOME"] = str(cache)
            try:
                return Registry(runs).jobs()
            finally:  # as_other_user runs this in our own process when we are not root
                os.environ.pop("XDG_CACHE_HOME") if old is None else os.environ.update(XDG_CACHE_HOME=old)

        error = as_other_user(open_registry)
    assert isinstance(error, SpecError) and "XDG_CACHE_HOME" in str(error), error
