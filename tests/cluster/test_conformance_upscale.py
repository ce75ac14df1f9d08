"""The conformance scenarios of a job's upscale (issue 15), on the single-node SQLite default and on
the Redis/Valkey backend: a cancel while ``generated`` stops the upscale and the job completes with
its image; a repeat of a job whose upscale is missing runs only the upscale; a dead worker's
generated job is completed or upscaled by the next worker, never generated again."""

from __future__ import annotations

import asyncio
import threading

import pytest

from server.core.jobs import JobStatus
from server.testing.fakes import FakeGenerator, FakeUpscaler
from tests.cluster.lua import RESULT
from tests.cluster.takeover import generated_job, stop_beating, take_over
from tests.cluster.test_conformance import BACKENDS, TIMEOUT, engine_for, spec, until_terminal


class SlowTiles(FakeUpscaler):
    """400 tiles x 0.05 s (20 s unless stopped); ``running`` is set once two tiles are done."""

    def __init__(self):
        super().__init__(tiles=400, tile_s=0.05)
        self.running = threading.Event()

    def upscale(self, image, is_cancelled=None):
        def check() -> bool:
            if self.tiles_done >= 2:
                self.running.set()
            return is_cancelled()
        return super().upscale(image, check)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancel_during_the_upscale_completes_the_job_with_its_image(backend, tmp_path):
    """A cancel while a job is ``generated`` stops its upscale within a tile or two; the job
    completes with its image and ``upscale_error`` (its status never becomes cancelled). Redis
    refused this cancel (only pending or processing), then read it at the worker's next beat
    (``reclaim_idle_ms / 4`` = 0.5 s here: about 10 tiles) before CANCEL woke the worker (issue 15)."""
    async def scenario():
        upscaler = SlowTiles()
        async with engine_for(backend, tmp_path, FakeGenerator(step_s=0.01), upscaler) as engine:
            submission = await engine.submit(spec("upscale then cancel", upscale=True), interest="a")
            assert await asyncio.to_thread(upscaler.running.wait, TIMEOUT), "the upscale never started"
            tiles_at_cancel = upscaler.tiles_done
            record, cancelled = await engine.cancel(submission.record.job_id, "a")
            assert cancelled and record.status is JobStatus.GENERATED
            kinds, final = await until_terminal(submission.subscriber)
            return kinds, final, upscaler.tiles_done - tiles_at_cancel

    kinds, final, tiles_after = asyncio.run(scenario())
    assert kinds[-2:] == ["generated", "completed"] and "cancelled" not in kinds
    assert final.status is JobStatus.COMPLETED and final.failure is None
    assert final.result.upscale_error == "upscaling stopped: cancelled"
    [image] = final.result.images
    assert image.upscaled_filename is None and (tmp_path / "out" / image.filename).is_file()
    assert tiles_after <= 2, f"{tiles_after} tiles ran after the cancel"


@pytest.mark.parametrize("backend", ["redis", "valkey"])
def test_redis_generated_job_cancelled_while_its_worker_looks_dead_completes_with_its_image(backend, tmp_path):
    """The cancel of a generated job whose worker looks dead does not end it ``cancelled`` (its
    image exists): the worker that takes the entry over completes it with that image, running
    nothing (issue 15)."""
    with generated_job(backend, tmp_path) as (kv, lua, msg):
        stop_beating(lua, msg, "w1")
        assert lua.cancel(dead_idle_ms=2000)[0] == "cancelling"
        generator, upscaler = FakeGenerator(), FakeUpscaler()
        kinds, final = take_over(kv, tmp_path, generator, upscaler)
    assert kinds == ["generated", "completed"]
    assert final.status is JobStatus.COMPLETED and final.result.images == RESULT.images
    assert final.result.upscale_error == "upscaling stopped: cancelled"
    assert generator.calls == [] and upscaler.calls == 0, "nothing ran again"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_repeat_runs_a_missing_upscale_without_generating_again(backend, tmp_path):
    """A job whose upscale failed completes with its image and ``upscale_error``; a repeat of the
    same request runs the upscale again on the saved image (completed -> generated, attempt 2), not
    the generation. Redis answered the repeat from the cache, without the upscale (issue 15)."""
    async def scenario():
        generator, upscaler = FakeGenerator(step_s=0.01), FakeUpscaler(fail=True)
        async with engine_for(backend, tmp_path, generator, upscaler) as engine:
            first = await engine.submit(spec("upscale again", upscale=True), interest="a", client_id="c1")
            _, cut_short = await until_terminal(first.subscriber)
            upscaler.fail = False  # the device has memory again
            repeat = await engine.submit(spec("upscale again", upscale=True), interest="b", client_id="c2")
            kinds, final = await until_terminal(repeat.subscriber)
            cached = await engine.submit(spec("upscale again", upscale=True), interest="c")
            cached.subscriber.close()
            return cut_short, repeat, kinds, final, cached, len(generator.calls), upscaler.calls

    cut_short, repeat, kinds, final, cached, generations, upscales = asyncio.run(scenario())
    assert cut_short.status is JobStatus.COMPLETED
    assert cut_short.result.upscale_error == "upscaling failed: out of GPU memory while upscaling"
    assert repeat.created and repeat.record.status is JobStatus.GENERATED and repeat.record.attempt == 2
    assert repeat.record.result.upscale_error is None
    assert kinds == ["generated", "completed"]
    assert final.status is JobStatus.COMPLETED and final.attempt == 2 and final.result.upscale_error is None
    [image] = final.result.images
    assert image.filename == cut_short.result.images[0].filename, "the same generated image"
    assert image.upscaled_filename and (tmp_path / "out" / image.upscaled_filename).is_file()
    assert generations == 1 and upscales == 2, "upscaled again, never generated again"
    assert not cached.created and cached.record.status is JobStatus.COMPLETED and cached.record.result == final.result


@pytest.mark.parametrize("backend", ["redis", "valkey"])
def test_redis_generated_job_of_a_dead_worker_is_upscaled_not_generated_again(backend, tmp_path):
    """A worker died while upscaling: the worker that takes the entry over upscales the saved
    image. Before, CLAIM set the job back to pending and it was generated again (issue 15)."""
    from PIL import Image

    (tmp_path / "out").mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "out" / RESULT.images[0].filename)
    with generated_job(backend, tmp_path) as (kv, lua, msg):
        stop_beating(lua, msg, "w1")
        generator, upscaler = FakeGenerator(), FakeUpscaler()
        kinds, final = take_over(kv, tmp_path, generator, upscaler)
    assert kinds == ["generated", "completed"]
    [image] = final.result.images
    assert final.status is JobStatus.COMPLETED and final.result.upscale_error is None
    assert image.filename == RESULT.images[0].filename and (tmp_path / "out" / image.upscaled_filename).is_file()
    assert generator.calls == [] and upscaler.calls == 1, "upscaled, not generated again"
