"""The FastAPI application. The lifespan owns the engine; handlers reach it through ``app.state``.

``create_app`` takes an optional generator/upscaler so tests (and benchmarks) can hand it a fake
one; by default it builds the real diffusers generator and the Real-ESRGAN upscaler.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import __version__
from server.core.catalog import Catalog, resolve_default_model
from server.config import Settings
from server.core.engine import EngineConfig, JobEngine
from server.core.generation import Generator, Upscaler
from server.metrics import Metrics
from server.core.store import SQLiteJobStore

log = logging.getLogger(__name__)
NO_UPSCALER = object()


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def default_generator(settings: Settings) -> Generator:
    from server.model import DiffusersGenerator

    return DiffusersGenerator(settings.cache_dir, device=settings.device, max_resident=settings.max_resident_models)


def default_upscaler(settings: Settings) -> Upscaler:
    from server.inference.upscale import RealESRGANUpscaler

    return RealESRGANUpscaler(settings.cache_dir, weights_path=settings.upscaler_weights, device=settings.device,
                              tile=settings.upscale_tile)


def build_catalog(settings: Settings, default_model: str) -> Catalog:
    served = tuple(dict.fromkeys([default_model, *settings.extra_models]))
    return Catalog(default_model=default_model, served=served, aliases=settings.alias_map(default_model),
                   created=int(time.time()))


def create_app(settings: Settings, generator: Generator | None = None, upscaler=None,
               default_model: str | None = None) -> FastAPI:
    """``upscaler``: None builds the real one; ``NO_UPSCALER`` serves without upscaling."""
    default_model = default_model or resolve_default_model(settings.model, cuda_available())
    catalog = build_catalog(settings, default_model)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if settings.backend:  # scale-out over Redis/Valkey: server/cluster, docs/scale-out.md
            from server.cluster.roles import cluster_lifespan

            gen, up = generator, None if upscaler is NO_UPSCALER else upscaler
            if settings.role == "all":  # this process is also a GPU worker
                gen = gen if gen is not None else default_generator(settings)
                up = None if upscaler is NO_UPSCALER else (up if up is not None else default_upscaler(settings))
            async with cluster_lifespan(app, settings, catalog, gen, up):
                yield
            return
        gen = generator if generator is not None else default_generator(settings)
        up = None if upscaler is NO_UPSCALER else (upscaler if upscaler is not None else default_upscaler(settings))
        await asyncio.to_thread(gen.load, catalog.default_model, None)
        store = await SQLiteJobStore(settings.db_path).open()
        config = EngineConfig(output_dir=settings.output_dir, max_in_flight=settings.max_in_flight,
                              max_queue=settings.max_queue, max_queue_per_client=settings.max_queue_per_client,
                              preview_max_side=settings.preview_max_side, png_compress_level=settings.png_compress_level)
        engine = JobEngine(config, gen, up, store, metrics=app.state.metrics)
        app.state.metrics.bind(engine)
        await engine.start()
        app.state.engine, app.state.generator = engine, gen
        if get_demo(catalog):
            log.warning("serving %s: a RANDOM-WEIGHT DEMO model; images are noise, not art", catalog.default_model)
        try:
            yield
        finally:
            await engine.stop(settings.shutdown_grace_s)
            await store.close()

    app = FastAPI(title="t2i-server", version=__version__, lifespan=lifespan)
    app.state.settings, app.state.catalog = settings, catalog
    app.state.metrics = Metrics()
    _add_body_limit(app, settings)
    _add_cors(app, settings)  # added last: outermost, so even a 413 carries the CORS headers
    _add_routes(app)
    return app


def get_demo(catalog: Catalog) -> bool:
    return any(profile.is_demo for profile in catalog.profiles())


# Browsers on localhost (any port) and pages opened from disk (Origin: null, web_client.html) may
# call the API; any other origin must be listed in T2I_CORS_ORIGINS. Same-origin needs no CORS.
LOCALHOST_ORIGINS = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"


def origin_allowed(origin: str, host: str | None, settings: Settings) -> bool:
    """The CORS allowlist, for requests that CORS does not cover (WebSocket handshakes): the
    server's own origin (``Origin`` names the ``Host`` asked for), localhost, ``null`` and
    ``settings.cors_origins``."""
    if origin == "null" or origin in settings.cors_origins or re.match(LOCALHOST_ORIGINS, origin):
        return True
    scheme, sep, netloc = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and host is not None and netloc.lower() == host.lower()


def _add_cors(app: FastAPI, settings: Settings) -> None:
    from fastapi.middleware.cors import CORSMiddleware

    app.add_middleware(CORSMiddleware, allow_origins=["null", *settings.cors_origins],
                       allow_origin_regex=LOCALHOST_ORIGINS, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"])


def _add_body_limit(app: FastAPI, settings: Settings) -> None:
    from server.body_limit import BodyLimitMiddleware

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)


def _add_routes(app: FastAPI) -> None:
    from server import routes_openai, routes_ws, routes_misc

    routes_misc.install(app)
    routes_openai.install(app)
    routes_ws.install(app)
