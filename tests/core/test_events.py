"""EventHub / Subscriber: fan-out, never-dropped status events, coalescing of progress and
previews for a slow reader, detaching, and timeouts (issue 12)."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.core.events import EventHub, EventKind, JobEvent, PreviewImage
from server.core.jobs import JobRecord, Progress
from server.core.states import JobStatus
from tests.engine_helpers import spec

JOB = spec("events").job_id
OTHER = spec("other").job_id


def status(status: JobStatus, job_id: str = JOB) -> JobEvent:
    record = JobRecord(job_id=job_id, spec=spec("events"), status=status, created_at=1.0, updated_at=1.0)
    return JobEvent(EventKind.STATUS, job_id, record=record)


def progress(step: int, job_id: str = JOB) -> JobEvent:
    return JobEvent(EventKind.PROGRESS, job_id, progress=Progress(0, step, 100, step, 100, 0.1 * step, 0.1))


def preview(step: int) -> JobEvent:
    return JobEvent(EventKind.PREVIEW, JOB, preview=PreviewImage(0, step, 100, "AAAA", 8, 8, time.time()))


def run(body):
    asyncio.run(asyncio.wait_for(body(), 10))


async def drain(subscriber) -> list[JobEvent]:
    events = []
    while subscriber.pending():
        events.append(await subscriber.get(timeout=1))
    return events


def test_fan_out_to_every_subscriber_of_the_job():
    async def body():
        hub = EventHub()
        a, b, c = hub.subscribe(JOB), hub.subscribe(JOB), hub.subscribe(JOB)
        other = hub.subscribe(OTHER)
        assert hub.subscriber_count(JOB) == 3 and hub.subscriber_count(OTHER) == 1 and hub.subscriber_count() == 4
        sent = [status(JobStatus.PENDING), progress(1), status(JobStatus.PROCESSING), preview(1),
                status(JobStatus.COMPLETED)]
        for event in sent:
            hub.publish(event)
        for subscriber in (a, b, c):
            assert await drain(subscriber) == sent, "every subscriber sees every event, in order"
        assert other.pending() == 0
        hub.publish(status(JobStatus.FAILED, OTHER))
        assert (await other.get(timeout=1)).record.status is JobStatus.FAILED
        assert a.pending() == 0
        hub.publish(status(JobStatus.PENDING, "nobody-listens"))  # no subscriber: nothing happens
    run(body)


def test_slow_reader_keeps_every_status_and_the_newest_steps():
    async def body():
        hub = EventHub(max_pending=3)
        slow = hub.subscribe(JOB)
        hub.publish(status(JobStatus.PENDING))
        hub.publish(status(JobStatus.PROCESSING))
        for step in range(1, 11):
            hub.publish(progress(step))
            hub.publish(preview(step))
            if step == 5:
                hub.publish(status(JobStatus.GENERATED))
        hub.publish(status(JobStatus.COMPLETED))
        events = await drain(slow)
        statuses = [e.record.status for e in events if e.kind is EventKind.STATUS]
        assert statuses == [JobStatus.PENDING, JobStatus.PROCESSING, JobStatus.GENERATED, JobStatus.COMPLETED]
        assert [e.progress.step for e in events if e.kind is EventKind.PROGRESS] == [8, 9, 10]
        assert [e.preview.step for e in events if e.kind is EventKind.PREVIEW] == [8, 9, 10]
        assert slow.dropped == 2 * (10 - 3)
        assert events[-1].is_terminal and not events[0].is_terminal
        assert sum(e.is_terminal for e in events) == 1
        # Relative order of what survived is the publish order: the generated status precedes
        # steps 8..10, which were published after it.
        kinds = [(e.kind, e.record.status if e.record else None) for e in events]
        generated_at = kinds.index((EventKind.STATUS, JobStatus.GENERATED))
        assert all(e.kind is EventKind.STATUS for e in events[:generated_at])
    run(body)


def test_status_events_are_never_dropped_even_past_max_pending():
    async def body():
        hub = EventHub(max_pending=2)
        subscriber = hub.subscribe(JOB)
        sent = [status(JobStatus.PENDING if i % 2 else JobStatus.PROCESSING) for i in range(50)]
        for event in sent:
            hub.publish(event)
        assert subscriber.pending() == 50 and subscriber.dropped == 0
        assert await drain(subscriber) == sent
    run(body)


def test_coalescing_is_per_subscriber():
    async def body():
        hub = EventHub(max_pending=2)
        slow, fast = hub.subscribe(JOB), hub.subscribe(JOB)
        seen = []
        for step in range(1, 6):
            hub.publish(progress(step))
            seen.append((await fast.get(timeout=1)).progress.step)
        assert seen == [1, 2, 3, 4, 5] and fast.dropped == 0
        assert [e.progress.step for e in await drain(slow)] == [4, 5] and slow.dropped == 3
    run(body)


def test_close_detaches():
    async def body():
        hub = EventHub()
        a, b = hub.subscribe(JOB), hub.subscribe(JOB)
        a.close()
        assert a.closed and hub.subscriber_count(JOB) == 1 and hub.subscriber_count() == 1
        a.close()  # idempotent
        assert hub.subscriber_count(JOB) == 1
        hub.publish(status(JobStatus.PENDING))
        assert a.pending() == 0 and b.pending() == 1
        a.put(status(JobStatus.PENDING))  # a closed subscriber takes nothing
        assert a.pending() == 0
        b.close()
        assert hub.subscriber_count(JOB) == 0 and hub.subscriber_count() == 0
        hub.publish(status(JobStatus.PROCESSING))  # nobody left: no error
    run(body)


def test_get_times_out():
    async def body():
        hub = EventHub()
        subscriber = hub.subscribe(JOB)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await subscriber.get(timeout=0.05)
        assert time.monotonic() - started < 2
        # Still usable after a timeout.
        hub.publish(progress(1))
        assert (await subscriber.get(timeout=1)).progress.step == 1
    run(body)


def test_get_wakes_on_publish_and_iterates():
    async def body():
        hub = EventHub()
        subscriber = hub.subscribe(JOB)
        waiter = asyncio.create_task(subscriber.get(timeout=5))
        await asyncio.sleep(0)  # let the waiter block
        assert not waiter.done()
        hub.publish(status(JobStatus.PENDING))
        assert (await asyncio.wait_for(waiter, 1)).record.status is JobStatus.PENDING
        hub.publish(progress(1))
        hub.publish(status(JobStatus.CANCELLED))
        got = []
        async for event in subscriber:
            got.append(event.kind)
            if event.is_terminal:
                break
        assert got == [EventKind.PROGRESS, EventKind.STATUS]
    run(body)
