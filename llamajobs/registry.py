"""The SQLite index of one runs directory, on local disk; the run directories stay the truth.

SQLite's locking does not work on NFS/Lustre, so the database lives under $XDG_CACHE_HOME and is
rebuilt from the run dirs whenever it is missing, damaged, of another schema, or older than the runs
directory's listing. Job ids are allocated from the run dirs themselves (see claim_id).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamajobs import files
from llamajobs.errors import SpecError

SCHEMA_VERSION = 2  # PRAGMA user_version; an index of another version is rebuilt
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    run_dir TEXT NOT NULL UNIQUE,
    cluster TEXT NOT NULL,
    cluster_job_id TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    problem TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- The status row of a job that ended, so `status` reads no files and asks no cluster for it again.
CREATE TABLE IF NOT EXISTS finished (id INTEGER PRIMARY KEY, row TEXT NOT NULL);
"""

JOB_FILE = "job.json"
JOB_FILE_BYTES = 65536  # job.json holds five short fields
CLAIMS = ".ids"  # runs/.ids/<id>: an id claimed by a submit (an atomic mkdir)
RUN_DIR = re.compile(r"^(\d{1,18})-(.+)$")  # <id>-<name>; ids stay far below SQLite's 2**63
MAX_ID = 10**18
# A run dir without job.json is a submit in flight (on this or another login node) for this long;
# after that, a submit that died before the cluster took the job: a row says so.
SUBMIT_GRACE_S = 120.0


@dataclass(frozen=True, slots=True)
class Job:
    id: int
    name: str
    run_dir: Path
    cluster: str
    cluster_job_id: str  # "" when job.json is damaged or missing
    submitted_at: float
    problem: str | None = None  # what is wrong with the run dir's job.json (the job is shown anyway)


def database_path(runs_dir: Path) -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamajobs"
    key = hashlib.sha1(str(runs_dir.absolute()).encode()).hexdigest()[:16]
    return cache / f"registry-{key}.sqlite"


def run_dir_id(path: Path) -> int | None:
    """The id in a run dir's name (<id>-<name>), or None for anything else in the runs directory."""
    match = RUN_DIR.match(path.name)
    return int(match[1]) if match else None


def read_job(run_dir: Path) -> Job | None:
    """The job a run dir records in job.json (written once the cluster accepted it); None while it
    has none. Damage (unreadable, not JSON, wrong types, another id than the dir's) gives a Job
    named after the dir, with `problem` saying what is wrong."""
    dir_id, name = run_dir_id(run_dir), run_dir.name.partition("-")[2]
    try:
        data = json.loads(files.read_bytes(run_dir / JOB_FILE, JOB_FILE_BYTES))
    except FileNotFoundError:
        return None
    except OSError as e:
        if isinstance(e, files.Refused):  # a FIFO, a device, a directory, or far too large
            return _damaged(run_dir, f"{JOB_FILE} {e.strerror}")
        return _damaged(run_dir, f"run dir unreadable ({e.strerror})")
    except (ValueError, RecursionError) as e:
        return _damaged(run_dir, f"{JOB_FILE}: not JSON ({e})")
    if not isinstance(data, dict):
        return _damaged(run_dir, f"{JOB_FILE}: not an object")
    fields = {"id": int, "name": str, "cluster": str, "cluster_job_id": (str, int), "submitted_at": (int, float)}
    for key, kind in fields.items():
        if not isinstance(data.get(key), kind) or isinstance(data.get(key), bool):
            return _damaged(run_dir, f"{JOB_FILE}: {key} {data.get(key)!r} is wrong")
    if data["id"] != dir_id or not math.isfinite(data["submitted_at"]):
        return _damaged(run_dir, f"{JOB_FILE}: id {data['id']} and submitted_at {data['submitted_at']!r} do not fit "
                                 f"the run dir {run_dir.name}")
    return Job(id=dir_id, name=data["name"] or name, run_dir=run_dir, cluster=data["cluster"],
               cluster_job_id=str(data["cluster_job_id"]), submitted_at=float(data["submitted_at"]))


def _damaged(run_dir: Path, problem: str, since: float | None = None) -> Job:
    if since is None:
        try:
            since = run_dir.stat().st_mtime
        except OSError:
            since = 0.0
    return Job(id=run_dir_id(run_dir) or 0, name=run_dir.name.partition("-")[2], run_dir=run_dir, cluster="",
               cluster_job_id="", submitted_at=since, problem=problem)


