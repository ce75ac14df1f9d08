"""``JobEngine``: the single-process ``Engine`` (server.core.ports), SQLite-backed.

It owns the queue, the GPU thread (through ``JobRunner``), dedup and the result cache, the state
machine's side effects (persist, then announce) and the event fan-out. It is also the ``JobHost``
its runner drives (``move``, ``finish``, ``publish_step``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from server.core import files
from server.core.disk import DiskSpace
from server.core.errors import JobNotCancellable, JobNotFound, ShuttingDown, StorageUnavailable
from server.core.events import EventHub, EventKind, JobEvent, Subscriber
from server.core.fairness import check_capacity, DrainEstimate, RequesterLedger
from server.core.generation import Generator, Upscaler
from server.core.jobs import JobRecord
from server.core.lru import LruCache
from server.core.locks import KeyedLocks
from server.core.ports import ActiveJob, EngineConfig, Submission
from server.core.runner import JobRunner, report_finished, shutdown_outcome, stored_form
from server.core.spec import JobSpec, scoped_job_id
from server.core.states import STOPPABLE, FailureCode, JobStatus
from server.core.store import JobStore

log = logging.getLogger(__name__)
STOP_WAIT_S = 3.0  # after the grace period: a step or an upscale tile ends well within this
DRAIN_S = 1.0  # then the time open streams get to send the final events just announced

__all__ = ["ActiveJob", "EngineConfig", "JobEngine", "Submission", "scoped_job_id"]


class JobEngine:
    def __init__(self, config: EngineConfig, generator: Generator, upscaler: Upscaler | None, store: JobStore,
                 metrics=None):
        self.config = config
        self.metrics = metrics  # server.metrics.Metrics, optional
        self.store = store
        self.hub = EventHub()
        self._active: dict[str, ActiveJob] = {}
        self._finished: LruCache[str, JobRecord] = LruCache(config.finished_cache_size)
        self._submit_locks = KeyedLocks()
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._seq = 0
        self._accepting = False
        self._idle = asyncio.Event()  # set whenever a job finishes
        self._stopping: asyncio.Future | None = None
        self._workers: list[asyncio.Task] = []
        self._runner = JobRunner(self, generator, upscaler)
        self.drain = DrainEstimate()  # seconds per job, for Retry-After
        self._requesters = RequesterLedger()  # who created each unfinished job (core.fairness)
        self._disk = DiskSpace(config.output_dir, config.min_free_disk_bytes)

    @property
    def runner(self) -> JobRunner:
        return self._runner

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._runner.bind_loop(asyncio.get_running_loop())
        await asyncio.to_thread(files.remove_partials, self.config.output_dir)
        await self._recover()
        self._workers = [asyncio.create_task(self._worker(), name=f"job-worker-{i}")
                         for i in range(self.config.max_in_flight)]
        self._accepting = True

    async def _recover(self) -> None:
        """Queue again what a dead process left unfinished (``states.RECOVERY``), in the store's
        order; jobs that are not retried any more are only remembered."""
        for record in await self.store.recover_interrupted(self.config.max_restarts):
            if record.status.is_terminal:
                log.warning("job %s: %s after restart (%s)", record.job_id[:12], record.status.value,
                            record.error or record.result.upscale_error)
                self._finished.put(record.job_id, record)
                continue
            self._enqueue(ActiveJob(record=record, recovered=True))
            log.warning("job %s: queued again after restart (%s, attempt %d)", record.job_id[:12],
                        record.status.value, record.attempt)

    def _enqueue(self, active: ActiveJob, announced: JobEvent | None = None) -> None:
        """Put an active job (pending, or generated awaiting its upscale) at the end of the queue;
        its status is announced here unless ``announced`` already did."""
        self._seq += 1
        active.enqueued_seq = self._seq
        self._active[active.job_id] = active
        self._finished.pop(active.job_id, None)
        active.status_history = [announced or self._announce(active.record)]
        self._queue.put_nowait(active.job_id)

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting work; let running jobs finish within ``grace_s``, then stop them (kept
        for the next start). Idempotent: a second call waits for the first."""
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._stop(grace_s))
        await asyncio.shield(self._stopping)

    async def _stop(self, grace_s: float) -> None:
        """Pending jobs end at once; after ``grace_s`` the others are stopped (a step, a tile) and
        whatever is unfinished ``STOP_WAIT_S`` later is ended (``runner.shutdown_outcome``): every
        client gets a final status, streams get ``DRAIN_S`` to send it."""
        self._accepting = False
        for active in [a for a in self._active.values() if a.record.status is JobStatus.PENDING]:
            await self.finish(active, **shutdown_outcome(active))
        if not await self._wait_idle(grace_s):
            for active in list(self._active.values()):
                if not active.cancel_flag.is_set():  # a user's pending cancel stands (not kept for a restart)
                    active.request_cancel(FailureCode.SHUTDOWN)
            await self._wait_idle(STOP_WAIT_S)
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._runner.shutdown()
        for active in list(self._active.values()):  # a step or tile outlasted the wait; its thread ends on its own
            await self.finish(active, **shutdown_outcome(active))
        deadline = time.monotonic() + DRAIN_S
        while self.hub.subscriber_count() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # streams close their subscriber once their final event is sent

    async def _wait_idle(self, timeout: float) -> bool:
        """True once no job is unfinished, False if ``timeout`` passed first."""
        try:
            async with asyncio.timeout(timeout):
                while self._active:
                    self._idle.clear()
                    await self._idle.wait()
            return True
        except TimeoutError:
            return False

    @property
    def accepting(self) -> bool:
        return self._accepting

    # -- submission --------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, *, interest: str, client_id: str | None = None,
                     owner: str | None = None, subscribe: bool = True, requester: str | None = None) -> Submission:
        """``Engine.submit``. Submits of one job id are serialized; different ids run freely."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down and accepts no new jobs")
        job_id = scoped_job_id(spec, owner)
        async with self._submit_locks.hold(job_id):
            return await self._submit_locked(job_id, spec, interest, client_id, owner, subscribe, requester)

    async def _submit_locked(self, job_id, spec, interest, client_id, owner, subscribe, requester) -> Submission:
        active = self._active.get(job_id)
        if active is not None:
            active.interests.add(interest)
            # Its last interest may have left a moment ago (a client dropped, and this is its
            # retry): whoever still wants the image keeps the job alive.
            active.keep_alive()
            await self._link(active, client_id)
            return Submission(active.record, False, self._subscribe(active.record, active) if subscribe else None)
        existing = await self._lookup(job_id)
        if existing is not None and existing.upscale_missing and self._runner.can_upscale:
            return await self._retry_upscale(existing, interest, client_id, subscribe, requester)
        if existing is not None and existing.status is JobStatus.COMPLETED:
            if client_id:
                await self._link_client(client_id, job_id)
            return Submission(existing, False, self._subscribe(existing, None) if subscribe else None)
        await self._admit(interest, requester)
        now = time.time()
        if existing is not None:  # failed or cancelled before: run it again
            record = existing.moved_to(JobStatus.PENDING, error=None, failure=None, result=None, attempt=existing.attempt + 1)
        else:
            record = JobRecord(job_id=job_id, spec=spec, status=JobStatus.PENDING, created_at=now,
                               updated_at=now, owner=owner)
        active = ActiveJob(record=record, interests={interest})
        self._active[job_id] = active  # counted by capacity checks while the record is written
        self._requesters.charge(job_id, requester)
        subscriber = self.hub.subscribe(job_id) if subscribe else None
        try:
            await self.store.put(record)
        except Exception as exc:  # disk full, read-only: refuse the job rather than run it unrecorded
            self._active.pop(job_id, None)
            if subscriber is not None:
                subscriber.close()
            log.error("job %s: not accepted, the job store failed: %s", job_id[:12], exc)
            raise StorageUnavailable("The server cannot record new jobs right now (its disk may be full); "
                                     "retry later.") from None
        await self._link(active, client_id)
        self._enqueue(active)
        log.info("job %s: queued (%s %dx%d, %d steps, n=%d)", job_id[:12], spec.model, spec.width, spec.height, spec.steps, spec.n)
        return Submission(record, True, subscriber)

    async def _retry_upscale(self, completed: JobRecord, interest, client_id, subscribe, requester) -> Submission:
        """A repeat of a request whose upscale failed or was cut short: run the upscale again
        (completed -> generated, a new attempt); the generated image is kept, not generated again."""
        await self._admit(interest, requester)
        retry = completed.upscale_retry()
        try:
            await self.store.put(retry)
        except Exception as exc:  # the completed result stays the answer
            log.error("job %s: upscale not retried, the job store failed: %s", completed.job_id[:12], exc)
            return Submission(completed, False, self._subscribe(completed, None) if subscribe else None)
        record = retry
        active = ActiveJob(record=record, interests={interest})
        self._requesters.charge(record.job_id, requester)
        subscriber = self.hub.subscribe(record.job_id) if subscribe else None
        await self._link(active, client_id)
        self._enqueue(active)
        log.info("job %s: upscale retried (attempt %d)", record.job_id[:12], record.attempt)
        return Submission(record, True, subscriber)

    async def _admit(self, interest: str, requester: str | None) -> None:
        """New work (not a join): free disk, then the queue limits (no await between those and the
        job's registration: concurrent submits cannot both take the last slot)."""
        await self._disk.check()
        check_capacity(self._active, self.config, self._requesters, self.drain, interest, requester)

    async def _link(self, active: ActiveJob, client_id: str | None) -> None:
        if client_id and client_id not in active.client_ids:
            active.client_ids.add(client_id)
            await self._link_client(client_id, active.job_id)

    async def _link_client(self, client_id: str, job_id: str) -> None:
        """Best effort: the link only feeds ``client_jobs`` listings; a full disk must not fail
        (or, half-way through a submit, strand) the job itself."""
        try:
            await self.store.link_client(client_id, job_id, time.time())
        except Exception as exc:
            log.error("job %s: could not link client %s: %s", job_id[:12], client_id, exc)

    def _subscribe(self, record: JobRecord, active: ActiveJob | None) -> Subscriber:
        """A subscriber that first gets every status the job has had in this run (so concurrent
        duplicate submitters all see the same sequence), then its latest preview, then live events.
        For a job not running in this process: just its current status."""
        subscriber = self.hub.subscribe(record.job_id)
        history = active.status_history if active is not None else []
        for event in history or [JobEvent(EventKind.STATUS, record.job_id, record=record)]:
            subscriber.put(event)
        if active is not None and active.latest_preview is not None:
            subscriber.put(active.latest_preview)
        return subscriber

    def subscribe(self, record: JobRecord) -> Subscriber:
        return self._subscribe(record, self._active.get(record.job_id))

    async def subscribe_from(self, job_id: str, last_event_id: str | None, owner: str | None = None) -> Subscriber:
        """One process keeps no event log: always from the job's current status (its latest
        preview may repeat one the client saw)."""
        return self.subscribe(await self.get(job_id, owner))

    # -- queries -----------------------------------------------------------------------------

    async def _lookup(self, job_id: str) -> JobRecord | None:
        if job_id in self._active or job_id in self._finished:
            return self._active[job_id].record if job_id in self._active else self._finished.get(job_id)
        record = await self.store.get(job_id)
        if record is not None and record.status.is_terminal:
            self._finished.put(record.job_id, record)
        return record

    async def get(self, job_id: str, owner: str | None = None) -> JobRecord:
        record = await self._lookup(job_id)
        if record is None or (owner is not None and record.owner != owner):
            raise JobNotFound(f"no job with id '{job_id}'", param="job_id")
        return record

    async def client_jobs(self, client_id: str, owner: str | None = None) -> list[JobRecord]:
        records = await self.store.client_jobs(client_id, owner)  # filtered by owner before the limit
        return [self._active[r.job_id].record if r.job_id in self._active else r for r in records]

    def forget(self, job_ids: list[str]) -> None:
        """Drop finished records from the in-memory cache (retention deleted them)."""
        for job_id in job_ids:
            self._finished.pop(job_id, None)

    def is_active(self, job_id: str) -> bool:
        return job_id in self._active

    def queue_position(self, job_id: str) -> int | None:
        """0-based place among pending jobs, or None when the job is not pending."""
        active = self._active.get(job_id)
        if active is None or active.record.status is not JobStatus.PENDING:
            return None
        return sum(1 for a in self._active.values()
                   if a.record.status is JobStatus.PENDING and a.enqueued_seq < active.enqueued_seq)

    def cancel_requested(self, job_id: str) -> bool:
        """True while an unfinished job has been asked to stop at its next step boundary."""
        active = self._active.get(job_id)
        return active is not None and active.cancel_flag.is_set()

    def health(self) -> dict:
        return {"backend": "sqlite", "active_jobs": len(self._active)}

    def counts(self) -> dict[str, int]:
        return dict(Counter(active.record.status.value for active in self._active.values()))

    # -- cancellation ------------------------------------------------------------------------

    async def cancel(self, job_id: str, interest: str, owner: str | None = None) -> tuple[JobRecord, bool]:
        """Withdraw ``interest``; cancel the job if nobody else wants it. Returns (record, cancelled).

        A generated job's cancel stops its upscale within one tile: it completes with its image,
        ``upscale_error`` "upscaling stopped: cancelled". Raises ``JobNotFound``, or
        ``JobNotCancellable`` for a finished job."""
        record = await self.get(job_id, owner)
        active = self._active.get(job_id)
        if active is None or record.status not in STOPPABLE:
            raise JobNotCancellable(f"job is {record.status.value}; only unfinished jobs can be cancelled",
                                    param="job_id")
        active.interests.discard(interest)
        if active.interests:
            return active.record, False
        await self._cancel_now(active)
        return active.record, True

    async def release(self, job_id: str, interest: str) -> None:
        """Like ``cancel`` but silent: used when an HTTP client goes away. A job queued again after
        a restart is not cancelled this way: its original clients may still come back for it."""
        active = self._active.get(job_id)
        if active is None:
            return
        active.interests.discard(interest)
        if not active.interests and not active.recovered and active.record.status in STOPPABLE:
            await self._cancel_now(active)

    async def _cancel_now(self, active: ActiveJob) -> None:
        active.request_cancel(FailureCode.CANCELLED)  # processing: at its next step; generated: next tile
        if active.record.status is JobStatus.PENDING:
            await self.finish(active, JobStatus.CANCELLED, error="cancelled", failure=FailureCode.CANCELLED)
        log.info("job %s: cancel requested", active.job_id[:12])

    # -- JobHost: state changes and step events of the jobs JobRunner runs ----------------------

    async def move(self, active: ActiveJob, status: JobStatus, **changes) -> JobRecord:
        # Assign before awaiting the store so that two racing moves see each other's result.
        previous, active.record = active.record, active.record.moved_to(status, **changes)
        record, stored = active.record, stored_form(previous, active.record)  # a stopped job stays unfinished
        try:
            if stored is not None:
                await self.store.put(stored)
        except Exception as exc:
            # Announce anyway: a job whose state cannot be persisted (disk full) must still reach
            # its terminal state for its waiting clients, and the worker must survive. After a
            # restart the store's older state is recovered as interrupted.
            log.error("job %s: could not persist status %s: %s", record.job_id[:12], status.value, exc)
        event = self._announce(record)
        active.status_history.append(event)
        return record

    async def finish(self, active: ActiveJob, status: JobStatus, **changes) -> JobRecord:
        if status is JobStatus.CANCELLED and active.interests and self._accepting:
            return await self._run_again(active)
        self._active.pop(active.job_id, None)
        if active.started_at:
            self.drain.observe(time.monotonic() - active.started_at)
        record = await self.move(active, status, **changes)
        active.status_history.clear()
        self._finished.put(record.job_id, record)
        self._idle.set()
        report_finished(record, self.metrics)
        return record

    async def _run_again(self, active: ActiveJob) -> JobRecord:
        """A job stopped for lack of interest just as a new interest joined (its generator had
        already seen the cancel flag): start a fresh attempt instead of cancelling it."""
        active.cancel_flag.clear()
        active.cancel_cause = FailureCode.CANCELLED
        active.latest_preview = None
        record = await self.move(active, JobStatus.PENDING, attempt=active.record.attempt + 1, error=None,
                                 failure=None, result=None)
        self._enqueue(active, announced=active.status_history[-1])
        log.info("job %s: wanted again while stopping; runs again (attempt %d)", active.job_id[:12], record.attempt)
        return record

    def publish_step(self, active: ActiveJob, event: JobEvent) -> None:
        self.hub.publish(event)

    def _announce(self, record: JobRecord) -> JobEvent:
        event = JobEvent(EventKind.STATUS, record.job_id, record=record)
        self.hub.publish(event)
        return event

    async def _worker(self) -> None:
        while True:
            job_id = await self._queue.get()
            active = self._active.get(job_id)
            if active is None or active.record.status not in (JobStatus.PENDING, JobStatus.GENERATED):
                continue
            try:
                if active.record.status is JobStatus.GENERATED:  # after a restart, or an upscale retry
                    await self._runner.upscale_saved(active)
                else:
                    await self._runner.run(active)
            except Exception:  # the runner handles job errors; this guards the worker itself
                log.exception("job %s: unexpected error in the job runner", job_id[:12])
                if active.job_id in self._active:
                    await self.finish(active, JobStatus.FAILED, error="internal server error",
                                      failure=FailureCode.INTERNAL)
