"""A connection's outbox (server/ws/sessions.py): a slow peer gets coalesced progress, every status."""

from __future__ import annotations

import asyncio
import json
import tracemalloc

from server.core.jobs import JobStatus
from server.ws import outbox
from server.ws.outbox import BACKLOG, Connection, ConnState
from tests.conftest import run_async as run

TIMEOUT = 10.0


class StuckSocket:
    """A peer that does not read until ``release`` is set."""

    def __init__(self, expected: int):
        self.sent, self.expected = [], expected
        self.entered, self.release, self.done = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def send_text(self, text):
        self.entered.set()
        await self.release.wait()
        self.sent.append(json.loads(text))
        if len(self.sent) == self.expected:
            self.done.set()


class Record:
    """The fields of a JobRecord that ordering of status messages looks at."""

    def __init__(self, status: str, at: float, job_id: str = "j"):
        self.job_id, self.status, self.attempt, self.updated_at = job_id, JobStatus(status), 1, at


class CountingSocket:
    """A peer that reads everything at once and only counts it."""

    def __init__(self):
        self.count, self.changed = 0, asyncio.Event()

    async def send_text(self, text):
        self.count += 1
        self.changed.set()


def test_slow_connection_coalesces_progress_but_keeps_every_status():
    async def body():
        socket = StuckSocket(expected=12)
        conn = Connection(socket)
        conn.open()
        conn.push({"type": "first"})
        await socket.entered.wait()  # the sender holds "first" and is blocked on the peer
        for step in range(1, 101):
            conn.push_coalesced("progress", "j", {"type": "job_progress", "step": step})
        conn.push_status(Record("generated", 2.0), {"type": "job_status", "status": "generated"})
        conn.push_coalesced("progress", "j", {"type": "job_progress", "step": 101})
        conn.push_status(Record("processing", 1.0), {"type": "job_status", "status": "processing"})  # stale
        conn.push_status(Record("completed", 3.0), {"type": "job_status", "status": "completed"})
        queued = conn.queued()
        socket.release.set()
        await asyncio.wait_for(socket.done.wait(), TIMEOUT)
        await conn.stop()
        return socket.sent, queued, conn.state

    sent, queued, state = run(body())
    assert queued == BACKLOG["progress"] + 3  # 101 progress updates took 9 slots; the stale status none
    steps = [m.get("step", m.get("status")) for m in sent]
    assert steps == [None, 1, 2, 3, 4, 5, 6, 7, 100, "generated", 101, "completed"]
    assert state is ConnState.CLOSED


def test_a_long_lived_connection_remembers_a_bounded_number_of_jobs():
    """A connection that sees 20,000 jobs finish holds no more than one that saw 2,000: what it
    remembers per job (to skip stale statuses) is bounded (issue 16: nothing grows per job)."""
    async def push_jobs(conn, socket, first: int, last: int) -> None:
        for start in range(first, last, 256):  # in batches the outbox (512 messages) can hold
            for i in range(start, min(start + 256, last)):
                conn.push_status(Record("completed", 1.0, f"job-{i:06d}"), {"type": "job_status", "i": i})
            while socket.count < min(start + 256, last):
                socket.changed.clear()
                await asyncio.wait_for(socket.changed.wait(), TIMEOUT)

    def held() -> int:
        """Bytes still allocated by the outbox and by this test (job ids, records): other threads
        of the test process (servers of earlier tests winding down) are not counted."""
        files = [tracemalloc.Filter(True, outbox.__file__), tracemalloc.Filter(True, __file__)]
        return sum(stat.size for stat in tracemalloc.take_snapshot().filter_traces(files).statistics("filename"))

    async def body():
        socket = CountingSocket()
        conn = Connection(socket)
        conn.open()
        tracemalloc.start()
        try:
            await push_jobs(conn, socket, 0, 2_000)
            after_2k = held()
            await push_jobs(conn, socket, 2_000, 20_000)
            after_20k = held()
        finally:
            tracemalloc.stop()
        await conn.stop()
        return after_20k - after_2k, socket.count

    growth, sent = run(body())
    assert sent == 20_000
    assert growth < 100_000, f"{growth} bytes more for 18,000 more jobs"
