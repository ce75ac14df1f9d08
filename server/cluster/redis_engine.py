"""The API-role ``Engine`` (server.core.ports) over Redis/Valkey, so the protocol adapters run
unchanged, with no GPU and no job state of its own.

Queue: stream ``queue`` + consumer group ``workers``. Records: hash ``job:{id}`` keyed by the job
id (the spec hash). Events: capped stream ``ev:{id}`` per job, latest preview in ``pv:{id}``.
Interests: ``int:{id}`` (who wants the job) and ``ia:{interest}`` (unfinished jobs of a client, for
the per-client limit). Client job lists: sorted set ``cl:{client}`` (``cl:{owner}|{client}`` with keys). Pending order: sorted set
``pending``; jobs on a worker: set ``running``.

``queue_position`` and ``counts`` are synchronous in the engine interface, so they read a snapshot
refreshed every ``STATS_INTERVAL_S`` (it may be that much behind).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from redis.exceptions import RedisError, ResponseError

from server.cluster import scripts
from server.core.fairness import DrainEstimate, queue_full, requester_full
from server.cluster.codec import GROUP, Keys, client_list_name, client_name, connect, default_node_id, pairs, preview_event, reader_client, record_from_hash, result_json
from server.cluster.streams import FeedReader
from server.core.disk import DiskSpace
from server.core.lru import LruCache
from server.core.ports import EngineConfig, Submission
from server.core.spec import scoped_job_id
from server.core.errors import JobNotCancellable, JobNotFound, QueueFull, ShuttingDown
from server.core.events import EventKind, JobEvent, Subscriber
from server.core.jobs import JobRecord
from server.core.spec import JobSpec

log = logging.getLogger(__name__)
STATS_INTERVAL_S = 0.25


@dataclass(frozen=True)
class ClusterOptions:
    url: str
    node_id: str = ""
    prefix: str = "t2i:"
    reclaim_idle_ms: int = 60_000
    max_deliveries: int = 3
    result_ttl_s: int = 86_400
    max_connections: int = 64
    event_maxlen: int = 256

    @classmethod
    def from_settings(cls, settings) -> "ClusterOptions":
        return cls(url=settings.backend, node_id=settings.node_id or default_node_id(), prefix=settings.key_prefix,
                   reclaim_idle_ms=settings.reclaim_idle_ms, max_deliveries=settings.max_deliveries,
                   result_ttl_s=settings.result_ttl_s, max_connections=settings.redis_max_connections,
                   event_maxlen=settings.event_stream_maxlen)


async def ensure_group(client, keys: Keys) -> None:
    """Create the queue stream and its consumer group unless they exist (after a Redis restart
    without persistence they do not: every role recreates them)."""
    try:
        await client.xgroup_create(keys.queue, GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class RedisEngine:
    def __init__(self, config: EngineConfig, options: ClusterOptions, metrics=None):
        self.config = config
        self.options = options
        self.metrics = metrics
        self.keys = Keys(options.prefix)
        name = client_name("api", options.node_id)
        self.redis = connect(options.url, options.max_connections, name=name)
        self._reader = FeedReader(reader_client(options.url, name), self.keys, options.node_id)
        self.hub = self._reader.hub
        self._submit = self.redis.register_script(scripts.SUBMIT)
        self._cancel = self.redis.register_script(scripts.CANCEL)
        # The shared output directory every node mounts: new jobs wait while its disk is nearly full.
        self._disk = DiskSpace(config.output_dir, config.min_free_disk_bytes)
        self._accepting = False
        self._pending: dict[str, int] = {}  # stats snapshot: job id -> place in the queue
        self._running = 0
        self.drain = DrainEstimate()  # seconds per job, from the queue's movement (for Retry-After)
        self._stats_task: asyncio.Task | None = None
        self._last_events: LruCache[str, str] = LruCache(10_000)  # job id -> id of its last status event

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await ensure_group(self.redis, self.keys)
        await self._reader.start(self.redis)
        self._stats_task = asyncio.create_task(self._refresh_stats(), name="cluster-stats")
        self._accepting = True
        log.info("api node %s: serving from %s", self.options.node_id, _redacted(self.options.url))

    async def stop(self, grace_s: float = 30.0) -> None:
        """Stop accepting work. Jobs live on in Redis and on the workers: nothing to drain here."""
        if not self._accepting and self._stats_task is None:
            return
        self._accepting = False
        if self._stats_task is not None:
            self._stats_task.cancel()
            await asyncio.gather(self._stats_task, return_exceptions=True)
            self._stats_task = None
        await self._reader.stop()
        await self.redis.aclose()

    @property
    def accepting(self) -> bool:
        return self._accepting

    # -- submission --------------------------------------------------------------------------

    async def submit(self, spec: JobSpec, *, interest: str, client_id: str | None = None,
                     owner: str | None = None, subscribe: bool = True, requester: str | None = None) -> Submission:
        """As ``JobEngine.submit``; dedup, record, enqueue, first event and the client's job list
        happen in one script, so racing identical submits on any nodes make one job. A completed job
        whose upscale is missing runs it again (a second SUBMIT, with the result this one read: the
        script retries only if the job is still that, and a worker announced an upscaler). While the
        shared output directory's disk is nearly full, new work raises ``StorageUnavailable``; the
        script decides what is new, so joins and cached answers are still served."""
        if not self._accepting:
            raise ShuttingDown("the server is shutting down and accepts no new jobs")
        job_id = scoped_job_id(spec, owner)
        no_space = await self._disk.refusal()  # raised only if SUBMIT finds the job is new work
        args = [self.options.prefix, GROUP, job_id, repr(time.time()), _spec_json(spec), owner or "", interest,
                client_list_name(client_id, owner) if client_id else "", self.config.max_queue, self.config.max_queue_per_client, self.options.event_maxlen,
                requester or "", self.options.result_ttl_s, "1" if no_space else ""]
        code, flat, preview, *extra = await self._submit_or_retry_upscale(job_id, args)
        limit = self.config.max_queue_per_client
        if code == "no_space":
            raise no_space
        if code == "full":
            raise queue_full(self.config.max_queue, self.drain.retry_after(0))
        if code == "interest_full":
            raise QueueFull(f"this client already has {limit} unfinished jobs", code="client_queue_full",
                            retry_after_s=self.drain.retry_after(len(self._pending)))
        if code == "requester_full":
            raise requester_full(limit, self.drain.retry_after(int(extra[0])))
        fields = pairs(flat)
        record = record_from_hash(job_id, fields)
        self._last_events.put(job_id, fields.get("last_event", "0-0"))
        if code == "created":
            log.info("job %s: queued (%s %dx%d, %d steps, n=%d)", job_id[:12], spec.model, spec.width, spec.height,
                     spec.steps, spec.n)
        elif code == "upscale":
            log.info("job %s: upscale retried (attempt %d)", job_id[:12], record.attempt)
        subscriber = self._subscribe(record, fields.get("last_event", "0-0"), pairs(preview)) if subscribe else None
        return Submission(record, code in ("created", "upscale"), subscriber)

    async def _submit_or_retry_upscale(self, job_id: str, args: list) -> list:
        """SUBMIT; if it answers a completed job whose upscale is missing, SUBMIT again asking for
        the upscale retry. Lua cannot rewrite the result JSON (seeds), so this side writes it; the
        script compares the result it holds with the one read here, so the decision stays atomic."""
        answer = await self._submit(args=args)
        code, flat = answer[0], answer[1]
        if code != "cached" or not (seen := record_from_hash(job_id, pairs(flat))).upscale_missing:
            return answer
        retry = [*args[:3], repr(time.time()), *args[4:], pairs(flat)["result"],
                 result_json(seen.upscale_retry().result)]
        return await self._submit(args=retry)

    def _subscribe(self, record: JobRecord, after: str, preview: dict[str, str] | None = None) -> Subscriber:
        """First the record's status, then the latest preview, then live events after both."""
        subscriber = self.hub.subscribe(record.job_id)
        subscriber.put(JobEvent(EventKind.STATUS, record.job_id, record=record, event_id=after))
        if record.status.is_terminal:
            return subscriber
        if preview:
            subscriber.put(preview_event(record.job_id, preview["id"], preview["v"], preview["ts"]))
            after = max(after, preview["id"], key=_order)
        self._reader.attach(subscriber, record, after)
        return subscriber

    def subscribe(self, record: JobRecord) -> Subscriber:
        """A subscriber for a record read earlier through this engine (``get``/``submit``)."""
        return self._subscribe(record, self._last_events.get(record.job_id, "0-0"))

    async def subscribe_from(self, job_id: str, last_event_id: str | None, owner: str | None = None) -> Subscriber:
        """Resume a job's events after ``last_event_id`` (an SSE Last-Event-ID seen on any node):
        no snapshot, no duplicates; events trimmed from the capped stream meanwhile are skipped."""
        record = await self.get(job_id, owner)
        last_status = self._last_events.get(job_id, "0-0")
        if last_event_id is None:
            return self._subscribe(record, last_status)
        subscriber = self.hub.subscribe(job_id)
        if record.status.is_terminal and _order(last_event_id) >= _order(last_status):
            # The client saw the end already (or sends an id from nowhere): the final events again,
            # rather than a stream that never ends.
            subscriber.put(JobEvent(EventKind.STATUS, job_id, record=record, event_id=last_status))
            return subscriber
        self._reader.attach(subscriber, record, last_event_id)  # the stream lives as long as the record
        return subscriber

    # -- queries -----------------------------------------------------------------------------

    async def get(self, job_id: str, owner: str | None = None) -> JobRecord:
        fields = await self.redis.hgetall(self.keys.job(job_id))
        if not fields or (owner is not None and fields.get("owner") != owner):
            raise JobNotFound(f"no job with id '{job_id}'", param="job_id")
        self._last_events.put(job_id, fields.get("last_event", "0-0"))
        return record_from_hash(job_id, fields)

    async def client_jobs(self, client_id: str, owner: str | None = None) -> list[JobRecord]:
        job_ids = await self.redis.zrevrange(self.keys.client(client_list_name(client_id, owner)), 0, 199)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(self.keys.job(job_id))
            rows = await pipe.execute()
        records = [record_from_hash(job_id, row) for job_id, row in zip(job_ids, rows) if row]
        return [r for r in records if owner is None or r.owner == owner]

    def queue_position(self, job_id: str) -> int | None:
        return self._pending.get(job_id)

    def health(self) -> dict:
        return {"backend": "redis", "node_id": self.options.node_id}

    def counts(self) -> dict[str, int]:
        counts = {"pending": len(self._pending)} if self._pending else {}
        if self._running:
            counts["processing"] = self._running
        return counts

    async def _refresh_stats(self) -> None:
        while True:
            try:
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.zrange(self.keys.pending, 0, max(0, self.config.max_queue * 4))
                    pipe.scard(self.keys.running)
                    pending, running = await pipe.execute()
                self.drain.observe_queue(self._pending, pending, time.monotonic())
                self._pending = {job_id: place for place, job_id in enumerate(pending)}
                self._running = running
            except RedisError as exc:
                log.debug("stats refresh failed: %s", exc)
            await asyncio.sleep(STATS_INTERVAL_S)

    # -- cancellation ------------------------------------------------------------------------

    async def cancel(self, job_id: str, interest: str, owner: str | None = None) -> tuple[JobRecord, bool]:
        """As ``JobEngine.cancel``, from any node: a pending job ends at once; a running one is
        flagged and its worker, woken at once, stops at its next step; a processing job whose
        worker looks dead (no progress for the reclaim idle time) ends at once and is never taken
        over. A generated job's upscale stops at its next tile and the job completes with its image,
        ``upscale_error`` "upscaling stopped: cancelled" (its worker dead: when the job is reclaimed).
        Raises ``JobNotFound``, or ``JobNotCancellable`` for a finished job."""
        await self.get(job_id, owner)
        code, flat = await self._run_cancel(job_id, interest)
        if code == "missing":
            raise JobNotFound(f"no job with id '{job_id}'", param="job_id")
        record = record_from_hash(job_id, pairs(flat))
        if code == "not_cancellable":
            raise JobNotCancellable(f"job is {record.status.value}; only unfinished jobs can be cancelled",
                                    param="job_id")
        if code != "kept":
            log.info("job %s: cancel requested (%s)", job_id[:12], code)
        return record, code != "kept"

    async def release(self, job_id: str, interest: str) -> None:
        """Like ``cancel`` but silent: used when an HTTP client goes away."""
        try:
            await self._run_cancel(job_id, interest)
        except RedisError as exc:
            log.warning("job %s: could not release interest: %s", job_id[:12], exc)

    async def _run_cancel(self, job_id: str, interest: str) -> tuple[str, list]:
        args = [self.options.prefix, GROUP, job_id, interest, repr(time.time()), self.options.result_ttl_s,
                self.options.event_maxlen, self.options.reclaim_idle_ms]
        code, flat = await self._cancel(args=args)
        return code, flat



def _spec_json(spec: JobSpec) -> str:
    import json

    return json.dumps(spec.to_dict(), sort_keys=True)


def _order(entry_id: str) -> tuple[int, int]:
    from server.cluster.codec import id_key

    return id_key(entry_id)


def _redacted(url: str) -> str:
    """The URL without a password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"
