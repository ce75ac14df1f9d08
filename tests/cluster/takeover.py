"""One helper for the take-over tests: an API node and a fresh worker start on a Redis/Valkey
server where a dead worker left the job ``tests.cluster.lua.JOB``; the new worker takes the job
over and the API node's subscriber follows it to its end."""

from __future__ import annotations

import asyncio

from server.cluster.redis_engine import ClusterOptions, RedisEngine
from server.cluster.redis_worker import RedisWorker
from server.core.engine import EngineConfig
from tests.cluster.lua import JOB, PREFIX
from tests.cluster.test_conformance import until_terminal


def take_over(kv, tmp_path, generator, upscaler, node_id: str = "w2", **worker_options):
    """(status kinds, final record) of ``JOB`` once the worker ``node_id`` that took it over ends it.
    Entries idle past 2 s count as a dead worker's (``reclaim_idle_ms``)."""
    async def scenario():
        config = EngineConfig(output_dir=tmp_path / "out")
        engine = RedisEngine(config, ClusterOptions(url=kv.url, node_id="api", prefix=PREFIX, reclaim_idle_ms=2000))
        worker = RedisWorker(config, ClusterOptions(url=kv.url, node_id=node_id, prefix=PREFIX, reclaim_idle_ms=2000,
                                                    **worker_options), generator, upscaler)
        await engine.start()
        await worker.start()
        try:
            return await until_terminal(engine.subscribe(await engine.get(JOB)))
        finally:
            await worker.stop(2)
            await engine.stop(2)

    return asyncio.run(scenario())
