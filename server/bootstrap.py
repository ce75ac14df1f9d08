"""One bootstrap for every role: settings -> ``EngineConfig.from_settings`` -> generator/upscaler ->
engine -> ``AppState`` on ``app.state``.

The roles (docs/scale-out.md):

- single node (no ``--backend``): ``JobEngine`` over SQLite, jobs run on this process's device.
- ``all`` (with a backend): ``RedisEngine`` for the API side plus a ``RedisWorker`` on this device.
- ``api``: ``RedisEngine`` only; it builds no generator and loads no model.
- ``worker``: ``RedisWorker`` only, behind the minimal app of ``server.app.create_worker_app``.

Two phases, the same for every role. ``prepare`` (blocking: builds and loads the model) runs before
the server binds in ``python -m server``, so a missing model ends the process with one line; the
apps' ``lifespan`` runs it again off the event loop (loading is idempotent, so that costs nothing
after ``python -m server`` and is the only load for apps made in-process by tests and benchmarks),
then starts the engines and stops them in reverse order on shutdown.

Images: workers write them into ``output_dir`` and API nodes serve them from their own
``output_dir``, so with a backend every node must mount the same shared directory.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator

from server.config import Settings
from server.core.catalog import Catalog, resolve_default_model
from server.core.engine import EngineConfig, JobEngine
from server.core.errors import StorageUnavailable
from server.core.generation import Generator, Upscaler
from server.core.retention import Retention, RetentionPolicy
from server.core.store import SQLiteJobStore
from server.metrics import Metrics

if TYPE_CHECKING:
    from server.cluster.redis_worker import RedisWorker

log = logging.getLogger(__name__)
NO_UPSCALER = object()  # ``upscaler=NO_UPSCALER``: serve without upscaling (None means "build the real one")


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def default_generator(settings: Settings) -> Generator:
    from server.core.loras import LoraDirectory
    from server.inference.loras import Adapters
    from server.model import DiffusersGenerator

    adapters = Adapters(LoraDirectory(settings.lora_dir), settings.max_loaded_loras, settings.max_loaded_lora_bytes)
    return DiffusersGenerator(settings.cache_dir, device=settings.device, max_resident=settings.max_resident_models,
                              adapters=adapters)


def default_upscaler(settings: Settings) -> Upscaler:
    from server.inference.upscale import RealESRGANUpscaler

    return RealESRGANUpscaler(settings.cache_dir, weights_path=settings.upscaler_weights, device=settings.device,
                              tile=settings.upscale_tile)


def build_catalog(settings: Settings, default_model: str) -> Catalog:
    served = tuple(dict.fromkeys([default_model, *settings.extra_models]))
    return Catalog(default_model=default_model, served=served, aliases=settings.alias_map(default_model),
                   created=int(time.time()))


def runs_jobs(settings: Settings) -> bool:
    """Whether this process runs jobs on its own device: every role but ``api``."""
    return not (settings.backend and settings.role == "api")


def resolve_model(settings: Settings) -> str:
    """The default model's id. ``auto`` asks for CUDA only when it matters (importing torch is slow);
    an API node names the model a CUDA worker would serve."""
    cuda = not runs_jobs(settings) or (settings.model == "auto" and cuda_available())
    return resolve_default_model(settings.model, cuda)


class RemoteGenerator:
    """What an API node shows for ``/health``'s generator: the model runs on the workers."""

    def load(self, model: str, variant: str | None) -> None:
        pass

    def describe(self) -> dict:
        return {"device": "remote", "dtype": "n/a", "loaded": [], "role": "api"}


@dataclass(frozen=True)
class Inference:
    """What this process runs jobs with. ``generator`` is None on an API node (the workers hold
    the model); ``upscaler`` None: no upscaling."""

    default_model: str
    generator: Generator | None
    upscaler: Upscaler | None


def prepare(settings: Settings, default_model: str, generator: Generator | None = None,
            upscaler: Any = None) -> Inference:
    """Blocking: build what was not given (``upscaler=NO_UPSCALER``: none), load the default model
    and create ``output_dir``. Builds and loads nothing on an API node. Raises ``ServerError`` when
    the model cannot be loaded (the message says why and what to do), ``StorageUnavailable`` when
    the output directory cannot be made or (single node) the job database is damaged or its disk
    full: checked first, so a bad disk ends ``python -m server`` at once with one line."""
    try:
        settings.output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StorageUnavailable(f"cannot create the output directory {settings.output_dir}: "
                                 f"{exc.strerror or exc}; choose another with --output-dir") from None
    if not settings.backend:
        SQLiteJobStore.check(settings.db_path)
    if not runs_jobs(settings):
        return Inference(default_model, None, None)
    generator = generator if generator is not None else default_generator(settings)
    upscaler = None if upscaler is NO_UPSCALER else (upscaler if upscaler is not None else default_upscaler(settings))
    log.info("loading %s ...", default_model)
    generator.load(default_model, None)
    return Inference(default_model, generator, upscaler)