def scan(run_dir: Path, now: float) -> Job | None:
    """read_job, and a run dir that has had no job.json for SUBMIT_GRACE_S as a damaged job (its
    submit died): it must not vanish from the table. None: a submit in flight, or gone."""
    job = read_job(run_dir)
    if job is not None:
        return job
    try:
        since = run_dir.stat().st_mtime
    except OSError:
        return None
    if now - since < SUBMIT_GRACE_S:
        return None
    return _damaged(run_dir, f"no {JOB_FILE}: its submission did not finish", since)


def write_job_file(job: Job) -> None:
    data = {"id": job.id, "name": job.name, "cluster": job.cluster,
            "cluster_job_id": job.cluster_job_id, "submitted_at": job.submitted_at}
    tmp = job.run_dir / (JOB_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, job.run_dir / JOB_FILE)


def check_runs_dir(runs_dir: Path, write: bool) -> None:
    """SpecError naming the runs directory when it cannot serve: it (or, while it does not exist yet,
    the nearest folder above it) is a file, or not readable (or, to submit, not writable). A missing
    one is fine: the first submit creates it."""
    existing = next(p for p in (runs_dir, *runs_dir.parents) if p.exists())
    if not existing.is_dir():
        where = "" if existing == runs_dir else f" ({existing} is a file)"
        raise SpecError(f"runs directory {runs_dir} is a file, not a directory{where}; move it away or point "
                        f"--runs-dir (or LLAMAJOBS_RUNS) at a directory")
    if existing != runs_dir:  # the first submit creates it there
        if write and not os.access(existing, os.W_OK | os.X_OK):
            raise SpecError(f"runs directory {runs_dir} is not writable by this user ({existing} is not); "
                            f"fix its permissions or point --runs-dir (or LLAMAJOBS_RUNS) elsewhere")
        return
    mode = os.R_OK | os.X_OK | (os.W_OK if write else 0)
    if not os.access(runs_dir, mode):
        raise SpecError(f"runs directory {runs_dir} is not {'writable' if write else 'readable'} by this user; "
                        f"fix its permissions or point --runs-dir (or LLAMAJOBS_RUNS) elsewhere")


def _open(path: Path) -> sqlite3.Connection:
    """The index database, created or (when damaged or of another schema) made anew: it only
    indexes the run dirs, which stay."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SpecError(f"cannot create the registry's cache folder {path.parent} ({e.strerror}); "
                        f"set XDG_CACHE_HOME to a writable local directory") from None
    for attempt in range(2):
        db = None
        try:
            db = sqlite3.connect(path, timeout=30)
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                with db:
                    for table in ("jobs", "meta", "finished"):
                        db.execute(f"DROP TABLE IF EXISTS {table}")
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            return db
        except sqlite3.OperationalError as e:  # locked past the timeout, or the folder is not writable
            if db is not None:
                db.close()
            raise SpecError(f"registry index {path}: {e}; set XDG_CACHE_HOME to a writable local directory") from None
        except sqlite3.DatabaseError:  # not a database, or malformed: a cache, so start it again
            if db is not None:
                db.close()
            if attempt:
                raise
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    raise AssertionError("unreachable")


class Registry:
    def __init__(self, runs_dir: Path) -> None:
        check_runs_dir(runs_dir, write=False)
        self.runs_dir = runs_dir
        self.db = _open(database_path(runs_dir))
        self._sync_if_stale()

    def _listing_stamp(self) -> str:
        return str(self.runs_dir.stat().st_mtime_ns) if self.runs_dir.is_dir() else "absent"

    def _run_dirs(self) -> list[Path]:
        try:
            entries = sorted(self.runs_dir.iterdir())
        except FileNotFoundError:
            return []
        return [d for d in entries if run_dir_id(d) is not None and d.is_dir()]

    def _sync_if_stale(self) -> None:
        """Rescan when the runs directory's listing changed; otherwise look again only at the run
        dirs that had no job.json yet (a submit on this or another login node was in flight:
        writing job.json inside a run dir does not change the listing) and at the damaged ones."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'listing'").fetchone()
        stamp = self._listing_stamp()
        if row is None or row[0] != stamp:
            self.rebuild(stamp)
            return
        pending = [Path(r[0]) for r in self.db.execute("SELECT value FROM meta WHERE key LIKE 'pending:%'")]
        damaged = [Path(r[0]) for r in self.db.execute("SELECT run_dir FROM jobs WHERE problem IS NOT NULL")]
        if pending or damaged:
            self._index(pending + damaged)

    def rebuild(self, stamp: str | None = None) -> None:
        """Index every run dir, remember those without job.json yet, and forget rows whose run dir
        is gone. Rows are replaced, never cleared first, so a concurrent add() survives."""
        stamp = stamp or self._listing_stamp()
        self._index(self._run_dirs(), forget_gone=True)
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('listing', ?)", (stamp,))

    def _index(self, dirs: list[Path], forget_gone: bool = False) -> None:
        now = time.time()
        found = {d: scan(d, now) for d in dirs}
        known = {Path(r[2]): _job(r) for r in self.db.execute("SELECT * FROM jobs")}
        rows = []
        for d, job in found.items():
            if job is not None and job.problem and (old := known.get(d)) and old.cluster_job_id:
                # job.json became unreadable: the cluster's job is still the one indexed before
                job = Job(old.id, old.name, d, old.cluster, old.cluster_job_id, old.submitted_at, job.problem)
            if job is not None:
                rows.append(_row(job))
        gone = [str(d) for d in (known if forget_gone else dirs) if not d.exists()]
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            self.db.executemany("DELETE FROM jobs WHERE run_dir = ?", [(g,) for g in gone])
            self.db.execute("DELETE FROM finished WHERE id NOT IN (SELECT id FROM jobs WHERE problem IS NULL)")
            if forget_gone:
                self.db.execute("DELETE FROM meta WHERE key LIKE 'pending:%'")
            else:
                self.db.executemany("DELETE FROM meta WHERE key = ?", [(f"pending:{d}",) for d in dirs])
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                                [(f"pending:{d}", str(d)) for d, j in found.items() if j is None and d.exists()])

    def add(self, job: Job) -> None:
        """Index a job just submitted (the listing stamp is left alone: other new run dirs may need a scan)."""
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?)", _row(job))
            self.db.execute("DELETE FROM meta WHERE key = ?", (f"pending:{job.run_dir}",))

    def jobs(self) -> list[Job]:
        rows = self.db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [_job(r) for r in rows]

    def get(self, job_id: int) -> Job | None:
        if not isinstance(job_id, int) or not 0 <= job_id < MAX_ID:  # SQLite's integers end at 2**63
            return None
        row = self.db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def finished_rows(self) -> dict[int, dict[str, Any]]:
        found = {}
        for job_id, text in self.db.execute("SELECT id, row FROM finished"):
            try:
                row = json.loads(text)
            except ValueError:
                continue
            if isinstance(row, dict):
                found[job_id] = row
        return found

    def set_finished(self, rows: list[dict[str, Any]]) -> None:
        """Remember rows of jobs that ended; a row naming a problem is not final (the damage may be
        repaired, or be a file still being written), so it is not remembered."""
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO finished VALUES (?, ?)",
                                [(r["id"], json.dumps(r)) for r in rows if not r.get("problem")])

    def close(self) -> None:
        self.db.close()


def _row(job: Job) -> tuple:
    return (job.id, job.name, str(job.run_dir), job.cluster, job.cluster_job_id, job.submitted_at, job.problem)


def _job(row: tuple) -> Job:
    return Job(id=row[0], name=row[1], run_dir=Path(row[2]), cluster=row[3], cluster_job_id=row[4],
               submitted_at=row[5], problem=row[6])


def claim_id(runs_dir: Path) -> int:
    """A new job id: one above every id the runs directory shows, in its run dirs (<id>-<name>,
    also those copied in from elsewhere) or its claims, claimed by an atomic mkdir so that
    concurrent submits never share one. No counter file whose loss could make ids restart."""
    check_runs_dir(runs_dir, write=True)
    claims = runs_dir / CLAIMS
    try:
        claims.mkdir(parents=True, exist_ok=True)
        taken = [run_dir_id(p) for p in runs_dir.iterdir()] + [int(p.name) for p in claims.iterdir() if p.name.isdigit()]
    except OSError as e:
        raise SpecError(f"runs directory {runs_dir}: {e.strerror}; fix its permissions or point --runs-dir "
                        f"(or LLAMAJOBS_RUNS) elsewhere") from None
    candidate = max((i for i in taken if i is not None and i < MAX_ID), default=0) + 1
    while True:
        try:
            (claims / str(candidate)).mkdir()
        except FileExistsError:
            candidate += 1
            continue
        if not any(runs_dir.glob(f"{candidate}-*")):  # a run dir copied in since the listing keeps its id
            return candidate
        candidate += 1


def release_id(runs_dir: Path, job_id: int) -> None:
    """Give back an id whose submit failed before anything was left under it."""
    try:
        (runs_dir / CLAIMS / str(job_id)).rmdir()
    except OSError:
        pass
