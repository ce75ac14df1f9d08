"""Nothing accepted is lost (issue 15), through the engine's public interface over a real SQLite
store: a restart queues unfinished jobs again; a new interest keeps a job whose cancel is pending;
a repeat of a request whose upscale is missing runs the upscale, not the generation."""

from __future__ import annotations

import asyncio
import threading

import pytest
from PIL import Image

from server.core import files
from server.core.engine import EngineConfig, JobEngine
from server.core.jobs import ImageFile, JobRecord, JobResult, JobStatus
from server.core.store import SQLiteJobStore
from server.testing.fakes import FakeGenerator, FakeUpscaler
from tests.engine_helpers import CancelHeldGenerator, running_engine, spec, statuses, until_terminal

S = JobStatus


def stored(job_spec, status: JobStatus, at: float, **fields) -> JobRecord:
    return JobRecord(job_id=job_spec.job_id, spec=job_spec, status=status, created_at=at, updated_at=at, **fields)


async def seed_database(tmp_path, records: list[JobRecord]) -> None:
    """What a killed process leaves behind: its rows, as it wrote them."""
    store = await SQLiteJobStore(tmp_path / "jobs.sqlite3").open()
    for record in records:
        await store.put(record)
    await store.close()


async def final(engine: JobEngine, job_id: str) -> JobRecord:
    return (await until_terminal(engine.subscribe(await engine.get(job_id))))[-1].record


def test_restart_runs_every_unfinished_job_in_order(tmp_path):
    running = spec("was processing", seed=1)
    early, late = spec("queued first", seed=2), spec("queued second", seed=3)
    upscaling = spec("was upscaling", seed=4, upscale=True)
    image_name = "generated-image.png"
    files.write_atomic(tmp_path / "outputs", image_name, files.encode_image(Image.new("RGB", (64, 64), (9, 8, 7))))
    result = JobResult(images=(ImageFile(image_name),), seeds=(4,), generation_s=1.0)

    async def main():
        await seed_database(tmp_path, [
            stored(late, S.PENDING, 30.0), stored(early, S.PENDING, 20.0), stored(running, S.PROCESSING, 10.0),
            stored(upscaling, S.GENERATED, 5.0, result=result)])
        gate = threading.Event()
        generator, upscaler = FakeGenerator(gate=gate), FakeUpscaler()
        async with running_engine(tmp_path, generator, upscaler) as engine:
            assert engine.counts() in ({"pending": 3, "generated": 1}, {"pending": 2, "processing": 1, "generated": 1},
                                       {"pending": 2, "processing": 1})
            # Queued again without any interest: releasing someone else's interest cancels nothing.
            await engine.release(early.job_id, "a client that never asked for it")
            gate.set()
            done = {job.prompt: await final(engine, job.job_id) for job in (running, early, late, upscaling)}
        assert {prompt: record.status for prompt, record in done.items()} == dict.fromkeys(done, S.COMPLETED)
        assert [call.prompt for call in generator.calls] == ["was processing", "queued first", "queued second"]
        assert done["was processing"].attempt == 2, "a retry of a job that was running is a new attempt"
        assert done["queued first"].attempt == 1
        upscaled = done["was upscaling"].result
        assert upscaled.upscale_error is None and upscaled.images[0].filename == image_name
        big = Image.open(tmp_path / "outputs" / upscaled.images[0].upscaled_filename)
        assert big.size == (256, 256) and big.getpixel((0, 0)) == (9, 8, 7)
        assert upscaler.calls == 1, "the generated image was upscaled, not generated again"
    asyncio.run(main())


def test_a_recovered_job_is_cancelled_only_by_an_explicit_cancel(tmp_path):
    job = spec("recovered", seed=5)

    async def main():
        await seed_database(tmp_path, [stored(job, S.PENDING, 1.0)])
        gate = threading.Event()
        async with running_engine(tmp_path, FakeGenerator(gate=gate)) as engine:
            joined = await engine.submit(job, interest="http-retry")
            assert not joined.created
            await engine.release(job.job_id, "http-retry")  # that client left: the job stays
            assert (await engine.get(job.job_id)).status.is_active
            record, cancelled = await engine.cancel(job.job_id, "the original client")
            assert cancelled
            gate.set()
            assert (await final(engine, job.job_id)).status is S.CANCELLED
    asyncio.run(main())


