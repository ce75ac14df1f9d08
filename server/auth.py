"""Optional API keys (``settings.api_keys``); off by default.

With keys configured every ``/v1`` request needs ``Authorization: Bearer <key>``. The caller's
``owner`` is a short SHA-256 fingerprint of its key: the engine scopes jobs by it, so one key never
sees or joins another key's jobs. Without keys the owner is ``None`` (one shared scope).
"""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request
from starlette.requests import HTTPConnection

from server.config import Settings
from server.core.errors import AuthenticationFailed

OWNER_HEX_CHARS = 16  # 64 bits: a fingerprint for scoping, not a secret


def fingerprint(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:OWNER_HEX_CHARS]


def authenticate(settings: Settings, presented_key: str | None) -> str | None:
    """The owner for ``presented_key``: None when keys are off; raises ``AuthenticationFailed``.

    Every configured key is compared (constant time each, no early exit), so the time taken does
    not tell which key, or how much of one, matched. Reusable by the WebSocket adapter.
    """
    if not settings.api_keys:
        return None
    if not presented_key:
        raise AuthenticationFailed("Missing API key: send 'Authorization: Bearer <key>'.")
    presented = presented_key.encode()
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if not matched:
        raise AuthenticationFailed("Incorrect API key provided.")
    return fingerprint(presented_key)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


async def require_owner(request: Request) -> str | None:
    """FastAPI dependency: the caller's owner fingerprint (None when keys are off)."""
    return authenticate(request.app.state.settings, bearer_token(request.headers.get("authorization")))


def client_host(connection: HTTPConnection) -> str | None:
    """The client's address (HTTP or WebSocket). uvicorn puts the ``X-Forwarded-For`` address
    there only when the connecting peer is in ``forwarded_allow_ips`` (a trusted proxy)."""
    return connection.client.host if connection.client else None
