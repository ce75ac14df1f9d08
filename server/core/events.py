"""Job events and their fan-out to subscribers.

Each subscriber owns a bounded queue. Status events (which carry results and errors) are never
dropped; progress and preview events are coalescable: when a slow subscriber has ``max_pending``
of one kind waiting, the oldest of that kind is dropped, so the GPU never waits for a reader and a
reader's memory stays bounded. All methods run on the event loop thread; the GPU thread reaches
them through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from server.core.jobs import JobRecord, Progress


class EventKind(str, Enum):
    STATUS = "status"  # carries a JobRecord snapshot: never dropped
    PROGRESS = "progress"  # coalescable
    PREVIEW = "preview"  # coalescable


@dataclass(frozen=True)
class PreviewImage:
    image_index: int
    step: int
    total_steps: int
    png_b64: str
    width: int
    height: int
    # When the step callback produced it, for latency measurement (time.time()).
    produced_at: float = 0.0


@dataclass(frozen=True)
class JobEvent:
    kind: EventKind
    job_id: str
    record: JobRecord | None = None
    progress: Progress | None = None
    preview: PreviewImage | None = None
    timestamp: float = field(default_factory=time.time)
    # The event's id in a shared event log (the Redis backend's per-job stream), else None: lets a
    # client that reconnects elsewhere resume after the last event it saw (Last-Event-ID).
    event_id: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.kind is EventKind.STATUS and self.record is not None and self.record.status.is_terminal


class Subscriber:
    """One reader's queue of one job's events. Iterate it; ``close`` detaches it."""

    def __init__(self, hub: "EventHub", job_id: str, max_pending: int = 32):
        self._hub = hub
        self.job_id = job_id
        self._max_pending = max_pending
        self._items: deque[JobEvent] = deque()
        self._ready = asyncio.Event()
        self.closed = False
        self.dropped = 0

    def put(self, event: JobEvent) -> None:
        if self.closed:
            return
        if event.kind is not EventKind.STATUS:
            same_kind = [item for item in self._items if item.kind is event.kind]
            if len(same_kind) >= self._max_pending:
                self._items.remove(same_kind[0])
                self.dropped += 1
        self._items.append(event)
        self._ready.set()

    async def get(self, timeout: float | None = None) -> JobEvent:
        """The next event; raises ``TimeoutError`` after ``timeout`` seconds without one."""
        while not self._items:
            self._ready.clear()
            await asyncio.wait_for(self._ready.wait(), timeout)
        return self._items.popleft()

    def pending(self) -> int:
        return len(self._items)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._hub.detach(self)

    def __aiter__(self) -> "Subscriber":
        return self

    async def __anext__(self) -> JobEvent:
        return await self.get()


class EventHub:
    """In-process fan-out of job events: the single-node implementation of the event interface."""

    def __init__(self, max_pending: int = 32):
        self._max_pending = max_pending
        self._subscribers: dict[str, set[Subscriber]] = {}

    def subscribe(self, job_id: str) -> Subscriber:
        subscriber = Subscriber(self, job_id, self._max_pending)
        self._subscribers.setdefault(job_id, set()).add(subscriber)
        return subscriber

    def detach(self, subscriber: Subscriber) -> None:
        subscribers = self._subscribers.get(subscriber.job_id)
        if subscribers is not None:
            subscribers.discard(subscriber)
            if not subscribers:
                del self._subscribers[subscriber.job_id]

    def publish(self, event: JobEvent) -> None:
        for subscriber in list(self._subscribers.get(event.job_id, ())):
            subscriber.put(event)

    def subscriber_count(self, job_id: str | None = None) -> int:
        if job_id is not None:
            return len(self._subscribers.get(job_id, ()))
        return sum(len(subs) for subs in self._subscribers.values())
