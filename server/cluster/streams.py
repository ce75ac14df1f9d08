"""Per-node fan-out of per-job event streams.

Each job has a capped stream (``ev:{id}``) that its worker appends to. An API node reads each job
it has subscribers for exactly once, whatever the number of subscribers: one reader task issues a
single ``XREAD BLOCK`` over every watched stream (plus a per-node wake stream, appended to when a
job is added, so the blocked read is restarted with the new key), and hands the events to the
in-process ``EventHub``, whose ``Subscriber`` queues coalesce progress/previews for slow readers.
So a slow client never slows the reader, and a node holds one blocked connection, not one per job.

Vanished jobs: a job whose record is gone (Redis restarted without persistence, or flushed) will
never get another event, so its subscribers would wait forever. After every reconnect, and at
least every ``VERIFY_S`` seconds, the reader checks that each watched job still exists; for one
that does not it publishes a final ``failed`` status saying so (failure ``interrupted``), which
streams turn into their in-band error and WebSocket clients into a failed status.

Positions: a subscriber is attached *after* a stream id (the status event its snapshot came from,
or the client's Last-Event-ID); events at or before it are dropped, events the node already read
past it are replayed from a small in-memory ring, so joining never duplicates nor skips events.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field, replace

from redis.exceptions import ConnectionError as RedisConnectionError, RedisError, TimeoutError as RedisTimeout

from server.cluster.codec import READ_BLOCK_MS, Keys, event_from_entry, id_key
from server.core.events import EventHub, EventKind, JobEvent, Subscriber
from server.core.jobs import JobRecord, JobStatus
from server.core.states import FailureCode

log = logging.getLogger(__name__)
RING = 64  # events kept per watched job for subscribers that join behind the reader
VERIFY_S = 5.0  # longest time between checks that the watched jobs still exist
VANISHED = ("the job no longer exists: the job store lost it (was Redis restarted without persistence?); "
            "submit the request again")


class PositionedSubscriber(Subscriber):
    """A ``Subscriber`` that ignores events at or before ``after`` (already covered by its snapshot)."""

    after: tuple[int, int] = (0, 0)

    def put(self, event: JobEvent) -> None:
        if event.event_id is not None and id_key(event.event_id) <= self.after:
            return
        super().put(event)


@dataclass
class Feed:
    base: JobRecord  # the job's unchanging part (spec, owner, created_at) for decoding status events
    cursor: str  # last stream id read
    ring: deque = field(default_factory=lambda: deque(maxlen=RING))


class FeedHub(EventHub):
    """An ``EventHub`` whose subscribers are fed from Redis; a job is watched while it has any."""

    def __init__(self, reader: "FeedReader", max_pending: int = 32):
        super().__init__(max_pending)
        self._reader = reader

    def subscribe(self, job_id: str) -> PositionedSubscriber:
        subscriber = PositionedSubscriber(self, job_id, self._max_pending)
        self._subscribers.setdefault(job_id, set()).add(subscriber)
        return subscriber

    def detach(self, subscriber: Subscriber) -> None:
        super().detach(subscriber)
        if not self._subscribers.get(subscriber.job_id):
            self._reader.unwatch(subscriber.job_id)


class FeedReader:
    def __init__(self, client, keys: Keys, node_id: str, max_pending: int = 32):
        self._redis = client  # a client whose only connection is this reader's
        self._keys = keys
        self._node_id = node_id
        self.hub = FeedHub(self, max_pending)
        self._feeds: dict[str, Feed] = {}
        self._wake_cursor = "0-0"
        self._task: asyncio.Task | None = None
        self._pool_client = None  # for the wake XADD (must not use the blocked connection)

    async def start(self, pool_client) -> None:
        self._pool_client = pool_client
        self._wake_cursor = await pool_client.xadd(self._keys.wake(self._node_id), {"w": "1"}, maxlen=8, approximate=False)
        await pool_client.expire(self._keys.wake(self._node_id), 86_400)
        self._task = asyncio.create_task(self._run(), name="feed-reader")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._redis.aclose()

    def attach(self, subscriber: PositionedSubscriber, base: JobRecord, after: str) -> None:
        """Start delivering ``base.job_id``'s events after stream id ``after`` to ``subscriber``.
        Synchronous (no await): the reader cannot deliver in between, so nothing is lost or doubled."""
        feed = self._feeds.get(base.job_id)
        if feed is None:
            self._feeds[base.job_id] = Feed(base=base, cursor=after)
            subscriber.after = id_key(after)
            self._wake()
            return
        start = id_key(after)
        for event in feed.ring:
            if id_key(event.event_id) > start:
                subscriber.put(event)
        subscriber.after = max(start, id_key(feed.cursor))

    def unwatch(self, job_id: str) -> None:
        self._feeds.pop(job_id, None)

    def watched(self) -> int:
        return len(self._feeds)

    def _wake(self) -> None:
        task = asyncio.ensure_future(self._pool_client.xadd(self._keys.wake(self._node_id), {"w": "1"},
                                                            maxlen=8, approximate=False))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # a lost wake only delays

    async def _run(self) -> None:
        backoff = 0.05
        verified = time.monotonic()
        while True:
            streams = {self._keys.wake(self._node_id): self._wake_cursor}
            streams.update({self._keys.events(job_id): feed.cursor for job_id, feed in self._feeds.items()})
            try:
                if backoff > 0.05 or time.monotonic() - verified >= VERIFY_S:
                    await self._end_vanished()
                    verified = time.monotonic()
                reply = await self._redis.xread(streams, count=256, block=READ_BLOCK_MS)
                backoff = 0.05
            except (RedisConnectionError, RedisTimeout, OSError) as exc:
                log.warning("event reader: redis unavailable (%s); retrying", exc)
                await asyncio.sleep(backoff)
                backoff = min(2.0, backoff * 2)
                continue
            except RedisError:
                log.exception("event reader: unexpected redis error")
                await asyncio.sleep(1.0)
                continue
            for key, entries in reply or []:
                self._deliver(key, entries)

    async def _end_vanished(self) -> None:
        """Publish a final ``failed`` status for each watched job whose record no longer exists."""
        job_ids = list(self._feeds)
        if not job_ids:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(self._keys.job(job_id))
            found = await pipe.execute()
        for job_id, exists in zip(job_ids, found):
            feed = self._feeds.get(job_id)
            if exists or feed is None:
                continue
            log.warning("job %s: its record is gone from Redis; ending its streams", job_id[:12])
            del self._feeds[job_id]  # a later submit of the same id is watched anew
            record = replace(feed.base, status=JobStatus.FAILED, updated_at=time.time(), result=None,
                             error=VANISHED, failure=FailureCode.INTERRUPTED)
            self.hub.publish(JobEvent(EventKind.STATUS, job_id, record=record))

    def _deliver(self, key: str, entries: list) -> None:
        if key == self._keys.wake(self._node_id):
            self._wake_cursor = entries[-1][0]
            return
        job_id = key[len(self._keys.events("")):]
        feed = self._feeds.get(job_id)
        if feed is None:
            return  # unwatched while the read was under way
        for entry_id, fields in entries:
            feed.cursor = entry_id
            try:
                event = event_from_entry(feed.base, entry_id, fields)
            except (KeyError, ValueError, TypeError):
                log.warning("job %s: skipping malformed event %s", job_id[:12], entry_id)
                continue
            feed.ring.append(event)
            self.hub.publish(event)
            if event.is_terminal:
                self._feeds.pop(job_id, None)  # a later run of the same id is watched anew
                return
