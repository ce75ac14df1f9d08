"""A request-body size limit for every HTTP route (``settings.max_body_bytes``).

Pure ASGI, in front of routing: a declared ``Content-Length`` over the limit is refused with 413
before any byte of the body is read; a body without one (chunked) is read up to the limit and
refused as soon as it passes it, so no request can make the server buffer more than the limit.
The refusal uses the OpenAI error envelope like every other error.
"""

from __future__ import annotations

import json

from server.openai_api.schemas import ErrorBody, ErrorEnvelope

STATUS = 413


class BodyLimitMiddleware:
    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        if dict(scope.get("headers") or ()).get(b"transfer-encoding") is None:
            return await self.app(scope, receive, send)  # no body at all
        body, more = bytearray(), True
        while more:  # chunked: buffer what is allowed, refuse the rest
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay(message, receive), send)
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._refuse(send)
        return await self.app(scope, _replay({"type": "http.request", "body": bytes(body)}, receive), send)

    async def _refuse(self, send) -> None:
        error = ErrorBody(message=f"The request body is larger than {self.max_bytes} bytes.",
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
