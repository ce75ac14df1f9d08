"""SQLiteJobStore: round trips, upsert, client job lists, restart recovery (issue 15: queued again,
bounded by max_restarts) and the migration of a database from before failure codes (issue 12)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from dataclasses import replace

from server.core.jobs import ImageFile, JobRecord, JobResult
from server.core.states import RESTART_REASON, FailureCode, JobStatus
from server.core.store import SQLiteJobStore, parse_failure
from tests.engine_helpers import spec

S = JobStatus

# The jobs table as it was before the failure column.
OLD_SCHEMA = """
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY,
    spec TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    result TEXT,
    error TEXT,
    owner TEXT,
    attempt INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX jobs_status ON jobs(status);
CREATE TABLE client_jobs (
    client_id TEXT NOT NULL,
    job_id TEXT NOT NULL,
    linked_at REAL NOT NULL,
    PRIMARY KEY (client_id, job_id)
);
"""

RESULT = JobResult(images=(ImageFile("a.png", "a_up.png"), ImageFile("b.png")), seeds=(7, 2**63 - 1),
                   upscale_error=None, generation_s=1.25)


def make(prompt="fox", seed=1, status=S.PENDING, at=100.0, **fields) -> JobRecord:
    job_spec = spec(prompt, seed=seed)
    return JobRecord(job_id=job_spec.job_id, spec=job_spec, status=status, created_at=at, updated_at=at, **fields)


def run(tmp_path, body, path=None):
    async def scenario():
        store = await SQLiteJobStore(path or tmp_path / "db" / "jobs.sqlite3").open()
        try:
            return await asyncio.wait_for(body(store), 10)
        finally:
            await store.close()
    return asyncio.run(scenario())


def test_put_get_round_trip(tmp_path):
    failed = make("f", status=S.FAILED, error="CUDA out of memory", failure=FailureCode.OUT_OF_MEMORY,
                  owner="key1", attempt=3)
    done = make("d", status=S.COMPLETED, result=RESULT)

    async def body(store):
        await store.put(failed)
        await store.put(done)
        assert await store.get(failed.job_id) == failed
        assert await store.get(done.job_id) == done
        assert await store.get("0" * 64) is None
    run(tmp_path, body)


def test_round_trip_survives_reopening(tmp_path):
    record = make("x", status=S.CANCELLED, error="cancelled", failure=FailureCode.CANCELLED)

    async def write(store):
        await store.put(record)

    async def read(store):
        return await store.get(record.job_id)
    run(tmp_path, write)
    assert run(tmp_path, read) == record


def test_put_upserts(tmp_path):
    first = make("u", status=S.FAILED, error="boom", failure=FailureCode.GENERATION_FAILED, attempt=1)
    second = replace(first, status=S.PENDING, error=None, failure=None, attempt=2, updated_at=200.0)
    third = replace(second, status=S.COMPLETED, result=RESULT, updated_at=300.0)

    async def body(store):
        await store.put(first)
        await store.put(second)
        assert await store.get(first.job_id) == second, "failure cleared, attempt counted"
        await store.put(third)
        assert await store.get(first.job_id) == third
    run(tmp_path, body)
    rows = sqlite3.connect(tmp_path / "db" / "jobs.sqlite3").execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
    assert rows == 1


def test_client_jobs_newest_first_and_limited(tmp_path):
    records = [make(f"p{i}", seed=i) for i in range(5)]

    async def body(store):
        for i, record in enumerate(records):
            await store.put(record)
            await store.link_client("alice", record.job_id, at=10.0 + i)
        await store.link_client("bob", records[0].job_id, at=1.0)
        await store.link_client("alice", records[0].job_id, at=99.0)  # already linked: ignored
        ids = [r.job_id for r in await store.client_jobs("alice")]
        assert ids == [r.job_id for r in reversed(records)]
        ids = [r.job_id for r in await store.client_jobs("alice", limit=2)]
        assert ids == [records[4].job_id, records[3].job_id]
        assert [r.job_id for r in await store.client_jobs("bob")] == [records[0].job_id]
        assert await store.client_jobs("nobody") == []
        assert (await store.client_jobs("alice", limit=1))[0] == records[4]
    run(tmp_path, body)


def test_recover_interrupted_queues_everything_again(tmp_path):
    # Queued at 100, 101, 102; the processing job was dequeued first (queued at 90); the generated
    # one earlier still. Recovery returns them in the order they are to run.
    pending_late = make("pending late", status=S.PENDING, at=102.0)
    pending_early = make("pending early", status=S.PENDING, at=100.0)
    pending_mid = make("pending mid", status=S.PENDING, at=101.0)
    processing = make("processing", status=S.PROCESSING, at=90.0, attempt=2)
    generated = make("generated", status=S.GENERATED, result=RESULT, at=80.0)
    completed = make("completed", status=S.COMPLETED, result=RESULT)
    failed = make("failed", status=S.FAILED, error="boom", failure=FailureCode.GENERATION_FAILED)
    cancelled = make("cancelled", status=S.CANCELLED, error="cancelled", failure=FailureCode.CANCELLED)
    everything = [pending_late, pending_early, pending_mid, processing, generated, completed, failed, cancelled]

    async def body(store):
        for record in everything:
            await store.put(record)
        recovered = await store.recover_interrupted(max_restarts=3)
        assert [r.job_id for r in recovered] == [generated.job_id, processing.job_id, pending_early.job_id,
                                                 pending_mid.job_id, pending_late.job_id]
        for record in recovered:
            assert await store.get(record.job_id) == record, "what is returned is what is stored"
        by_id = {r.job_id: r for r in recovered}
        for pending in (pending_early, pending_mid, pending_late):
            assert by_id[pending.job_id] == pending, "a pending job is queued again unchanged"
        retried = by_id[processing.job_id]
        assert (retried.status, retried.attempt, retried.error, retried.failure) == (S.PENDING, 3, None, None)
        assert by_id[generated.job_id] == generated, "a generated job keeps its image; its upscale runs again"
        for untouched in (completed, failed, cancelled):
            assert await store.get(untouched.job_id) == untouched
    run(tmp_path, body)


def test_a_job_running_at_max_restarts_deaths_is_not_retried(tmp_path):
    processing = make("crashes the process", status=S.PROCESSING)
    generated = make("upscale crashes the process", status=S.GENERATED, result=RESULT)
    waiting = make("waits", status=S.PENDING)

    async def body(store):
        for record in (processing, generated, waiting):
            await store.put(record)
        for death in (1, 2):  # the process dies, restarts, runs the jobs again, dies again
            recovered = {r.job_id: r for r in await store.recover_interrupted(max_restarts=3)}
            assert recovered[processing.job_id].status is S.PENDING
            assert recovered[processing.job_id].attempt == 1 + death
            assert recovered[generated.job_id].status is S.GENERATED
            assert recovered[waiting.job_id].status is S.PENDING, "pending jobs never ran: never counted"
            await store.put(recovered[processing.job_id].moved_to(S.PROCESSING))
        recovered = {r.job_id: r for r in await store.recover_interrupted(max_restarts=3)}
        crashed = recovered[processing.job_id]
        assert (crashed.status, crashed.failure) == (S.FAILED, FailureCode.INTERRUPTED)
        assert crashed.error == "interrupted by server restart 3 times; it is not retried"
        kept = recovered[generated.job_id]
        assert kept.status is S.COMPLETED and kept.failure is None
        assert kept.result == replace(RESULT, upscale_error="upscaling interrupted by server restart 3 times; "
                                                            "it is not retried")
        assert recovered[waiting.job_id].status is S.PENDING
        assert [r.job_id for r in await store.recover_interrupted(max_restarts=3)] == [waiting.job_id]
    run(tmp_path, body)


def test_resubmission_starts_the_restart_count_again(tmp_path):
    job = make("crashes once too often", status=S.PROCESSING)

    async def body(store):
        await store.put(job)
        [failed] = await store.recover_interrupted(max_restarts=1)
        assert failed.status is S.FAILED
        # The user asks again: a fresh count, so one more death is allowed before it fails again.
        await store.put(failed.moved_to(S.PENDING, attempt=failed.attempt + 1).moved_to(S.PROCESSING))
        [again] = await store.recover_interrupted(max_restarts=2)
        assert again.status is S.PENDING
    run(tmp_path, body)


def test_recover_generated_without_result_fails(tmp_path):
    # An inconsistent row (generated, no result) cannot be upscaled or completed: reported as interrupted.
    odd = make("odd", status=S.GENERATED)

    async def body(store):
        await store.put(odd)
        [changed] = await store.recover_interrupted(max_restarts=3)
        assert changed.status is S.FAILED and changed.failure is FailureCode.INTERRUPTED
        assert changed.error == f"{RESTART_REASON}; its saved image is missing"
    run(tmp_path, body)


def test_opens_a_database_from_before_failure_codes(tmp_path):
    path = tmp_path / "old.sqlite3"
    done = make("old-done", status=S.COMPLETED, result=RESULT, owner="k")
    failed = make("old-failed", status=S.FAILED, error="boom")
    running = make("old-running", status=S.PROCESSING)
    conn = sqlite3.connect(path)
    conn.executescript(OLD_SCHEMA)
    for record in (done, failed, running):
        conn.execute("INSERT INTO jobs VALUES (?,?,?,?,?,?,?,?,?)",
                     (record.job_id, json.dumps(record.spec.to_dict()), record.status.value, record.created_at,
                      record.updated_at, json.dumps(record.result.to_dict()) if record.result else None,
                      record.error, record.owner, record.attempt))
    conn.execute("INSERT INTO client_jobs VALUES (?,?,?)", ("c", done.job_id, 5.0))
    conn.commit()
    conn.close()

    async def body(store):
        assert await store.get(done.job_id) == done
        old_failed = await store.get(failed.job_id)
        assert old_failed == failed and old_failed.failure is None
        assert [r.job_id for r in await store.client_jobs("c")] == [done.job_id]
        [recovered] = await store.recover_interrupted(max_restarts=3)
        assert recovered.job_id == running.job_id and recovered.status is S.PENDING
        assert await store.get(running.job_id) == recovered
        new = make("new", status=S.FAILED, error="oom", failure=FailureCode.OUT_OF_MEMORY)
        await store.put(new)
        assert await store.get(new.job_id) == new
    run(tmp_path, body, path)
    columns = [row[1] for row in sqlite3.connect(path).execute("PRAGMA table_info(jobs)")]
    assert columns[-2:] == ["failure", "restarts"]
    assert run(tmp_path, lambda store: store.get(done.job_id), path) == done, "reopening a migrated database"


def test_unknown_failure_code_reads_as_generation_failed(tmp_path):
    path = tmp_path / "jobs.sqlite3"
    record = make("future", status=S.FAILED, error="???")
    run(tmp_path, lambda store: store.put(record), path)

    def set_failure(value):
        conn = sqlite3.connect(path)
        conn.execute("UPDATE jobs SET failure = ? WHERE job_id = ?", (value, record.job_id))
        conn.commit()
        conn.close()

    set_failure("quantum_flux")  # written by a newer version
    assert run(tmp_path, lambda store: store.get(record.job_id), path).failure is FailureCode.GENERATION_FAILED
    set_failure("")
    assert run(tmp_path, lambda store: store.get(record.job_id), path).failure is None
    assert parse_failure(None) is None
    assert parse_failure("worker_lost") is FailureCode.WORKER_LOST
    assert parse_failure("nonsense") is FailureCode.GENERATION_FAILED
