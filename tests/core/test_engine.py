"""The job core through its public interface: dedup, cache, state machine, cancel, limits, events."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from server.core.errors import IllegalTransition, JobNotCancellable, QueueFull
from server.core.events import EventKind
from server.testing.fakes import FakeGenerator, FakeUpscaler
from server.core.jobs import JobStatus, check_transition
from server.core.profiles import get_profile
from server.core.spec import Limits, SpecInput, normalize
from tests.engine_helpers import running_engine, spec, statuses, until_terminal


def test_defaults_are_filled_before_hashing():
    profile = get_profile("tiny-z-image")
    short = normalize(SpecInput(prompt="x", model="tiny-z-image", seed=5), profile, Limits())
    spelled = normalize(SpecInput(prompt="x", model="tiny-z-image", seed=5, width=256, height=256, steps=9,
                                  guidance_scale=0.0, model_type="fp32", n=1), profile, Limits())
    assert short == spelled and short.job_id == spelled.job_id
    assert len(short.job_id) == 64
    # The hash is of the canonical spec: stable across processes and versions of dict order.
    assert short.job_id == normalize(SpecInput(prompt="x", model="tiny-z-image", seed=5), profile, Limits()).job_id
    assert short.job_id != normalize(SpecInput(prompt="x", model="tiny-z-image", seed=6), profile, Limits()).job_id


def test_no_seed_means_never_deduplicated():
    profile = get_profile("tiny-z-image")
    a = normalize(SpecInput(prompt="x", model="tiny-z-image"), profile, Limits())
    b = normalize(SpecInput(prompt="x", model="tiny-z-image"), profile, Limits())
    assert a.job_id != b.job_id


def test_transition_table_rejects_illegal_moves():
    check_transition("j", JobStatus.PENDING, JobStatus.PROCESSING)
    with pytest.raises(IllegalTransition):
        check_transition("j", JobStatus.COMPLETED, JobStatus.PENDING)
    with pytest.raises(IllegalTransition):
        check_transition("j", JobStatus.PENDING, JobStatus.GENERATED)


def test_concurrent_identical_submissions_run_once_and_both_see_every_status(tmp_path):
    async def main():
        generator = FakeGenerator(step_s=0.005)
        async with running_engine(tmp_path, generator) as engine:
            first, second = await asyncio.gather(
                engine.submit(spec(upscale=True), interest="a"), engine.submit(spec(upscale=True), interest="b"))
            assert first.record.job_id == second.record.job_id
            assert sorted([first.created, second.created]) == [False, True]
            a, b = await asyncio.gather(until_terminal(first.subscriber), until_terminal(second.subscriber))
            assert statuses(a) == statuses(b) == ["pending", "processing", "generated", "completed"]
            assert len(generator.calls) == 1
    asyncio.run(main())


def test_completed_job_is_answered_from_the_cache(tmp_path):
    async def main():
        generator = FakeGenerator()
        async with running_engine(tmp_path, generator) as engine:
            done = await until_terminal((await engine.submit(spec(), interest="a")).subscriber)
            started = time.perf_counter()
            again = await engine.submit(spec(), interest="b")
            elapsed = time.perf_counter() - started
            assert not again.created and again.record.status is JobStatus.COMPLETED
            assert again.record.result == done[-1].record.result
            first = await again.subscriber.get(timeout=1)
            assert first.is_terminal  # a subscriber to a finished job gets its final status at once
            assert len(generator.calls) == 1
            assert elapsed < 1.0
    asyncio.run(main())


def test_failed_and_cancelled_jobs_run_again_when_resubmitted(tmp_path):
    async def main():
        generator = FakeGenerator()
        async with running_engine(tmp_path, generator) as engine:
            failed = await until_terminal((await engine.submit(spec("fail:error"), interest="a")).subscriber)
            assert statuses(failed)[-1] == "failed" and failed[-1].record.error == "the generator failed"
            rerun = await engine.submit(spec("fail:error"), interest="a")
            assert rerun.created and rerun.record.attempt == 2
            await until_terminal(rerun.subscriber)
            assert len(generator.calls) == 2
    asyncio.run(main())


def test_failing_job_does_not_stop_the_next(tmp_path):
    async def main():
        async with running_engine(tmp_path) as engine:
            bad = await engine.submit(spec("fail:oom"), interest="a")
            good = await engine.submit(spec("fine"), interest="a")
            bad_events, good_events = await asyncio.gather(until_terminal(bad.subscriber), until_terminal(good.subscriber))
            assert bad_events[-1].record.status is JobStatus.FAILED
            assert "out of GPU memory" in bad_events[-1].record.error
            assert good_events[-1].record.status is JobStatus.COMPLETED
    asyncio.run(main())


def test_shared_job_is_cancelled_only_when_nobody_wants_it(tmp_path):
    async def main():
        gate = threading.Event()
        async with running_engine(tmp_path, FakeGenerator(gate=gate)) as engine:
            sub_a = await engine.submit(spec(), interest="a")
            await engine.submit(spec(), interest="b")
            while (await sub_a.subscriber.get(timeout=5)).kind is not EventKind.STATUS or \
                    (await engine.get(sub_a.record.job_id)).status is not JobStatus.PROCESSING:
                pass
            record, cancelled = await engine.cancel(sub_a.record.job_id, "a")
            assert not cancelled and record.status is JobStatus.PROCESSING
            record, cancelled = await engine.cancel(sub_a.record.job_id, "b")
            assert cancelled
            gate.set()
            events = await until_terminal(sub_a.subscriber)
            assert events[-1].record.status is JobStatus.CANCELLED
            with pytest.raises(JobNotCancellable):
                await engine.cancel(sub_a.record.job_id, "a")
    asyncio.run(main())


def test_cancel_pending_job_leaves_the_queue(tmp_path):
    async def main():
        gate = threading.Event()
        generator = FakeGenerator(gate=gate)
        async with running_engine(tmp_path, generator) as engine:
            running = await engine.submit(spec("first"), interest="a")
            waiting = await engine.submit(spec("second"), interest="a")
            assert engine.queue_position(waiting.record.job_id) in (0, 1)
            record, cancelled = await engine.cancel(waiting.record.job_id, "a")
            assert cancelled and record.status is JobStatus.CANCELLED
            gate.set()
            await until_terminal(running.subscriber)
            assert [c.prompt for c in generator.calls] == ["first"]
    asyncio.run(main())


def test_queue_full_is_a_distinct_error(tmp_path):
    async def main():
        gate = threading.Event()
        async with running_engine(tmp_path, FakeGenerator(gate=gate), max_queue=2, max_in_flight=1) as engine:
            with pytest.raises(QueueFull):
                for i in range(5):
                    await engine.submit(spec(f"job {i}"), interest="a")
            gate.set()
    asyncio.run(main())


def test_per_client_limit(tmp_path):
    async def main():
        gate = threading.Event()
        async with running_engine(tmp_path, FakeGenerator(gate=gate), max_queue_per_client=2) as engine:
            await engine.submit(spec("one"), interest="c", client_id="c")
            await engine.submit(spec("two"), interest="c", client_id="c")
            with pytest.raises(QueueFull) as raised:
                await engine.submit(spec("three"), interest="c", client_id="c")
            assert raised.value.code == "client_queue_full"
            await engine.submit(spec("three"), interest="d", client_id="d")  # other clients unaffected
            gate.set()
    asyncio.run(main())


def test_slow_subscriber_does_not_slow_generation(tmp_path):
    async def main():
        generator = FakeGenerator(step_s=0.002)
        async with running_engine(tmp_path, generator) as engine:
            job = spec(steps=100)
            reader = await engine.submit(job, interest="fast")
            slow = await engine.submit(job, interest="slow")  # never read until the end
            events = await until_terminal(reader.subscriber)
            assert events[-1].record.status is JobStatus.COMPLETED
            # The slow reader's queue stayed bounded; its status events all survived.
            assert slow.subscriber.pending() <= 2 * 32 + 6
            assert slow.subscriber.dropped > 0
            slow_events = await until_terminal(slow.subscriber, timeout=1)
            assert statuses(slow_events)[-1] == "completed"
    asyncio.run(main())


def test_previews_arrive_before_the_final_status(tmp_path):
    async def main():
        async with running_engine(tmp_path, FakeGenerator()) as engine:
            events = await until_terminal((await engine.submit(spec(steps=10), interest="a")).subscriber)
            previews = [e.preview.step for e in events if e.kind is EventKind.PREVIEW]
            progress = [e.progress.step for e in events if e.kind is EventKind.PROGRESS]
            assert previews == list(range(1, 11)) and progress == list(range(1, 11))
            assert events.index(next(e for e in events if e.kind is EventKind.PREVIEW)) < len(events) - 1
    asyncio.run(main())


def test_upscale_failure_keeps_the_image(tmp_path):
    async def main():
        async with running_engine(tmp_path, FakeGenerator(), FakeUpscaler(fail=True)) as engine:
            events = await until_terminal((await engine.submit(spec(upscale=True), interest="a")).subscriber)
            final = events[-1].record
            assert final.status is JobStatus.COMPLETED
            assert final.result.images[0].upscaled_filename is None
            assert "out of GPU memory" in final.result.upscale_error
            assert (tmp_path / "outputs" / final.result.images[0].filename).is_file()
    asyncio.run(main())


def test_unwritable_output_fails_the_job_cleanly(tmp_path):
    async def main():
        (tmp_path / "outputs").write_text("not a directory")
        async with running_engine(tmp_path, FakeGenerator()) as engine:
            events = await until_terminal((await engine.submit(spec(), interest="a")).subscriber)
            assert events[-1].record.status is JobStatus.FAILED
            assert events[-1].record.error.startswith("could not write the image")
    asyncio.run(main())


def test_event_loop_stays_responsive_while_generating(tmp_path):
    """Lag of a 5 ms ticker on the loop while the fake GPU runs 4 jobs (CPU-bound work included)."""
    async def main():
        async with running_engine(tmp_path, FakeGenerator(step_s=0.01)) as engine:
            subs = [(await engine.submit(spec(f"job {i}", width=512, height=512), interest="a")).subscriber for i in range(4)]
            lags, done = [], asyncio.gather(*(until_terminal(s) for s in subs))
            while not done.done():
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                lags.append(time.perf_counter() - before - 0.005)
            await done
            lags.sort()
            assert lags[len(lags) // 2] < 0.02 and lags[-1] < 0.25, (lags[len(lags) // 2], lags[-1])
    asyncio.run(main())
