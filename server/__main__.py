"""Entrypoint: ``python -m server [--model auto|z-image-turbo|cogview4|tiny-z-image|...] [--port 8000]``.

The only place that configures logging. The default model is loaded before the server binds, so a
missing model ends the process at once with one line that says why and what to do (exit code 2).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from server.config import Settings, parse_cli

log = logging.getLogger("server")


def main(argv: list[str] | None = None) -> int:
    settings = parse_cli(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from server.app import cuda_available, create_app, default_generator
    from server.core.catalog import resolve_default_model
    from server.core.errors import ServerError

    if settings.backend:
        return serve_cluster_role(settings)
    try:
        model = resolve_default_model(settings.model, cuda_available())
        generator = default_generator(settings)
        log.info("loading %s ...", model)
        generator.load(model, None)
    except ServerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return serve(settings, create_app(settings, generator=generator, default_model=model))


def serve_cluster_role(settings: Settings) -> int:
    """``--backend redis://... --role api|worker|all`` (server/cluster/roles.py, docs/scale-out.md).
    An API node loads no model; ``auto`` names the model a CUDA worker would serve."""
    from server.app import NO_UPSCALER, create_app, default_generator, default_upscaler
    from server.core.catalog import resolve_default_model
    from server.cluster.roles import RemoteGenerator, create_worker_app, fake_generator_from_env
    from server.core.errors import ServerError

    try:
        from server.app import cuda_available

        model = resolve_default_model(settings.model, settings.role == "api" or (settings.model == "auto" and cuda_available()))
        fake = fake_generator_from_env()
        if settings.role == "api":
            return serve(settings, create_app(settings, generator=RemoteGenerator(), upscaler=NO_UPSCALER,
                                              default_model=model))
        generator, upscaler = fake if fake is not None else (default_generator(settings), None)
        log.info("loading %s ...", model)
        generator.load(model, None)
        if upscaler is None:
            upscaler = default_upscaler(settings)
    except ServerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    if settings.role == "worker":
        return serve(settings, create_worker_app(settings, generator, upscaler, model))
    return serve(settings, create_app(settings, generator=generator, upscaler=upscaler, default_model=model))


def serve(settings: Settings, app) -> int:
    import uvicorn

    class DrainingServer(uvicorn.Server):
        """On the first SIGTERM/SIGINT: refuse new jobs, let running ones finish within the grace
        period (then fail them), so open streams and WebSocket clients get a final status or an
        error event; only then let uvicorn close connections. A second signal exits at once."""

        draining = False

        def handle_exit(self, sig, frame) -> None:
            if self.draining or not hasattr(app.state, "engine"):
                return super().handle_exit(sig, frame)
            self.draining = True
            log.info("signal %s: draining jobs for up to %.0f s", sig, settings.shutdown_grace_s)
            asyncio.get_event_loop().create_task(self._drain_then_exit(sig, frame))

        async def _drain_then_exit(self, sig, frame) -> None:
            try:
                await app.state.engine.stop(settings.shutdown_grace_s)
            finally:
                super().handle_exit(sig, frame)
                # uvicorn re-raises captured signals once serving ends, so the process would die
                # by SIGTERM; a drained shutdown is an orderly one and exits 0.
                self._captured_signals.clear()

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            # Twice the protocol's frame limit, so an oversized frame gets an error
                            # frame from the adapter instead of uvicorn's bare close 1009.
                            ws_max_size=2 * settings.ws_max_frame_bytes, timeout_graceful_shutdown=5)
    DrainingServer(config).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
