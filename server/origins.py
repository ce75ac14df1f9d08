"""Which browser origins and which ``Host`` names may reach the server.

Origins: one allowlist for CORS (HTTP) and for WebSocket handshakes, which CORS does not cover
(``routes_ws`` checks ``Origin`` itself with ``origin_allowed``). Browsers on localhost (any port)
and the server's own pages (``/ui``) may call the API; any other origin, ``null`` included, must be
listed in ``T2I_CORS_ORIGINS``. ``null`` is what a page opened from disk sends, but also what a
sandboxed iframe on *any* website sends, so allowing it lets every website drive the server.

Hosts: ``HostCheckMiddleware`` refuses a request whose ``Host`` header is not one of the server's
own names (``allowed_hosts``), so DNS rebinding (a hostile name re-pointed at 127.0.0.1, which makes
the browser treat the server as same-origin with the hostile page) gets nothing: HTTP 421 in the
OpenAI envelope, WebSocket an ``error`` frame then close code 4403.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from urllib.parse import urlsplit

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.config import Settings
from server.openai_api.schemas import ErrorBody, ErrorEnvelope
from server.ws import schemas as wire
from server.ws.outbox import CLOSE_FORBIDDEN

log = logging.getLogger(__name__)
LOCALHOST_ORIGINS = r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d+)?$"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
WILDCARD_BINDS = ("0.0.0.0", "::", "[::]", "")
MISDIRECTED = 421


def origin_allowed(origin: str, host: str | None, settings: Settings) -> bool:
    """The CORS allowlist, for requests that CORS does not cover (WebSocket handshakes): the
    server's own origin (``Origin`` names the ``Host`` asked for, which ``HostCheckMiddleware``
    has already checked), localhost and ``settings.cors_origins`` (where ``null`` may be listed)."""
    if origin in settings.cors_origins or re.match(LOCALHOST_ORIGINS, origin):
        return True
    scheme, sep, netloc = origin.partition("://")
    return bool(sep) and scheme in ("http", "https") and host is not None and netloc.lower() == host.lower()


def add_cors(app: FastAPI, settings: Settings) -> None:
    """CORS for the same allowlist. Add it after every other middleware but the Host check:
    outside them, so even a response a middleware produces itself (a 413) carries the headers."""
    app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                       allow_origin_regex=LOCALHOST_ORIGINS, allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["Authorization", "Content-Type"], expose_headers=["Retry-After"])


def add_host_check(app: FastAPI, settings: Settings) -> None:
    """The Host allowlist; add it last (outermost): a refused request reaches nothing else."""
    app.add_middleware(HostCheckMiddleware, settings=settings)


# -- Host ------------------------------------------------------------------------------------------

def host_name(header: str) -> str:
    """The name part of a ``Host`` header, lower case, without port or trailing dot
    (``[::1]:8000`` -> ``[::1]``, ``Example.com.:80`` -> ``example.com``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[:header.find("]") + 1] if "]" in header else header
    return header.rpartition(":")[0].rstrip(".") if ":" in header else header.rstrip(".")


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        return False
    return True


class HostAllowlist:
    """Allowed: ``settings.allowed_hosts`` (``*`` allows any), the bound address, the loopback names
    and the host of ``public_url``. Bound to a wildcard (``0.0.0.0``), any IP literal is allowed
    too: a rebinding attack always comes with the attacker's *name*, never a bare address."""

    def __init__(self, settings: Settings):
        bound = settings.host.strip().lower()
        names = {f"[{bound}]" if ":" in bound and not bound.startswith("[") else bound}
        names |= set(LOOPBACK_HOSTS) | {host_name(h) for h in settings.allowed_hosts}
        if settings.public_url:
            names.add(host_name(urlsplit(settings.public_url).netloc))
        self.any_host = "*" in settings.allowed_hosts
        self.any_ip = settings.host.strip() in WILDCARD_BINDS
        self.names = frozenset(names)

    def allows(self, header: str | None) -> bool:
        if self.any_host:
            return True
        if not header:
            return False
        name = host_name(header)
        return name in self.names or (self.any_ip and _is_ip_literal(name))


class HostCheckMiddleware:
    """Pure ASGI: refuses HTTP requests and WebSocket handshakes whose ``Host`` is not allowed."""

    def __init__(self, app, settings: Settings):
        self.app = app
        self.allowlist = HostAllowlist(settings)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        host = dict(scope.get("headers") or ()).get(b"host", b"").decode("latin-1")
        if self.allowlist.allows(host):
            return await self.app(scope, receive, send)
        log.warning("refused a %s request for Host %r (not in allowed_hosts)", scope["type"], host[:100])
        message = (f"Host '{host[:100]}' is not one of this server's names; "
                   "add it to T2I_ALLOWED_HOSTS if it is one")
        if scope["type"] == "http":
            return await _refuse_http(send, message)
        return await _refuse_websocket(receive, send, message)


async def _refuse_http(send, message: str) -> None:
    error = ErrorBody(message=message, type="invalid_request_error", code="host_not_allowed")
    payload = json.dumps(ErrorEnvelope(error=error).model_dump()).encode()
    await send({"type": "http.response.start", "status": MISDIRECTED,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


async def _refuse_websocket(receive, send, message: str) -> None:
    """Accept, say why in the protocol's own ``error`` frame, then close 4403 (as for a bad Origin)."""
    if (await receive())["type"] != "websocket.connect":
        return
    frame = wire.dump(wire.ErrorMessage(message=message, code="host_not_allowed"))
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": json.dumps(frame)})
    await send({"type": "websocket.close", "code": CLOSE_FORBIDDEN, "reason": "host_not_allowed"})
