"""Roles over a shared Redis/Valkey backend (``--backend redis://... --role api|worker|all``).

- ``api``: the full HTTP/WebSocket app over ``RedisEngine``; holds no GPU and loads no model.
- ``worker``: ``RedisWorker`` on this machine's device, with a minimal HTTP app (``GET /health``,
  ``GET /metrics``) so orchestrators and tests can see it is alive; no job routes.
- ``all``: both in one process (the API engine and a worker), e.g. one box that also joins a pool.

Images: workers write them into ``output_dir``, and API nodes serve ``/api/image/...`` and the
final b64 images from their own ``output_dir``: every node must mount the same shared directory
(NFS, a cloud file system...). See docs/scale-out.md.

Testing aid: when ``T2I_FAKE_GENERATOR_STEP_S`` is set, workers use ``server.testing.fakes``'s
``FakeGenerator`` with that many seconds per step (and ``FakeUpscaler``) instead of a model; a
prompt containing ``crash:worker`` then kills the worker process mid-job (``os._exit``), to show
how a job that takes workers down ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response

from server.core.engine import EngineConfig

log = logging.getLogger(__name__)
FAKE_ENV = "T2I_FAKE_GENERATOR_STEP_S"


class RemoteGenerator:
    """What an API node shows for ``/health``'s generator: the model runs on the workers."""

    def load(self, model: str, variant: str | None) -> None:
        pass

    def describe(self) -> dict:
        return {"device": "remote", "dtype": "n/a", "loaded": [], "role": "api"}


def engine_config(settings) -> EngineConfig:
    return EngineConfig(output_dir=settings.output_dir, max_in_flight=1, max_queue=settings.max_queue,
                        max_queue_per_client=settings.max_queue_per_client, preview_max_side=settings.preview_max_side,
                        png_compress_level=settings.png_compress_level)


def fake_generator_from_env():
    """(generator, upscaler) when the testing aid is on, else None."""
    step_s = os.environ.get(FAKE_ENV)
    if step_s is None:
        return None
    from server.testing.fakes import FakeGenerator, FakeUpscaler

    class CrashingFakeGenerator(FakeGenerator):
        def generate(self, request, on_step, is_cancelled):
            if "crash:worker" in request.prompt:
                def crash(update):
                    if update.step >= 2:
                        log.error("crash:worker prompt: exiting the process (testing aid)")
                        os._exit(17)
                    on_step(update)
                return super().generate(request, crash, is_cancelled)
            return super().generate(request, on_step, is_cancelled)

    return CrashingFakeGenerator(step_s=float(step_s)), FakeUpscaler()


@asynccontextmanager
async def cluster_lifespan(app, settings, catalog, generator, upscaler):
    """The lifespan of ``create_app`` when ``settings.backend`` is set (roles ``api`` and ``all``)."""
    from server.cluster.redis_engine import ClusterOptions, RedisEngine
    from server.cluster.redis_worker import RedisWorker

    options = ClusterOptions.from_settings(settings)
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    engine = RedisEngine(engine_config(settings), options, metrics=app.state.metrics)
    worker = None
    if settings.role == "all":
        await asyncio.to_thread(generator.load, catalog.default_model, None)
        worker = RedisWorker(engine_config(settings), options, generator, upscaler, metrics=app.state.metrics)
        await worker.start()
    app.state.metrics.bind(engine)
    await engine.start()
    app.state.engine, app.state.generator, app.state.worker = engine, generator or RemoteGenerator(), worker
    try:
        yield
    finally:
        await engine.stop(settings.shutdown_grace_s)
        if worker is not None:
            await worker.stop(settings.shutdown_grace_s)


def create_worker_app(settings, generator, upscaler, default_model: str):
    """The worker role's process: the worker plus ``/health`` and ``/metrics``."""
    from prometheus_client import CONTENT_TYPE_LATEST

    from server import __version__
    from server.cluster.redis_engine import ClusterOptions
    from server.cluster.redis_worker import RedisWorker
    from server.metrics import Metrics

    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        settings.output_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(generator.load, default_model, None)
        worker = RedisWorker(engine_config(settings), ClusterOptions.from_settings(settings), generator, upscaler,
                             metrics=metrics)
        metrics.bind(worker)
        await worker.start()
        app.state.engine = app.state.worker = worker
        try:
            yield
        finally:
            await worker.stop(settings.shutdown_grace_s)

    app = FastAPI(title="t2i-server worker", version=__version__, lifespan=lifespan)

    @app.get("/health")
    async def health(request: Request) -> dict:
        worker = request.app.state.worker
        claim = worker._claim
        return {"status": "ok" if worker.accepting else "shutting_down", "role": "worker", "node_id": worker.node_id,
                "model": default_model, "generator": generator.describe(), "completed": worker.completed,
                "job_id": claim.active.job_id if claim is not None else None, "version": __version__}

    @app.get("/metrics")
    async def metrics_route() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
