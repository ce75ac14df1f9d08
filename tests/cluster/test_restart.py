"""A Redis restart under running roles: without persistence the queue's consumer group is gone and
workers recreate it (no crash loop; resubmitting is safe, the id is the spec hash); with AOF the
jobs, the queue and its pending entries survive, and work resumes where it was."""

from __future__ import annotations

import asyncio
import contextlib
import threading

from server.testing.fakes import FakeGenerator
from server.core.jobs import JobStatus
from tests.cluster.conftest import KVServer
from tests.cluster.test_conformance import TIMEOUT, spec, until_terminal


@contextlib.asynccontextmanager
async def roles(kv, tmp_path, generator, gate: threading.Event | None = None):
    """An API engine and a worker on ``kv``; both stopped on exit (after opening ``gate``, so a
    held generator cannot keep the worker from stopping)."""
    from server.cluster.redis_engine import ClusterOptions, RedisEngine
    from server.cluster.redis_worker import RedisWorker
    from server.core.engine import EngineConfig
    from server.testing.fakes import FakeUpscaler

    config = EngineConfig(output_dir=tmp_path / "out")
    config.output_dir.mkdir(parents=True, exist_ok=True)
    engine = RedisEngine(config, ClusterOptions(url=kv.url, node_id="api", reclaim_idle_ms=5000))
    worker = RedisWorker(config, ClusterOptions(url=kv.url, node_id="worker", reclaim_idle_ms=5000), generator,
                         FakeUpscaler())
    await engine.start()
    await worker.start()
    try:
        yield engine, worker
    finally:
        if gate is not None:
            gate.set()
        await worker.stop(2)
        await engine.stop(2)


def run_against(kv, scenario) -> None:
    """Run the async ``scenario``, then stop the key-value server whatever happened."""
    try:
        asyncio.run(scenario())
    finally:
        kv.stop()


def test_restart_without_persistence_workers_recreate_the_group(tmp_path):
    kv = KVServer("redis", tmp_path / "kv").start()

    async def scenario():
        async with roles(kv, tmp_path, FakeGenerator(step_s=0.005)) as (engine, worker):
            first = await engine.submit(spec("before restart"), interest="a")
            assert (await until_terminal(first.subscriber))[1].status is JobStatus.COMPLETED
            await asyncio.to_thread(kv.restart)
            assert not kv.client().exists("t2i:queue")  # everything is gone
            async with asyncio.timeout(TIMEOUT):
                while True:  # the API node's first submits may meet the reconnect
                    try:
                        second = await engine.submit(spec("before restart"), interest="b")
                        break
                    except Exception:  # connection errors while Redis comes back
                        await asyncio.sleep(0.05)
            assert second.created  # lost with the restart: runs again under the same id
            assert (await until_terminal(second.subscriber))[1].status is JobStatus.COMPLETED
            assert worker.accepting
    run_against(kv, scenario)


def test_restart_with_aof_keeps_jobs_queue_and_pending_entries(tmp_path):
    kv = KVServer("redis", tmp_path / "kv", aof=True).start()
    gate = threading.Event()

    async def scenario():
        async with roles(kv, tmp_path, FakeGenerator(gate=gate), gate) as (engine, worker):
            running = await engine.submit(spec("running across restart"), interest="a")
            queued = await engine.submit(spec("queued across restart"), interest="b")
            async with asyncio.timeout(TIMEOUT):
                while True:
                    event = await running.subscriber.get()
                    if event.record is not None and event.record.status is JobStatus.PROCESSING:
                        break
            await asyncio.to_thread(kv.restart, True)
            client = kv.client()
            assert client.hget(f"t2i:job:{queued.record.job_id}", "status") == "pending"
            assert client.xpending("t2i:queue", "workers")["pending"] == 1  # the running job's entry
            gate.set()
            assert (await until_terminal(running.subscriber))[1].status is JobStatus.COMPLETED
            assert (await until_terminal(queued.subscriber))[1].status is JobStatus.COMPLETED
    run_against(kv, scenario)
