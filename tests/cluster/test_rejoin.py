"""A retry that lands on an abandoned job gets its image (issue 15 item 2), on every backend: client
A's interest is withdrawn (its connection dropped: cancel requested, the job still processing),
client B sends the identical request. On Redis the SUBMIT script withdraws the cancel request, and
a worker that had already stopped the job requeues it at MOVE instead of cancelling it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.core.jobs import JobStatus
from server.testing.fakes import FakeGenerator
from tests.cluster.test_conformance import BACKENDS, engine_for, spec, until_terminal
from tests.engine_helpers import CancelHeldGenerator

TIMEOUT = 10


async def until_processing(subscriber) -> None:
    async with asyncio.timeout(TIMEOUT):
        async for event in subscriber:
            if event.record is not None and event.record.status is JobStatus.PROCESSING:
                return


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_retry_before_the_next_step_keeps_the_job(backend, tmp_path):
    async def scenario():
        gate = threading.Event()
        generator = FakeGenerator(gate=gate, step_s=0.02)  # steps long enough for a worker to read the flag
        async with engine_for(backend, tmp_path, generator) as engine:
            job = spec("dropped, retried before the next step", steps=20)
            first = await engine.submit(job, interest="A")
            await until_processing(first.subscriber)
            await engine.release(job.job_id, "A")  # A's stream dropped: cancel requested
            retry = await engine.submit(job, interest="B")
            assert not retry.created
            gate.set()
            kinds, record = await until_terminal(retry.subscriber)
            assert record.status is JobStatus.COMPLETED, kinds
            assert len(generator.calls) == 1
    asyncio.run(scenario())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_retry_while_the_generator_stops_runs_the_job_again(backend, tmp_path):
    async def scenario():
        generator = CancelHeldGenerator(step_s=0.02)
        async with engine_for(backend, tmp_path, generator) as engine:
            job = spec("dropped, retried as it stops", steps=50)
            first = await engine.submit(job, interest="A")
            await until_processing(first.subscriber)
            await engine.release(job.job_id, "A")
            generator.step_gate.set()
            assert await asyncio.to_thread(generator.saw_cancel.wait, TIMEOUT), "the GPU saw the cancel"
            retry = await engine.submit(job, interest="B")  # the GPU thread is stopping right now
            generator.stop.set()
            kinds, record = await until_terminal(retry.subscriber)
            assert record.status is JobStatus.COMPLETED and "cancelled" not in kinds, kinds
            assert record.attempt == 2 and len(generator.calls) == 2
    asyncio.run(scenario())


@pytest.mark.parametrize("backend", BACKENDS)
def test_twenty_drop_and_retry_rounds(backend, tmp_path):
    async def scenario():
        gate = threading.Event()
        async with engine_for(backend, tmp_path, FakeGenerator(gate=gate, step_s=0.001)) as engine:
            outcomes = []
            for round_ in range(20):
                job = spec(f"round {round_}", steps=3, seed=100 + round_)
                gate.clear()
                first = await engine.submit(job, interest=f"A{round_}")
                await until_processing(first.subscriber)
                await engine.release(job.job_id, f"A{round_}")
                retry = await engine.submit(job, interest=f"B{round_}")
                gate.set()
                outcomes.append((await until_terminal(retry.subscriber))[1].status)
                first.subscriber.close()
            assert outcomes == [JobStatus.COMPLETED] * 20
    asyncio.run(scenario())
