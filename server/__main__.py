"""Entrypoint: ``python -m server [--model auto|z-image-turbo|cogview4|tiny-z-image|...] [--port 8000]``.

The only place that configures logging. The default model is loaded before the server binds, so a
missing model ends the process at once with one line that says why and what to do (exit code 2).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys

from server.config import Settings, parse_cli

log = logging.getLogger("server")
# Secrets a client may put in a URL (the web page sends its API key as ``?api_key=``: browsers
# cannot set headers on a WebSocket); uvicorn logs every path with its query string.
QUERY_SECRET = re.compile(r"([?&](?:api_key|api-key|apikey|key|token|access_token)=)[^&\s\"']*", re.IGNORECASE)


class RedactQuerySecrets(logging.Filter):
    """Replaces query-string secrets in a record's arguments (uvicorn's access lines and its
    WebSocket ``[accepted]`` lines pass the path as an argument) and in its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = QUERY_SECRET.sub(r"\1REDACTED", record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(QUERY_SECRET.sub(r"\1REDACTED", arg) if isinstance(arg, str) else arg
                                for arg in record.args)
        return True


def configure_logging(level: str) -> None:
    """Root handler at ``level``; every handler redacts query-string secrets."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactQuerySecrets())


def main(argv: list[str] | None = None, generator=None, upscaler=None) -> int:
    """``generator``/``upscaler``: None builds the real ones (``server.testing.serve`` passes fakes)."""
    settings = parse_cli(argv)
    configure_logging(settings.log_level)
    return launch(settings, generator, upscaler)


def launch(settings: Settings, generator=None, upscaler=None) -> int:
    """Every role (server/bootstrap.py): load the model before binding, then serve. With a backend
    ``--role api|worker|all`` (docs/scale-out.md); an API node loads no model."""
    from server.app import app_for_role
    from server.bootstrap import prepare, resolve_model
    from server.core.errors import ServerError

    try:
        inference = prepare(settings, resolve_model(settings), generator, upscaler)
    except ServerError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return serve(settings, app_for_role(settings, inference))


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

    DrainingServer(uvicorn_config(settings, app)).run()
    return 0


def uvicorn_config(settings: Settings, app):
    """uvicorn's settings: our connection limits (``server.connections``), proxies, frame size."""
    import uvicorn

    from server.connections import guarded_protocols, raise_nofile_limit

    raise_nofile_limit()  # before the cap is derived from it
    http_protocol, ws_protocol = guarded_protocols(settings)
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                          http=http_protocol, ws=ws_protocol,
                          # Twice the protocol's frame limit, so an oversized frame gets an error
                          # frame from the adapter instead of uvicorn's bare close 1009.
                          ws_max_size=2 * settings.ws_max_frame_bytes, timeout_graceful_shutdown=5,
                          # The client address (per-address queue limits) from X-Forwarded-For
                          # only when the peer is a listed proxy; uvicorn's default trusts 127.0.0.1.
                          proxy_headers=bool(settings.forwarded_allow_ips),
                          forwarded_allow_ips=settings.forwarded_allow_ips or None)


if __name__ == "__main__":
    sys.exit(main())
