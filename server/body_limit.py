"""A request-body size limit for every HTTP route (``settings.max_body_bytes``; the upload routes,
``/v1/images/edits`` and ``/v1/images/variations``, have their own ``settings.max_upload_bytes``).

Pure ASGI, in front of routing: a declared ``Content-Length`` over the limit is refused with 413
before any byte of the body is read; a body without one (chunked) is read up to the limit and
refused as soon as it passes it, so no request can make the server buffer more than the limit.
Chunked uploads are not buffered here at all: the body streams on to the multipart parser (which
spools files to disk) and is cut off with 413 once it passes the limit.
The refusal uses the OpenAI error envelope like every other error.
"""

from __future__ import annotations

import json

from server.core.errors import PayloadTooLarge
from server.openai_api.schemas import ErrorBody, ErrorEnvelope

STATUS = 413


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int, upload_bytes: int | None = None, upload_paths: tuple[str, ...] = ()):
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = max_bytes if upload_bytes is None else upload_bytes
        self.upload_paths = frozenset(upload_paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        upload = scope.get("path") in self.upload_paths
        limit = self.upload_bytes if upload else self.max_bytes
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return await self._refuse(send, limit)
            return await self.app(scope, receive, send)
        if dict(scope.get("headers") or ()).get(b"transfer-encoding") is None:
            return await self.app(scope, receive, send)  # no body at all
        if upload:
            return await self._streamed(scope, receive, send, limit)
        body, more = bytearray(), True
        while more:  # chunked: buffer what is allowed, refuse the rest
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay(message, receive), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                return await self._refuse(send, limit)
        return await self.app(scope, _replay({"type": "http.request", "body": bytes(body)}, receive), send)

    async def _streamed(self, scope, receive, send, limit: int) -> None:
        """Pass a chunked upload through, counting; past ``limit`` the app's read fails and, unless
        the app already answered, the client gets the 413."""
        seen, started = 0, False

        async def counting():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:  # the route's error mapping answers 413 (server.openai_api.errors)
                    raise PayloadTooLarge(f"The request body is larger than {limit} bytes.")
            return message

        async def watching(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, watching)
        except PayloadTooLarge:
            if not started:
                await self._refuse(send, limit)

    async def _refuse(self, send, limit: int) -> None:
        error = ErrorBody(message=f"The request body is larger than {limit} bytes.",
                          type="invalid_request_error", code="request_too_large")
        payload = json.dumps(ErrorEnvelope(error=error).model_dump()).encode()
        await send({"type": "http.response.start", "status": STATUS,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


def _replay(first: dict, receive):
    """``receive`` that yields ``first`` once, then defers to the server (disconnects included)."""
    pending = [first]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed
