"""Job persistence: the ``JobStore`` interface and its embedded SQLite implementation.

Contract: ``put`` returns only after the record is durable (WAL, synchronous=NORMAL survives a
process kill; power loss may lose the last commit), and the engine announces a state change only
after ``put`` returned. All SQLite work runs on one dedicated thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import json
import errno
import logging
import shutil
import sqlite3
from dataclasses import replace
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from server.core.errors import StorageUnavailable
from server.core.jobs import JobRecord, JobResult
from server.core.spec import JobSpec
from server.core.states import (RANK, RECOVERY, RECOVERY_EXHAUSTED, RESTART_REASON, TERMINAL, FailureCode, JobStatus,
                                exhausted_reason)

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    result TEXT,
    error TEXT,
    owner TEXT,
    attempt INTEGER NOT NULL DEFAULT 1,
    failure TEXT,
    restarts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status);
CREATE TABLE IF NOT EXISTS client_jobs (
    client_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    linked_at REAL NOT NULL,
    PRIMARY KEY (client_id, job_id)
);
"""


class JobStore(Protocol):
    async def put(self, record: JobRecord) -> None: ...
    async def get(self, job_id: str) -> JobRecord | None: ...
    async def link_client(self, client_id: str, job_id: str, at: float) -> None: ...
    async def client_jobs(self, client_id: str, owner: str | None = None, limit: int = 200) -> list[JobRecord]: ...
    async def recover_interrupted(self, max_restarts: int) -> list[JobRecord]: ...
    async def expired(self, finished_before: float, unstarted_before: float, limit: int = 1000) -> list[JobRecord]: ...
    async def oldest_finished(self, before: float, limit: int = 200) -> list[JobRecord]: ...
    async def delete(self, job_ids: list[str], links_before: float) -> tuple[int, int]: ...
    async def job_count(self) -> int: ...
    async def input_refs(self) -> set[str]: ...
    async def close(self) -> None: ...


class SQLiteJobStore:
    def __init__(self, path: Path):
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> "SQLiteJobStore":
        """Open, check and migrate the database. Raises ``StorageUnavailable`` whose message is one
        line naming the file, the problem and the remedy when the file is damaged, is not a file,
        cannot be opened, or its disk is full: the server must not start on it."""
        try:
            await self._run(self._open_sync)
            await self._run(self._check_sync)
        except (sqlite3.Error, OSError) as exc:
            await self._run(self._discard_sync)
            raise StorageUnavailable(open_failure(self._path, exc)) from None
        return self

    @classmethod
    def check(cls, path: Path) -> None:
        """Blocking: open and check the database at ``path`` once, then close it (before the server
        binds, so a damaged database ends ``python -m server`` with one line). Raises like ``open``."""
        import asyncio

        async def probe() -> None:
            store = await cls(path).open()
            await store.close()

        asyncio.run(probe())

    def _check_sync(self) -> None:
        """Read every page (damage past the header shows only when read) and commit one write (a
        full disk shows only on write), so neither surfaces later as a failure of some job."""
        problems = [row[0] for row in self._conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"integrity check failed: {problems[0]}")
        version = int(self._conn.execute("PRAGMA user_version").fetchone()[0])
        self._conn.execute(f"PRAGMA user_version = {version}")  # rewrites the header page: a real commit

    def _discard_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _open_sync(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(jobs)")}
        if "failure" not in columns:  # a database from before failure codes
            conn.execute("ALTER TABLE jobs ADD COLUMN failure TEXT")
        if "restarts" not in columns:  # a database from before restart recovery
            conn.execute("ALTER TABLE jobs ADD COLUMN restarts INTEGER NOT NULL DEFAULT 0")
        self._conn = conn

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def put(self, record: JobRecord) -> None:
        await self._run(self._put_sync, record)

    def _put_sync(self, record: JobRecord) -> None:
        result = json.dumps(record.result.to_dict()) if record.result else None
        self._conn.execute(
            "INSERT INTO jobs (job_id, spec, status, created_at, updated_at, result, error, owner, attempt, failure)"
            " VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(job_id) DO UPDATE SET spec=excluded.spec,"
            " status=excluded.status, created_at=excluded.created_at, updated_at=excluded.updated_at,"
            " result=excluded.result, error=excluded.error, owner=excluded.owner, attempt=excluded.attempt,"
            " failure=excluded.failure, restarts=" + KEEP_RESTARTS,
            (record.job_id, json.dumps(record.spec.to_dict()), record.status.value, record.created_at,
             record.updated_at, result, record.error, record.owner, record.attempt,
             record.failure.value if record.failure else None),
        )

    async def get(self, job_id: str) -> JobRecord | None:
        return await self._run(self._get_sync, job_id)

    def _get_sync(self, job_id: str) -> JobRecord | None:
        row = self._conn.execute(f"SELECT {COLUMNS} FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return _record_from_row(row) if row else None

    async def link_client(self, client_id: str, job_id: str, at: float) -> None:
        await self._run(lambda: self._conn.execute(
            "INSERT OR IGNORE INTO client_jobs (client_id, job_id, linked_at) VALUES (?,?,?)", (client_id, job_id, at)))

    async def client_jobs(self, client_id: str, owner: str | None = None, limit: int = 200) -> list[JobRecord]:
        """The newest ``limit`` jobs linked to ``client_id`` and, when given, owned by ``owner``:
        filtered before the limit, so one key's jobs never push another key's off its list."""
        def query() -> list[JobRecord]:
            rows = self._conn.execute(
                f"SELECT {COLUMNS} FROM client_jobs JOIN jobs USING (job_id) WHERE client_id = ?"
                " AND (? IS NULL OR owner = ?) ORDER BY client_jobs.linked_at DESC LIMIT ?",
                (client_id, owner, owner, limit)).fetchall()
            return [_record_from_row(row) for row in rows]
        return await self._run(query)

    # -- retention (server.core.retention decides; these only read and delete) -------------------

    async def expired(self, finished_before: float, unstarted_before: float, limit: int = 1000) -> list[JobRecord]:
        """Finished jobs past their retention: with images, last changed before ``finished_before``;
        without (cancelled before running, failed), before ``unstarted_before``. Oldest first."""
        marks = ",".join("?" * len(TERMINAL))
        return await self._select(
            f"SELECT {COLUMNS} FROM jobs WHERE status IN ({marks}) AND ((result IS NOT NULL AND updated_at < ?)"
            " OR (result IS NULL AND updated_at < ?)) ORDER BY updated_at LIMIT ?",
            (*[status.value for status in TERMINAL], finished_before, unstarted_before, limit))

    async def oldest_finished(self, before: float, limit: int = 200) -> list[JobRecord]:
        """Finished jobs with images, last changed before ``before``, oldest first."""
        marks = ",".join("?" * len(TERMINAL))
        return await self._select(
            f"SELECT {COLUMNS} FROM jobs WHERE status IN ({marks}) AND result IS NOT NULL AND updated_at < ?"
            " ORDER BY updated_at LIMIT ?", (*[status.value for status in TERMINAL], before, limit))

    async def delete(self, job_ids: list[str], links_before: float) -> tuple[int, int]:
        """Delete the jobs (with their client links) and every client link older than
        ``links_before``, in one transaction: (jobs, links) deleted."""
        def delete_sync() -> tuple[int, int]:
            ids = [(job_id,) for job_id in job_ids]
            self._conn.execute("BEGIN")
            try:
                links = self._conn.executemany("DELETE FROM client_jobs WHERE job_id = ?", ids).rowcount
                jobs = self._conn.executemany("DELETE FROM jobs WHERE job_id = ?", ids).rowcount
                links += self._conn.execute("DELETE FROM client_jobs WHERE linked_at < ?", (links_before,)).rowcount
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return max(jobs, 0), max(links, 0)
        return await self._run(delete_sync)

    async def job_count(self) -> int:
        return await self._run(lambda: self._conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])

    async def input_refs(self) -> set[str]:
        """The pixel hashes of every edit input (image and mask) a kept job refers to."""
        def refs_sync() -> set[str]:
            rows = self._conn.execute("SELECT json_extract(spec, '$.image_sha'), json_extract(spec, '$.mask_sha')"
                                      " FROM jobs WHERE json_extract(spec, '$.image_sha') IS NOT NULL").fetchall()
            return {sha for row in rows for sha in row if sha}
        return await self._run(refs_sync)

    async def _select(self, sql: str, args: tuple) -> list[JobRecord]:
        return await self._run(lambda: [_record_from_row(row) for row in self._conn.execute(sql, args).fetchall()])

    async def recover_interrupted(self, max_restarts: int) -> list[JobRecord]:
        """At start: the jobs a dead process left unfinished, after ``states.RECOVERY``, in the
        order they are to run again: generated ones (only their upscale is left), then the one that
        was processing, then pending ones in the order they were queued. A processing or generated
        job cut short for the ``max_restarts``-th time ends by ``states.RECOVERY_EXHAUSTED``
        instead (returned too, terminal). Pending jobs are returned unchanged."""
        return await self._run(self._recover_sync, max_restarts)

    def _recover_sync(self, max_restarts: int) -> list[JobRecord]:
        marks = ",".join("?" * len(RECOVERY))
        rows = self._conn.execute(f"SELECT {COLUMNS}, restarts FROM jobs WHERE status IN ({marks})",
                                  [status.value for status in RECOVERY]).fetchall()
        # Newest news first (a generated job is furthest along), then queue order: a pending job's
        # updated_at is when it was queued.
        rows.sort(key=lambda row: (-RANK[JobStatus(row[2])], row[4]))
        recovered = []
        self._conn.execute("BEGIN")  # all or nothing: a death during recovery counts no restart twice
        try:
            for row in rows:
                recovered.append(self._recover_row(row, max_restarts))
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return recovered

    def _recover_row(self, row: tuple, max_restarts: int) -> JobRecord:
        record, restarts = _record_from_row(row[:-1]), row[-1]
        if record.status is JobStatus.PENDING:
            return record
        restarts += 1  # this job was running when the process died
        record = _recovered(record, restarts, max_restarts)
        self._put_sync(record)
        self._conn.execute("UPDATE jobs SET restarts = ? WHERE job_id = ?", (restarts, record.job_id))
        return record

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)


# A job's count of process deaths it was running at: kept across updates, reset when a finished
# job starts over (resubmission or upscale retry): the user asked for it again.
KEEP_RESTARTS = (f"CASE WHEN jobs.status IN ({','.join(repr(s.value) for s in sorted(TERMINAL))}) THEN 0"
                 " ELSE jobs.restarts END")


def _recovered(record: JobRecord, restarts: int, max_restarts: int) -> JobRecord:
    """A processing or generated job after its ``restarts``-th process death."""
    if record.status is JobStatus.GENERATED and record.result is None:  # inconsistent: no image to keep
        return record.moved_to(JobStatus.FAILED, error=f"{RESTART_REASON}; its saved image is missing",
                               failure=FailureCode.INTERRUPTED)
    if restarts < max_restarts:
        if record.status is JobStatus.PROCESSING:
            return record.moved_to(RECOVERY[record.status], attempt=record.attempt + 1)
        return record  # generated: its upscale runs again
    if record.status is JobStatus.GENERATED:
        return record.moved_to(RECOVERY_EXHAUSTED[record.status],
                               result=replace(record.result, upscale_error=f"upscaling {exhausted_reason(restarts)}"))
    return record.moved_to(RECOVERY_EXHAUSTED[record.status], error=exhausted_reason(restarts),
                           failure=FailureCode.INTERRUPTED)


def open_failure(path: Path, exc: BaseException) -> str:
    """One line for a database that cannot be used: the file, the problem, the remedy."""
    aside = f"move it aside (mv {path} {path}.broken) and start again to begin with an empty job list"
    detail = getattr(exc, "strerror", None) or str(exc)
    code = getattr(exc, "sqlite_errorname", "")
    if path.is_dir():
        return f"the job database {path} is a directory, not a file; {aside}"
    if getattr(exc, "errno", None) == errno.ENOSPC or code == "SQLITE_FULL" or _disk_full(path.parent):
        return f"cannot write the job database {path}: the disk is full; free space on that disk and start again"
    if code in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or "integrity" in detail:
        return f"the job database {path} is damaged ({detail}); {aside} (image files are not affected)"
    return f"cannot open the job database {path} ({detail}); check its permissions, or {aside}"


def _disk_full(directory: Path) -> bool:
    """SQLite reports a full disk as a generic I/O error when it cannot even create its -shm file."""
    try:
        return shutil.disk_usage(directory).free < 1024 * 1024
    except OSError:
        return False


COLUMNS = "jobs.job_id, spec, status, created_at, updated_at, result, error, owner, attempt, failure"


def _record_from_row(row: tuple) -> JobRecord:
    job_id, spec, status, created_at, updated_at, result, error, owner, attempt, failure = row
    return JobRecord(
        job_id=job_id, spec=JobSpec.from_dict(json.loads(spec)), status=JobStatus(status),
        created_at=created_at, updated_at=updated_at,
        result=JobResult.from_dict(json.loads(result)) if result else None,
        error=error, owner=owner, attempt=attempt, failure=parse_failure(failure),
    )


def parse_failure(value: str | None) -> FailureCode | None:
    """A stored failure code; an unknown one (written by a newer version) reads as generation_failed."""
    if not value:
        return None
    try:
        return FailureCode(value)
    except ValueError:
        return FailureCode.GENERATION_FAILED
