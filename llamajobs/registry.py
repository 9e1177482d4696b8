"""The SQLite index of one runs directory, on local disk; the run directories stay the truth.

SQLite's locking does not work on NFS/Lustre, so the database lives under $XDG_CACHE_HOME and is
rebuilt from the run dirs whenever it is missing or older than the runs directory's listing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    run_dir TEXT NOT NULL UNIQUE,
    cluster TEXT NOT NULL,
    cluster_job_id TEXT NOT NULL,
    submitted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- The status row of a job that ended, so `status` reads no files and asks no cluster for it again.
CREATE TABLE IF NOT EXISTS finished (id INTEGER PRIMARY KEY, row TEXT NOT NULL);
"""

JOB_FILE = "job.json"


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    name: str
    run_dir: Path
    cluster: str
    cluster_job_id: str
    submitted_at: float


def database_path(runs_dir: Path) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamajobs"
    key = hashlib.sha1(str(runs_dir.absolute()).encode()).hexdigest()[:16]
    return cache / f"registry-{key}.sqlite"


def job_from_dir(run_dir: Path) -> Job | None:
    """The job a run dir records in job.json, written once the cluster accepted it."""
    try:
        data = json.loads((run_dir / JOB_FILE).read_text())
        return Job(id=int(data["id"]), name=data["name"], run_dir=run_dir, cluster=data["cluster"],
                   cluster_job_id=str(data["cluster_job_id"]), submitted_at=float(data["submitted_at"]))
    except (OSError, ValueError, KeyError):
        return None


def write_job_file(job: Job) -> None:
    data = {"id": job.id, "name": job.name, "cluster": job.cluster,
            "cluster_job_id": job.cluster_job_id, "submitted_at": job.submitted_at}
    tmp = job.run_dir / (JOB_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, job.run_dir / JOB_FILE)


class Registry:
    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = runs_dir
        path = database_path(runs_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(SCHEMA)
        self._sync_if_stale()

    def _listing_stamp(self) -> str:
        return str(self.runs_dir.stat().st_mtime_ns) if self.runs_dir.is_dir() else "absent"

    def _sync_if_stale(self) -> None:
        """Rescan when the runs directory's listing changed; otherwise only look again at the run
        dirs that had no job.json yet (a submit on this or another login node was in flight):
        writing job.json inside a run dir does not change the listing."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'listing'").fetchone()
        stamp = self._listing_stamp()
        if row is None or row[0] != stamp:
            self.rebuild(stamp)
            return
        pending = [Path(r[0]) for r in self.db.execute("SELECT value FROM meta WHERE key LIKE 'pending:%'")]
        for run_dir in pending:
            if (job := job_from_dir(run_dir)) or not run_dir.exists():
                with self.db:
                    if job:
                        self.db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?)", _row(job))
                    self.db.execute("DELETE FROM meta WHERE key = ?", (f"pending:{run_dir}",))

    def rebuild(self, stamp: str | None = None) -> None:
        """Index every run dir that records a job, remember those that do not yet, and forget rows
        whose run dir is gone. Rows are replaced, never cleared first, so a concurrent add() survives."""
        stamp = stamp or self._listing_stamp()
        dirs = [d for d in sorted(self.runs_dir.glob("*-*")) if d.is_dir() and not d.name.startswith(".")]
        found = {d: job_from_dir(d) for d in dirs}
        gone = [r[0] for r in self.db.execute("SELECT run_dir FROM jobs") if not Path(r[0]).exists()]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?)",
                                [_row(j) for j in found.values() if j])
            self.db.executemany("DELETE FROM jobs WHERE run_dir = ?", [(g,) for g in gone])
            self.db.execute("DELETE FROM finished WHERE id NOT IN (SELECT id FROM jobs)")
            self.db.execute("DELETE FROM meta WHERE key LIKE 'pending:%'")
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [(f"pending:{d}", str(d)) for d, j in found.items() if j is None])
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('listing', ?)", (stamp,))

    def add(self, job: Job) -> None:
        """Index a job just submitted (the listing stamp is left alone: other new run dirs may need a scan)."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?)", _row(job))
            self.db.execute("DELETE FROM meta WHERE key = ?", (f"pending:{job.run_dir}",))

    def jobs(self) -> list[Job]:
        rows = self.db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [_job(r) for r in rows]

    def get(self, job_id: int) -> Job | None:
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def finished_rows(self) -> dict[int, dict]:
        return {i: json.loads(row) for i, row in self.db.execute("SELECT id, row FROM finished")}

    def set_finished(self, rows: list[dict]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO finished VALUES (?, ?)",
                                [(r["id"], json.dumps(r)) for r in rows])

    def close(self) -> None:
        self.db.close()


def _row(job: Job) -> tuple:
    return (job.id, job.name, str(job.run_dir), job.cluster, job.cluster_job_id, job.submitted_at)


def _job(row: tuple) -> Job:
    return Job(id=row[0], name=row[1], run_dir=Path(row[2]), cluster=row[3], cluster_job_id=row[4],
               submitted_at=row[5])


def claim_id(runs_dir: Path) -> int:
    """The next free job id, claimed by an atomic mkdir so two submits never share one."""
    ids = runs_dir / ".ids"
    ids.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in ids.iterdir() if p.name.isdigit()]
    candidate = max(taken, default=0) + 1
    while True:
        try:
            (ids / str(candidate)).mkdir()
            return candidate
        except FileExistsError:
            candidate += 1


def release_id(runs_dir: Path, job_id: int) -> None:
    (runs_dir / ".ids" / str(job_id)).rmdir()
