"""The engine interface (queue + job store + events) behaves the same on the single-node SQLite
default and on the Redis/Valkey backend: the same scenarios, parametrized over the backends."""

from __future__ import annotations

import asyncio
import threading
from contextlib import asynccontextmanager

import pytest

from server.core.engine import EngineConfig, JobEngine
from server.core.errors import JobNotCancellable, JobNotFound, QueueFull, StorageUnavailable
from server.core.events import EventKind
from server.testing.fakes import FakeGenerator, FakeUpscaler
from server.core.jobs import JobStatus
from server.core.profiles import get_profile
from server.core.spec import Limits, SpecInput, normalize
from server.core.store import SQLiteJobStore
from tests.cluster.conftest import KVServer

TIMEOUT = 10


def spec(prompt: str, steps: int = 4, seed: int = 1, upscale: bool = False):
    return normalize(SpecInput(prompt=prompt, model="tiny-z-image", width=64, height=64, steps=steps, seed=seed,
                               upscale=upscale), get_profile("tiny-z-image"), Limits())


@asynccontextmanager
async def engine_for(backend: str, tmp_path, generator, upscaler=None, kv: KVServer | None = None,
                     grace_s: float = 2, **settings):
    """An engine (on Redis: an API node and a worker) over ``tmp_path``'s jobs; ``kv``: an already
    running Redis/Valkey, left running (else one is started and stopped); ``settings``: EngineConfig
    fields. The SQLite job database stays in ``tmp_path``, so a second engine_for reopens it."""
    config = EngineConfig(output_dir=tmp_path / "out", max_in_flight=1, max_queue=8, max_queue_per_client=4,
                          **settings)
    config.output_dir.mkdir(parents=True, exist_ok=True)
    if backend == "sqlite":
        store = await SQLiteJobStore(tmp_path / "jobs.sqlite3").open()
        engine = JobEngine(config, generator, upscaler or FakeUpscaler(), store)
        await engine.start()
        try:
            yield engine
        finally:
            await engine.stop(grace_s)
            await store.close()
        return
    from server.cluster.redis_engine import ClusterOptions, RedisEngine
    from server.cluster.redis_worker import RedisWorker

    own_kv = kv is None
    kv = kv or KVServer(backend, tmp_path / "kv").start()
    engine = RedisEngine(config, ClusterOptions(url=kv.url, node_id="api", reclaim_idle_ms=2000))
    worker = RedisWorker(config, ClusterOptions(url=kv.url, node_id="worker", reclaim_idle_ms=2000), generator,
                         upscaler or FakeUpscaler())
    await engine.start()
    await worker.start()
    try:
        yield engine
    finally:
        await worker.stop(grace_s)
        await engine.stop(grace_s)
        if own_kv:
            kv.stop()


BACKENDS = ["sqlite", "redis", "valkey"]


async def until_terminal(subscriber):
    kinds = []
    async with asyncio.timeout(TIMEOUT):
        async for event in subscriber:
            kinds.append(event.record.status.value if event.kind is EventKind.STATUS else event.kind.value)
            if event.is_terminal:
                subscriber.close()
                return kinds, event.record