@dataclass(frozen=True)
class AppState:
    """What the lifespan puts on ``app.state`` while the app serves (``settings``, ``catalog`` and
    ``metrics`` are set when the app is made). ``engine`` is what the routes and the drain on SIGTERM
    use: a ``JobEngine``, a ``RedisEngine`` or, in the worker role, the ``RedisWorker`` itself."""

    engine: Any
    generator: Any  # what /health describes
    worker: RedisWorker | None  # the local worker of the ``all`` and ``worker`` roles

    def install(self, state) -> None:
        state.engine, state.generator, state.worker = self.engine, self.generator, self.worker


@asynccontextmanager
async def start_engines(settings: Settings, inference: Inference, metrics: Metrics) -> AsyncIterator[AppState]:
    """Start this role's engine(s); on exit stop them in reverse order (the API engine before the
    local worker, the engine before its store)."""
    async with AsyncExitStack() as stack:
        # A Redis worker holds one claimed job at a time: the queue lives in Redis.
        config = EngineConfig.from_settings(settings, **({"max_in_flight": 1} if settings.backend else {}))
        worker = None
        if not settings.backend:
            engine = await _single_node(stack, settings, config, inference, metrics)
        else:
            if runs_jobs(settings):
                worker = await _redis_worker(stack, settings, config, inference, metrics)
            engine = worker if settings.role == "worker" else await _redis_engine(stack, settings, config, metrics)
        metrics.bind(engine)
        yield AppState(engine=engine, generator=inference.generator or RemoteGenerator(), worker=worker)


async def _single_node(stack: AsyncExitStack, settings: Settings, config: EngineConfig, inference: Inference,
                       metrics: Metrics):
    store = await SQLiteJobStore(settings.db_path).open()
    stack.push_async_callback(store.close)
    engine = JobEngine(config, inference.generator, inference.upscaler, store, metrics=metrics)
    await engine.start()
    stack.push_async_callback(engine.stop, settings.shutdown_grace_s)
    retention = Retention(store, settings.output_dir, RetentionPolicy.from_settings(settings), engine.forget,
                          engine.is_active)
    pruning = asyncio.create_task(retention.run_forever(), name="retention")
    stack.callback(pruning.cancel)  # first on the way out: nothing is deleted while the engine stops
    metrics.bind_retention(retention)
    return engine


async def _redis_engine(stack: AsyncExitStack, settings: Settings, config: EngineConfig, metrics: Metrics):
    from server.cluster.redis_engine import ClusterOptions, RedisEngine

    engine = RedisEngine(config, ClusterOptions.from_settings(settings), metrics=metrics)
    await engine.start()
    stack.push_async_callback(engine.stop, settings.shutdown_grace_s)
    return engine


async def _redis_worker(stack: AsyncExitStack, settings: Settings, config: EngineConfig, inference: Inference,
                        metrics: Metrics):
    from server.cluster.redis_engine import ClusterOptions
    from server.cluster.redis_worker import RedisWorker

    worker = RedisWorker(config, ClusterOptions.from_settings(settings), inference.generator, inference.upscaler,
                         metrics=metrics)
    await worker.start()
    stack.push_async_callback(worker.stop, settings.shutdown_grace_s)
    return worker


def share_lora_directory(state, generator: Generator | None) -> None:
    """One adapter directory (and hash cache) per process: the routes use the model layer's when it
    reads the same ``--lora-dir``, so each file is hashed once, not once per side."""
    adapters = getattr(generator, "adapters", None)
    directory = getattr(adapters, "directory", None)
    if directory is not None and getattr(state, "loras", None) is not None and directory.root == state.loras.root:
        state.loras = directory


def lifespan(settings: Settings, catalog: Catalog, metrics: Metrics, generator: Generator | None = None,
             upscaler: Any = None):
    """The lifespan of every app (``create_app``, ``create_worker_app``): ``prepare`` on a thread,
    ``start_engines``, the ``AppState`` on ``app.state``; the engines stop when the app does."""

    @asynccontextmanager
    async def run(app) -> AsyncIterator[None]:
        inference = await asyncio.to_thread(prepare, settings, catalog.default_model, generator, upscaler)
        async with start_engines(settings, inference, metrics) as state:
            state.install(app.state)
            share_lora_directory(app.state, inference.generator)
            if inference.generator is not None and any(p.is_demo for p in catalog.profiles()):
                log.warning("serving %s: a RANDOM-WEIGHT DEMO model; images are noise, not art", catalog.default_model)
            yield

    return run
