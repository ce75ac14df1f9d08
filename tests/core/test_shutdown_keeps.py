"""What a SIGTERM (``JobEngine.stop``) keeps for the next start, and what it must not (issue 15):
a job it cuts short is queued again without counting as a process death; a user's cancel that was
pending when the grace period ended stands; a job stored as failed by an older version's shutdown
is stored normally when it is requested again. The generator is held by a gate, so every step
boundary is where the test puts it (no clock)."""

from __future__ import annotations

import asyncio
import threading

from server.core.jobs import JobRecord, JobStatus
from server.core.states import FAILURE_MESSAGES, FailureCode
from server.core.store import SQLiteJobStore
from server.testing.fakes import FakeGenerator
from tests.engine_helpers import running_engine, spec, until_terminal


async def until_status(subscriber, status: JobStatus, timeout: float = 20.0) -> None:
    while True:
        event = await subscriber.get(timeout=timeout)
        if event.record is not None and event.record.status is status:
            return


async def stored(tmp_path, job_id: str) -> JobRecord:
    store = await SQLiteJobStore(tmp_path / "jobs.sqlite3").open()
    try:
        return await store.get(job_id)
    finally:
        await store.close()


async def stop_with_a_step_outlasting_it(engine, gate: threading.Event) -> None:
    """SIGTERM with no grace while the GPU thread is held inside a step: the engine ends the job
    itself after its wait (``STOP_WAIT_S``); then the held thread is let go."""
    try:
        await engine.stop(0.0)
    finally:
        gate.set()


def test_a_job_cut_short_by_sigterm_runs_again_without_counting_as_a_process_death(tmp_path):
    job = spec("cut short by a graceful stop", seed=21)

    async def main():
        gate = threading.Event()
        async with running_engine(tmp_path, FakeGenerator(gate=gate), max_restarts=1) as engine:
            submission = await engine.submit(job, interest="user")
            await until_status(submission.subscriber, JobStatus.PROCESSING)
            await stop_with_a_step_outlasting_it(engine, gate)
            told = (await until_terminal(submission.subscriber))[-1].record
        kept = await stored(tmp_path, job.job_id)
        # One allowed process death: had the stop counted as one, this start would end it failed.
        async with running_engine(tmp_path, FakeGenerator(), max_restarts=1) as engine:
            record = await engine.get(job.job_id)
            final = record if record.status.is_terminal else (await until_terminal(engine.subscribe(record)))[-1].record
        return told, kept, final

    told, kept, final = asyncio.run(main())
    assert (told.status, told.failure) == (JobStatus.FAILED, FailureCode.SHUTDOWN)
    assert (kept.status, kept.attempt) == (JobStatus.PENDING, 2), "queued again as a new attempt"
    assert final.status is JobStatus.COMPLETED, (final.status, final.error)


def test_a_users_cancel_pending_at_the_end_of_the_grace_period_stands(tmp_path):
    job = spec("cancelled by its user during the shutdown", seed=22)

    async def main():
        gate = threading.Event()
        async with running_engine(tmp_path, FakeGenerator(gate=gate)) as engine:
            submission = await engine.submit(job, interest="user")
            await until_status(submission.subscriber, JobStatus.PROCESSING)
            await engine.cancel(job.job_id, "user")  # read at the next step, which is held
            await stop_with_a_step_outlasting_it(engine, gate)
            told = (await until_terminal(submission.subscriber))[-1].record
        return told, await stored(tmp_path, job.job_id)

    told, kept = asyncio.run(main())
    assert told.status is JobStatus.CANCELLED, (told.status, told.error)
    assert kept.status is JobStatus.CANCELLED, "not kept for the next start: nobody wants it"


def test_a_job_an_older_version_stored_as_failed_by_shutdown_is_stored_normally_when_run_again(tmp_path):
    job = spec("failed at an older version's shutdown", seed=23)

    async def main():
        store = await SQLiteJobStore(tmp_path / "jobs.sqlite3").open()
        await store.put(JobRecord(job_id=job.job_id, spec=job, status=JobStatus.FAILED, created_at=1.0,
                                  updated_at=1.0, error=FAILURE_MESSAGES[FailureCode.SHUTDOWN],
                                  failure=FailureCode.SHUTDOWN))
        await store.close()
        async with running_engine(tmp_path, FakeGenerator()) as engine:
            submission = await engine.submit(job, interest="again")
            told = (await until_terminal(submission.subscriber))[-1].record
        return told, await stored(tmp_path, job.job_id)

    told, kept = asyncio.run(main())
    assert told.status is JobStatus.COMPLETED
    assert (kept.status, kept.failure) == (JobStatus.COMPLETED, None), "else every start would run it again"
