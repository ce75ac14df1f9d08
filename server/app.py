"""The FastAPI applications: ``create_app`` (every route; single node and the ``api``/``all``
roles) and ``create_worker_app`` (the ``worker`` role: ``GET /health`` and ``GET /metrics`` only).
Both start their engines in ``server.bootstrap.lifespan``; handlers reach them through ``app.state``.

``create_app`` takes an optional generator/upscaler so tests (and benchmarks) can hand it a fake
one; by default it builds the real diffusers generator and the Real-ESRGAN upscaler.
"""

from __future__ import annotations

from fastapi import FastAPI, Request, Response

from server import __version__
from server.bootstrap import NO_UPSCALER, Inference, build_catalog, lifespan, resolve_model
from server.config import Settings
from server.core.loras import LoraDirectory
from server.core.generation import Generator
from server.metrics import Metrics
from server.openai_api.variants import VariantCache
from server.origins import add_cors, add_host_check

# NO_UPSCALER and build_catalog are re-exported: tests and benchmarks import them from here.
__all__ = ["NO_UPSCALER", "app_for_role", "build_catalog", "create_app", "create_worker_app"]


def create_app(settings: Settings, generator: Generator | None = None, upscaler=None,
               default_model: str | None = None) -> FastAPI:
    """``upscaler``: None builds the real one; ``NO_UPSCALER`` serves without upscaling.
    ``default_model`` None: resolved from ``settings.model``."""
    catalog = build_catalog(settings, default_model or resolve_model(settings))
    metrics = Metrics()
    app = FastAPI(title="t2i-server", version=__version__,
                  lifespan=lifespan(settings, catalog, metrics, generator, upscaler))
    app.state.settings, app.state.catalog, app.state.metrics = settings, catalog, metrics
    app.state.loras = LoraDirectory(settings.lora_dir)  # what requests may name (GET /v1/loras)
    app.state.variants = VariantCache(settings.variant_cache_bytes, settings.max_concurrent_encodes, metrics)
    _add_body_limit(app, settings)
    add_cors(app, settings)  # outside the body limit, so even a 413 carries the CORS headers
    add_host_check(app, settings)  # outermost: a request for a foreign Host name reaches nothing
    _add_routes(app)
    return app


def create_worker_app(settings: Settings, generator: Generator | None = None, upscaler=None,
                      default_model: str | None = None) -> FastAPI:
    """The ``worker`` role's app: a ``RedisWorker`` plus ``/health`` and ``/metrics``, so
    orchestrators and tests can see it is alive; no job routes. Arguments as for ``create_app``."""
    catalog = build_catalog(settings, default_model or resolve_model(settings))
    metrics = Metrics()
    app = FastAPI(title="t2i-server worker", version=__version__,
                  lifespan=lifespan(settings, catalog, metrics, generator, upscaler))
    app.state.settings, app.state.catalog, app.state.metrics = settings, catalog, metrics
    app.add_api_route("/health", _worker_health, methods=["GET"])
    app.add_api_route("/metrics", _worker_metrics, methods=["GET"])
    return app


def app_for_role(settings: Settings, inference: Inference) -> FastAPI:
    """The app of ``settings.role`` over what ``bootstrap.prepare`` built."""
    factory = create_worker_app if settings.backend and settings.role == "worker" else create_app
    return factory(settings, generator=inference.generator, upscaler=inference.upscaler or NO_UPSCALER,
                   default_model=inference.default_model)


async def _worker_health(request: Request) -> dict:
    state = request.app.state
    worker = state.worker
    return {"status": "ok" if worker.accepting else "shutting_down", "role": "worker", "node_id": worker.node_id,
            "model": state.catalog.default_model, "generator": state.generator.describe(),
            "completed": worker.completed, "job_id": worker.current_job_id, "version": __version__}


async def _worker_metrics(request: Request) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_body_limit(app: FastAPI, settings: Settings) -> None:
    from server.body_limit import BodyLimitMiddleware

    from server.openai_api.edits import UPLOAD_PATHS

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, upload_bytes=settings.max_upload_bytes,
                       upload_paths=UPLOAD_PATHS)
    from server.openai_api.admission import AnswerLimitMiddleware

    # Outside the body limit: a refused request is answered before its body is read.
    app.add_middleware(AnswerLimitMiddleware, max_total=settings.max_image_requests,
                       max_per_address=settings.max_image_requests_per_address)


def _add_routes(app: FastAPI) -> None:
    from server import routes_misc, routes_openai, routes_ws

    routes_misc.install(app)
    routes_openai.install(app)
    routes_ws.install(app)
