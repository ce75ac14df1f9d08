"""Which browser origins may call the server: one allowlist for CORS (HTTP) and for WebSocket
handshakes, which CORS does not cover (``routes_ws`` checks ``Origin`` itself with ``origin_allowed``).

Browsers on localhost (any port) and pages opened from disk (``Origin: null``, web_client.html) may
call the API; any other origin must be listed in ``T2I_CORS_ORIGINS``. Same-origin needs no CORS.
"""

from __future__ import annotations

import re

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.config import Settings

LOCALHOST_ORIGINS = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"


def origin_allowed(origin: str, host: str | None, settings: Settings) -> bool:
    """The CORS allowlist, for requests that CORS does not cover (WebSocket handshakes): the
    server's own origin (``Origin`` names the ``Host`` asked for), localhost, ``null`` and
    ``settings.cors_origins``."""
    if origin == "null" or origin in settings.cors_origins or re.match(LOCALHOST_ORIGINS, origin):
        return True
    scheme, sep, netloc = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and host is not None and netloc.lower() == host.lower()


def add_cors(app: FastAPI, settings: Settings) -> None:
    """CORS for the same allowlist. Add it after every other middleware: outermost, so even a
    response a middleware produces itself (a 413) carries the CORS headers."""
    app.add_middleware(CORSMiddleware, allow_origins=["null", *settings.cors_origins],
                       allow_origin_regex=LOCALHOST_ORIGINS, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"])
