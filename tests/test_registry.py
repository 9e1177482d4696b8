import multiprocessing
import time

from llamajobs import registry
from llamajobs.registry import Job, Registry


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
