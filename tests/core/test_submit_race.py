"""The per-job submit lock under failure: a holder that fails must not let a newcomer run the
critical section beside a waiter (issue 12: two ActiveJobs for one id, a client's interest lost)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.core.errors import QueueFull
from server.testing.fakes import FakeGenerator
from tests.engine_helpers import running_engine, spec, until_terminal


def test_a_failing_holder_does_not_split_the_job(tmp_path):
    async def scenario():
        gate = threading.Event()
        # One unfinished job fills interest "a"'s share, so a's next submit fails inside the lock.
        async with running_engine(tmp_path, FakeGenerator(gate=gate), max_queue_per_client=1) as engine:
            busy = await engine.submit(spec("busy", seed=1), interest="a")
            wanted = spec("wanted", seed=2)
            holder = asyncio.create_task(engine.submit(wanted, interest="a"))
            waiter = asyncio.create_task(engine.submit(wanted, interest="b"))
            with pytest.raises(QueueFull):
                await holder
            # Arrives while the waiter is inside the critical section, after the holder left.
            late = await engine.submit(wanted, interest="c")
            first = await waiter
            assert [first.created, late.created].count(True) == 1, "one job, the other submit joined it"
            # Both interests hold the job: withdrawing b's leaves it wanted by c.
            _, cancelled = await engine.cancel(wanted.job_id, "b")
            assert not cancelled
            gate.set()
            events = await until_terminal(first.subscriber)
            assert events[-1].record.status.value == "completed"
            assert (await until_terminal(busy.subscriber))[-1].record.status.value == "completed"

    asyncio.run(scenario())