@pytest.mark.parametrize("backend", BACKENDS)
def test_job_lifecycle_events_and_cached_resubmission(backend, tmp_path):
    async def scenario():
        async with engine_for(backend, tmp_path, FakeGenerator(step_s=0.01)) as engine:
            submission = await engine.submit(spec("lifecycle"), interest="a", client_id="c1")
            assert submission.created and submission.record.status is JobStatus.PENDING
            kinds, record = await until_terminal(submission.subscriber)
            assert kinds[0] == "pending" and kinds[-1] == "completed" and "processing" in kinds
            assert "progress" in kinds and "preview" in kinds
            assert kinds.index("processing") < kinds.index("progress")
            assert record.result.images and (tmp_path / "out" / record.result.images[0].filename).is_file()
            again = await engine.submit(spec("lifecycle"), interest="b")
            assert not again.created and again.record.status is JobStatus.COMPLETED
            first = await again.subscriber.get(TIMEOUT)
            assert first.is_terminal
            again.subscriber.close()
            assert [r.job_id for r in await engine.client_jobs("c1")] == [record.job_id]
            assert (await engine.get(record.job_id)).status is JobStatus.COMPLETED
            with pytest.raises(JobNotCancellable):
                await engine.cancel(record.job_id, "a")
    asyncio.run(scenario())


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_identical_submits_are_one_job(backend, tmp_path):
    async def scenario():
        generator = FakeGenerator(step_s=0.01)
        async with engine_for(backend, tmp_path, generator) as engine:
            submissions = await asyncio.gather(*(engine.submit(spec("same"), interest=f"i{n}") for n in range(20)))
            assert sum(s.created for s in submissions) == 1
            records = [(await until_terminal(s.subscriber))[1] for s in submissions]
            assert {r.status for r in records} == {JobStatus.COMPLETED}
            assert len(generator.calls) == 1
    asyncio.run(scenario())


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancel_needs_every_interest_and_a_cancelled_job_runs_again(backend, tmp_path):
    async def scenario():
        gate = threading.Event()
        generator = FakeGenerator(gate=gate)
        async with engine_for(backend, tmp_path, generator) as engine:
            blocker = await engine.submit(spec("blocker"), interest="x")
            target = await engine.submit(spec("target"), interest="a")
            await engine.submit(spec("target"), interest="b", subscribe=False)
            record, cancelled = await engine.cancel(target.record.job_id, "a")
            assert not cancelled and record.status is JobStatus.PENDING
            record, cancelled = await engine.cancel(target.record.job_id, "b")
            assert cancelled
            kinds, final = await until_terminal(target.subscriber)
            assert kinds == ["pending", "cancelled"]
            gate.set()
            assert (await until_terminal(blocker.subscriber))[1].status is JobStatus.COMPLETED
            rerun = await engine.submit(spec("target"), interest="c")
            assert rerun.created and rerun.record.attempt == 2
            assert (await until_terminal(rerun.subscriber))[1].status is JobStatus.COMPLETED
    asyncio.run(scenario())


@pytest.mark.parametrize("backend", BACKENDS)
def test_cancel_of_a_running_job_stops_it_at_a_step(backend, tmp_path):
    async def scenario():
        async with engine_for(backend, tmp_path, FakeGenerator(step_s=0.02)) as engine:
            submission = await engine.submit(spec("long", steps=100), interest="a")
            async with asyncio.timeout(TIMEOUT):
                while (await submission.subscriber.get()).kind is not EventKind.PROGRESS:
                    pass
            record, cancelled = await engine.cancel(submission.record.job_id, "a")
            assert cancelled
            kinds, final = await until_terminal(submission.subscriber)
            assert final.status is JobStatus.CANCELLED and kinds.count("progress") < 90
    asyncio.run(scenario())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_nearly_full_disk_refuses_new_jobs_but_not_joins_or_cached_answers(backend, tmp_path):
    """New work waits while the output directory's disk (on Redis the shared one, read by the API
    node) has less than ``min_free_disk_bytes`` free; joining a running job and a cached answer
    cost no disk and are served (issue 16). The disk "fills" between two runs over the same jobs:
    the second asks for more free space than any disk has."""
    kv = None if backend == "sqlite" else KVServer(backend, tmp_path / "kv").start()
    generator = FakeGenerator(step_s=0.05)
    done, running, new = spec("made before the disk filled", steps=2), spec("running as it filled", steps=100), \
        spec("new while it is full")

    async def scenario():
        async with engine_for(backend, tmp_path, generator, kv=kv, grace_s=0) as engine:
            await until_terminal((await engine.submit(done, interest="a")).subscriber)
            await engine.submit(running, interest="b", subscribe=False)  # left unfinished: kept
        async with engine_for(backend, tmp_path, generator, kv=kv, grace_s=0, min_free_disk_bytes=2**62) as engine:
            cached = await engine.submit(done, interest="c", client_id="c", subscribe=False)
            joined = await engine.submit(running, interest="d", client_id="d", subscribe=False)
            with pytest.raises(StorageUnavailable) as refused:
                await engine.submit(new, interest="e", client_id="e", subscribe=False)
            with pytest.raises(JobNotFound):
                await engine.get(new.job_id)
            return cached, joined, refused.value, await engine.client_jobs("e")

    try:
        cached, joined, refused, listed = asyncio.run(scenario())
    finally:
        if kv is not None:
            kv.stop()
    assert not cached.created and cached.record.status is JobStatus.COMPLETED
    assert not joined.created and not joined.record.status.is_terminal
    assert refused.code == "storage_unavailable" and "disk is nearly full" in refused.message, refused.message
    assert listed == [], "nothing recorded for the refused job"