def test_a_job_whose_upscale_was_cut_short_gets_it_on_a_repeat(tmp_path):
    job = spec("upscale me", seed=6, upscale=True)

    async def main():
        generator, upscaler = FakeGenerator(), FakeUpscaler(fail=True)
        async with running_engine(tmp_path, generator, upscaler) as engine:
            first = (await until_terminal((await engine.submit(job, interest="a")).subscriber))[-1].record
            assert first.status is S.COMPLETED and first.result.upscale_error
            upscaler.fail = False  # memory is back
            repeat = await engine.submit(job, interest="b")
            assert repeat.created and repeat.record.status is S.GENERATED and repeat.record.attempt == 2
            events = await until_terminal(repeat.subscriber)
            assert statuses(events) == ["generated", "completed"]
            done = events[-1].record
            assert done.result.upscale_error is None and done.result.images[0].upscaled_filename
            assert done.result.images[0].filename == first.result.images[0].filename
            assert len(generator.calls) == 1, "the generation stays cached"
            cached = await engine.submit(job, interest="c")
            assert not cached.created and cached.record == done
    asyncio.run(main())


def test_without_an_upscaler_a_repeat_is_answered_from_the_cache(tmp_path):
    job = spec("no upscaler here", seed=7, upscale=True)

    async def main():
        store = await SQLiteJobStore(tmp_path / "jobs.sqlite3").open()
        engine = JobEngine(EngineConfig(output_dir=tmp_path / "outputs"), FakeGenerator(), None, store)
        await engine.start()
        try:
            first = (await until_terminal((await engine.submit(job, interest="a")).subscriber))[-1].record
            assert first.result.upscale_error == "upscaling is not available on this server"
            again = await engine.submit(job, interest="b")
            assert not again.created and again.record == first
        finally:
            await engine.stop(2.0)
            await store.close()
    asyncio.run(main())


async def processing(engine: JobEngine, subscriber) -> None:
    while True:
        event = await subscriber.get(timeout=10)
        if event.record is not None and event.record.status is S.PROCESSING:
            return


@pytest.mark.parametrize("joins", ["before the next step", "while the generator stops"])
def test_a_retry_joining_an_abandoned_job_gets_its_image(tmp_path, joins):
    job = spec("dropped then retried", seed=8, steps=4)

    async def main():
        generator = CancelHeldGenerator()
        async with running_engine(tmp_path, generator) as engine:
            first = await engine.submit(job, interest="client A")
            await processing(engine, first.subscriber)
            await engine.release(job.job_id, "client A")  # A's connection dropped: cancel requested
            if joins == "while the generator stops":
                generator.step_gate.set()
                await asyncio.to_thread(generator.saw_cancel.wait, 10)
            retry = await engine.submit(job, interest="client B")  # the SDK's retry, same request
            assert not retry.created
            generator.step_gate.set()
            generator.stop.set()
            events = await until_terminal(retry.subscriber)
            assert events[-1].record.status is S.COMPLETED, statuses(events)
            assert "cancelled" not in statuses(events)
            expected_runs = 2 if joins == "while the generator stops" else 1
            assert len(generator.calls) == expected_runs
    asyncio.run(main())


def test_twenty_drop_and_retry_rounds_all_get_their_image(tmp_path):
    async def main():
        gate = threading.Event()
        async with running_engine(tmp_path, FakeGenerator(gate=gate, step_s=0.001)) as engine:
            outcomes = []
            for round_ in range(20):
                job = spec(f"round {round_}", seed=100 + round_, steps=3)
                gate.clear()
                first = await engine.submit(job, interest=f"A{round_}")
                await processing(engine, first.subscriber)
                await engine.release(job.job_id, f"A{round_}")
                retry = await engine.submit(job, interest=f"B{round_}")
                gate.set()
                outcomes.append((await until_terminal(retry.subscriber))[-1].record.status)
            assert outcomes == [S.COMPLETED] * 20
    asyncio.run(main())
