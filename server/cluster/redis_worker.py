"""The worker role: takes jobs from the Redis queue and runs them with the unchanged ``JobRunner``.

``RedisWorker`` is the ``JobHost`` (server.core.ports) of its runner:

- ``move``/``finish`` run the fenced MOVE script: a worker whose job was reclaimed, cancelled
  or finished elsewhere changes nothing and abandons the job (its cancel flag is set).
- ``publish_step`` (called on the loop for each step event) feeds the claim's ``StepBuffer``, which
  keeps only the newest progress and preview; a flusher task writes them with the STEP script, which
  also heartbeats the queue entry and returns the cancel flag. The GPU thread never waits on Redis.
- The heartbeat task waits between beats on the job's cancel wake-up list (BLPOP ``cx:{id}``, on
  the blocking connection, idle while a job runs): a cancel (CANCEL pushes there) is read through
  STEP at once, also while upscaling, when no step events flow; the upscale stops at its next tile.

A claimed ``generated`` job (an upscale retry, or a dead worker's job that was upscaling) runs
``JobRunner.upscale_saved``: its saved image is read back and upscaled, never generated again. One
whose cancel was requested, or whose upscale took down ``max_deliveries`` workers, completes with that
image and an ``upscale_error``, running nothing.

Delivery: XAUTOCLAIM (entries idle past ``reclaim_idle_ms``: a dead or frozen worker's) first, then
XREADGROUP. Heartbeats (XCLAIM JUSTID) happen only while the GPU makes progress (a step event since
the last beat), or while the job is past generation (saving/upscaling), so a hung GPU is reclaimed.
One job at a time per worker process: a claimed job always has the GPU, so its idle time measures
its progress, not its wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace

from redis.exceptions import ConnectionError as RedisConnectionError, RedisError, ResponseError, TimeoutError as RedisTimeout

from server.cluster import scripts
from server.cluster.codec import GROUP, READ_BLOCK_MS, Keys, client_name, connect, pairs, reader_client, record_from_hash, result_json, step_payload
from server.cluster.redis_engine import ClusterOptions, ensure_group
from server.core.events import EventKind, JobEvent
from server.core.jobs import JobRecord
from server.core.ports import ActiveJob, EngineConfig
from server.core.runner import JobRunner, report_finished, upscale_stopped
from server.core.states import FailureCode, JobStatus

log = logging.getLogger(__name__)
RETRY_FOR_S = 30.0  # a state change is retried this long across a Redis outage
_CLAIMED = {"run": "running", "upscale": "upscaling its saved image", "stop_upscale": "completing",
            "exhausted": "completing"}  # for the log


def upscale_exhausted(workers: int) -> str:
    """The ``upscale_error`` of a generated job whose upscale stopped ``workers`` workers (as CLAIM's
    "the job stopped N workers" for a job that is failed instead)."""
    return f"upscaling stopped {workers} worker{'s' if workers != 1 else ''}; it is not retried"


class StepBuffer:
    """A claimed job's step events on their way to Redis: bounded and coalescing (newest progress +
    newest preview)."""

    def __init__(self) -> None:
        self.progress: JobEvent | None = None
        self.preview: JobEvent | None = None
        self.ready = asyncio.Event()
        self.steps = 0  # step events seen: the heartbeat's evidence of GPU progress

    def publish(self, event: JobEvent) -> None:
        if event.kind is EventKind.PROGRESS:
            self.progress = event
            self.steps += 1
        elif event.kind is EventKind.PREVIEW:
            self.preview = event
        else:
            return
        self.ready.set()

    def take(self) -> list[JobEvent]:
        events = sorted((e for e in (self.progress, self.preview) if e is not None), key=lambda e: e.timestamp)
        self.progress = self.preview = None
        self.ready.clear()
        return events


class _Claim:
    def __init__(self, active: ActiveJob, fence: str, msg: str):
        self.active, self.fence, self.msg = active, fence, msg
        self.fenced = False
        self.ended = False  # the job's run is over: the heartbeat stops at its next wake-up
        self.last_beat = time.monotonic()
        self.beat_steps = 0
        self.buffer = StepBuffer()


class RedisWorker:
    def __init__(self, config: EngineConfig, options: ClusterOptions, generator, upscaler, metrics=None):
        self.config = config
        self.options = options
        self.metrics = metrics
        self.keys = Keys(options.prefix)
        name = client_name("worker", options.node_id)
        self.redis = connect(options.url, 8, name=name)
        self._blocking = reader_client(options.url, name)
        self._claim_script = self.redis.register_script(scripts.CLAIM)
        self._move_script = self.redis.register_script(scripts.MOVE)
        self._step_script = self.redis.register_script(scripts.STEP)
        self._runner = JobRunner(self, generator, upscaler)
        self._claim: _Claim | None = None
        self._flush_lock = asyncio.Lock()
        self._accepting = False
        self._task: asyncio.Task | None = None
        self._job_done = asyncio.Event()
        self.completed = 0

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def node_id(self) -> str:
        return self.options.node_id

    @property
    def current_job_id(self) -> str | None:
        """The job this worker runs now, if any (for /health)."""
        return self._claim.active.job_id if self._claim is not None else None

    def counts(self) -> dict[str, int]:
        return {"processing": 1} if self._claim is not None else {}

    def queue_position(self, job_id: str) -> int | None:
        return None

    async def start(self) -> None:
        self._runner.bind_loop(asyncio.get_running_loop())
        await self._join()
        self._accepting = True
        self._task = asyncio.create_task(self._serve(), name="cluster-worker")
        log.info("worker %s: taking jobs from %s", self.node_id, self.keys.queue)

    async def stop(self, grace_s: float = 30.0) -> None:
        """Take no more jobs; let the current one finish within ``grace_s``. A job still running
        then is left in the queue's pending list, so another worker takes it over."""
        if self._task is None:
            return
        self._accepting = False
        if self._claim is not None:
            try:
                async with asyncio.timeout(grace_s):
                    while self._claim is not None:
                        self._job_done.clear()
                        await self._job_done.wait()
            except TimeoutError:
                log.warning("job %s: still running at shutdown; left for another worker", self.current_job_id[:12])
        left = self._claim
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        if left is not None:
            # Nothing here reports on the job any more; its GPU thread must not keep this process
            # alive until a long upscale ends: it stops at its next step or tile.
            left.active.request_cancel(FailureCode.SHUTDOWN)
        self._task = None
        self._runner.shutdown()
        await self._blocking.aclose()
        await self.redis.aclose()

    # -- taking jobs -------------------------------------------------------------------------

    async def _serve(self) -> None:
        backoff = 0.05
        while self._accepting:
            try:
                taken = await self._take()
                backoff = 0.05
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                log.warning("worker %s: the consumer group is gone (Redis restarted?); recreating it", self.node_id)
                await self._retry(self._join)
                continue
            except (RedisConnectionError, RedisTimeout, OSError) as exc:
                log.warning("worker %s: redis unavailable (%s); retrying", self.node_id, exc)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            if taken is not None and self._accepting:
                await self._run(*taken)

    async def _join(self) -> None:
        """Make the queue's consumer group unless it exists; with an upscaler, announce that the
        cluster can upscale (the key ``upscaler`` SUBMIT reads before retrying a missing upscale).
        Never cleared: a worker leaving cannot know whether others upscale."""
        await ensure_group(self.redis, self.keys)
        if self._runner.can_upscale:
            await self.redis.set(self.keys.upscaler, "1")

    async def _take(self) -> tuple[str, str] | None:
        """(queue entry id, job id): a dead worker's entry first, else a new one."""
        _, claimed, *_ = await self.redis.xautoclaim(self.keys.queue, GROUP, self.node_id,
                                                     min_idle_time=self.options.reclaim_idle_ms, start_id="0-0", count=1)
        entries = [entry for entry in claimed if entry and entry[1]]
        if entries:
            log.info("worker %s: took over queue entry %s", self.node_id, entries[0][0])
        else:
            block = max(100, min(1000, self.options.reclaim_idle_ms // 2))
            reply = await self._blocking.xreadgroup(GROUP, self.node_id, {self.keys.queue: ">"}, count=1, block=block)
            entries = [entry for _, items in reply or [] for entry in items if entry and entry[1]]
        if not entries:
            return None
        msg, fields = entries[0]
        return msg, fields.get("id", "")

    async def _run(self, msg: str, job_id: str) -> None:
        args = [self.options.prefix, GROUP, job_id, msg, self.node_id, self.options.max_deliveries,
                repr(time.time()), self.options.result_ttl_s, self.options.event_maxlen]
        code, flat = await self._retry(self._claim_script, args=args)
        if code not in _CLAIMED:
            log.info("job %s: queue entry %s not run (%s)", job_id[:12], msg, code)
            return
        fields = pairs(flat)
        claim = _Claim(ActiveJob(record=record_from_hash(job_id, fields)), fields["fence"], msg)
        self._claim = claim
        log.info("job %s: %s on %s (delivery %s)", job_id[:12], _CLAIMED[code], self.node_id, fields.get("deliveries"))
        helpers = [asyncio.create_task(self._flusher(claim)), asyncio.create_task(self._heartbeat(claim))]
        try:
            if code == "run":
                await self._runner.run(claim.active)
            elif code == "upscale":  # its image is saved: never generated again
                await self._runner.upscale_saved(claim.active)
            elif code == "stop_upscale":
                await self._complete_saved(claim.active, upscale_stopped(FailureCode.CANCELLED))
            else:  # exhausted: every earlier delivery died in the upscale
                await self._complete_saved(claim.active, upscale_exhausted(int(fields["deliveries"]) - 1))
        except Exception:  # the runner handles job errors; this guards the worker itself
            log.exception("job %s: unexpected error in the job runner", job_id[:12])
            if not claim.active.record.status.is_terminal:
                await self.finish(claim.active, JobStatus.FAILED, error="internal server error",
                                  failure=FailureCode.INTERNAL)
        finally:
            await self._end_helpers(claim, *helpers)
            self._claim = None
            self._job_done.set()

    async def _end_helpers(self, claim: _Claim, flusher: asyncio.Task, heartbeat: asyncio.Task) -> None:
        """Stop the claim's flusher and heartbeat. The heartbeat is woken, not cancelled: a
        cancelled blocking read can leave redis-py's connection hanging or swallow the cancel
        (redis/redis-py#2028, #2579), which hung a worker's stop (CI, 1 run in ~30)."""
        claim.ended = True
        flusher.cancel()
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                key = self.keys.cancel_wake(claim.active.job_id)
                await pipe.rpush(key, "end").expire(key, self.options.result_ttl_s).execute()
        except RedisError:
            pass  # Redis away: the heartbeat's read ends at its own timeout
        _, pending = await asyncio.wait({heartbeat}, timeout=READ_BLOCK_MS / 1000 + 1)
        for task in pending:  # last resort; with ``ended`` set it exits after its read anyway
            task.cancel()
        await asyncio.gather(flusher, return_exceptions=True)

    async def _complete_saved(self, active: ActiveJob, upscale_error: str) -> None:
        """Complete a generated job with its saved image and ``upscale_error``, running nothing: one
        taken over after its cancel (CLAIM ``stop_upscale``: its worker died before stopping the
        upscale), or one whose upscale crashed ``max_deliveries`` workers (CLAIM ``exhausted``:
        ``states.RECOVERY_EXHAUSTED``). Single node's outcomes for the same cases."""
        result = replace(active.record.result, upscale_error=upscale_error)
        await self.finish(active, JobStatus.COMPLETED, result=result)

    # -- JobHost: what JobRunner drives -------------------------------------------------------

    async def move(self, active: ActiveJob, status: JobStatus, **changes) -> JobRecord:
        active.record = active.record.moved_to(status, **changes)
        record, claim = active.record, self._claim
        if claim is None or claim.active is not active or claim.fenced:
            return record
        await self._flush(claim)  # step events go ahead of the status that follows them
        args = [self.options.prefix, GROUP, active.job_id, self.node_id, claim.fence, status.value,
                repr(record.updated_at), result_json(record.result), record.error or "",
                "1" if status.is_terminal else "0", self.options.result_ttl_s, self.options.event_maxlen,
                record.failure.value if record.failure else ""]
        code, flag = await self._retry(self._move_script, args=args)
        if code == "fenced":
            self._fence_out(claim, f"at {status.value}: the job is {flag or 'gone'}")
        elif code == "requeued":  # wanted again while it stopped: queued as a new attempt, not ours now
            claim.fenced = True
            log.info("job %s: wanted again while stopping; queued again", active.job_id[:12])
        elif flag == "1":
            active.cancel_flag.set()
        return record

    async def finish(self, active: ActiveJob, status: JobStatus, **changes) -> JobRecord:
        record = await self.move(active, status, **changes)
        claim = self._claim
        if claim is not None and not claim.fenced:
            self.completed += status is JobStatus.COMPLETED
            report_finished(record, self.metrics)
        return record

    def publish_step(self, active: ActiveJob, event: JobEvent) -> None:
        claim = self._claim
        if claim is not None and claim.active is active:
            claim.buffer.publish(event)

    def _fence_out(self, claim: _Claim, why: str) -> None:
        claim.fenced = True
        claim.active.request_cancel(FailureCode.WORKER_LOST)  # a frozen worker that woke up stops at its next step
        log.warning("job %s: fenced out on %s (%s); dropping it", claim.active.job_id[:12], self.node_id, why)

    # -- step events and heartbeat -----------------------------------------------------------

    async def _flusher(self, claim: _Claim) -> None:
        buffer = claim.buffer
        while not claim.fenced:
            await buffer.ready.wait()
            await self._flush(claim)

    async def _flush(self, claim: _Claim, beat: bool = False, poll: bool = False) -> None:
        """Write the buffered step events (with a heartbeat when ``beat`` or due); ``poll``: call
        STEP even with nothing to write, to read the cancel flag."""
        async with self._flush_lock:
            events = claim.buffer.take()
            progressed = claim.buffer.steps != claim.beat_steps
            due = time.monotonic() - claim.last_beat > self.options.reclaim_idle_ms / 4000
            beat = beat or (progressed and due)
            if (not events and not beat and not poll) or claim.fenced:
                return
            args = [self.options.prefix, GROUP, claim.active.job_id, self.node_id, claim.fence, claim.msg,
                    self.options.event_maxlen, "1" if beat else "0"]
            for event in events:
                args.extend(step_payload(event))
            try:
                answer = await self._step_script(args=args)
            except RedisError as exc:  # step events are best effort; the next flush carries newer ones
                log.warning("job %s: step events not written: %s", claim.active.job_id[:12], exc)
                return
            if beat:
                claim.last_beat, claim.beat_steps = time.monotonic(), claim.buffer.steps
            if answer == 1:
                claim.active.cancel_flag.set()
            elif answer == 0:  # a new interest withdrew an earlier cancel request (SUBMIT)
                claim.active.keep_alive()
            elif answer == -1:
                self._fence_out(claim, "at a step")

    async def _heartbeat(self, claim: _Claim) -> None:
        """Beat between step events: when the GPU made progress since the last beat, or while the
        job is past generation (saving, upscaling: bounded work off the denoising loop). Between
        beats, wait for a cancel wake-up; on one, read the flag through STEP at once."""
        period = self.options.reclaim_idle_ms / 4000
        while not claim.fenced and not claim.ended:
            due = time.monotonic() + period
            woken = False
            while not woken and not claim.ended and time.monotonic() < due:
                woken = await self._cancel_woken(claim, due - time.monotonic())
            if claim.ended:
                return
            progressed = claim.buffer.steps != claim.beat_steps
            beat = progressed or claim.active.record.status is JobStatus.GENERATED
            if beat or woken:
                await self._flush(claim, beat=beat, poll=woken)

    async def _cancel_woken(self, claim: _Claim, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for CANCEL's wake-up of this job: True when it came."""
        # BLPOP's timeout 0 means forever, and a blocked read must end within the reader's socket timeout.
        timeout_s = min(max(timeout_s, 0.01), READ_BLOCK_MS / 1000)
        key = self.keys.cancel_wake(claim.active.job_id)
        try:
            return await self._blocking.blpop([key], timeout=timeout_s) is not None
        except RedisError as exc:  # Redis away: wait as before; the next step or beat reads the flag
            log.debug("job %s: cancel wake-up not read: %s", claim.active.job_id[:12], exc)
            await asyncio.sleep(timeout_s)
            return False

    async def _retry(self, fn, *args, **kwargs):
        """Run a Redis call, retrying across a short outage (connection errors only)."""
        deadline = time.monotonic() + RETRY_FOR_S
        delay = 0.05
        while True:
            try:
                return await fn(*args, **kwargs)
            except (RedisConnectionError, RedisTimeout, OSError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