@pytest.mark.parametrize("backend", BACKENDS)
def test_client_jobs_filters_by_key_before_its_limit(backend, tmp_path):
    """Two API keys share a client id: 201 of key A's jobs (the list limit is 200) must not push
    key B's one job off B's list, nor show in it (issue 16)."""
    async def scenario():
        gate = threading.Event()
        async with engine_for(backend, tmp_path, FakeGenerator(gate=gate)) as engine:
            mine = await engine.submit(spec("bravo's job"), interest="b", client_id="shared", owner="bbbb")
            for seed in range(201):  # submitted and cancelled while pending: cheap, and all linked
                theirs = await engine.submit(spec("alpha", seed=seed), interest="a", client_id="shared",
                                             owner="aaaa", subscribe=False)
                await engine.cancel(theirs.record.job_id, "a", "aaaa")
            listed_b = [r.job_id for r in await engine.client_jobs("shared", "bbbb")]
            listed_a = await engine.client_jobs("shared", "aaaa")
            gate.set()
            await until_terminal(mine.subscriber)
        return mine.record.job_id, listed_b, listed_a

    job_b, listed_b, listed_a = asyncio.run(scenario())
    assert listed_b == [job_b]
    assert len(listed_a) == 200 and {r.owner for r in listed_a} == {"aaaa"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_requester_limit_counts_created_jobs_whatever_the_interest(backend, tmp_path):
    """One requester (an address or API key) may have ``max_queue_per_client`` (4) unfinished jobs
    it created, under any number of interests/client ids; joining costs nothing; a finished job
    frees its slot; the refusal says when to retry (issue 16)."""
    async def scenario():
        gate = threading.Event()
        async with engine_for(backend, tmp_path, FakeGenerator(gate=gate)) as engine:
            mine = [await engine.submit(spec(f"mine {i}"), interest=f"i{i}", client_id=f"c{i}", requester="addr:x",
                                        subscribe=False) for i in range(4)]
            with pytest.raises(QueueFull) as refused:
                await engine.submit(spec("one too many"), interest="i9", client_id="c9", requester="addr:x")
            joined = await engine.submit(spec("mine 1"), interest="j", requester="addr:x", subscribe=False)
            elsewhere = await engine.submit(spec("theirs"), interest="t", requester="addr:y", subscribe=False)
            await engine.cancel(mine[3].record.job_id, "i3")
            again = await engine.submit(spec("after a cancel"), interest="i5", requester="addr:x", subscribe=False)
            gate.set()
            return refused.value, joined, elsewhere, again

    refused, joined, elsewhere, again = asyncio.run(scenario())
    assert refused.code == "client_queue_full" and refused.retry_after_s >= 1
    assert not joined.created and elsewhere.created and again.created


def test_redis_client_lists_are_capped_and_expire(tmp_path):
    """Client job lists in Redis keep their newest 200 entries and expire with the results, so
    fresh or busy client ids cannot grow Redis without bound (issue 16)."""
    async def scenario():
        gate = threading.Event()
        async with engine_for("redis", tmp_path, FakeGenerator(gate=gate)) as engine:
            for seed in range(210):
                submitted = await engine.submit(spec("listed", seed=seed), interest="a", client_id="busy",
                                                subscribe=False)
                await engine.cancel(submitted.record.job_id, "a")
            key = engine.keys.client("busy")
            size, ttl = await engine.redis.zcard(key), await engine.redis.ttl(key)
            newest = (await engine.client_jobs("busy"))[0].job_id
            gate.set()
            return size, ttl, newest, submitted.record.job_id, engine.options.result_ttl_s

    size, ttl, newest, last, result_ttl = asyncio.run(scenario())
    assert size == 200 and 0 < ttl <= result_ttl and newest == last
