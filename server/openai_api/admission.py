"""A cap on concurrent image-answering requests, in total and per client address (issue 16):
``POST /v1/images/generations|edits|variations`` and ``GET /v1/images/jobs/{id}/events``, from
arrival until the last byte of the answer was sent (or the client left). Answers from the cache
and joins of a running job count like any other: each holds a connection and sends megabytes.

Pure ASGI, in front of routing. Past the per-address cap: 429 ``too_many_requests``; past the total
cap: 503 ``server_busy``; both in the OpenAI envelope with ``Retry-After``. The address is the
connection's (``X-Forwarded-For`` only from a trusted proxy: uvicorn's forwarded-allow-ips).
"""

from __future__ import annotations

import re
from collections import Counter

from server.openai_api.errors import SERVER, envelope
from server.openai_api.schemas import ErrorBody

RETRY_AFTER_S = 2
RATE_LIMIT = "rate_limit_error"  # the type of every 429 (as QueueFull's)
ANSWERING = re.compile(r"/v1/images/(generations|edits|variations|jobs/[^/]+/events)/?")


class AnswerLimitMiddleware:
    def __init__(self, app, max_total: int, max_per_address: int):
        self.app = app
        self.max_total = max_total
        self.max_per_address = max_per_address
        self.by_address: Counter[str] = Counter()  # one event loop: no lock needed
        self.total = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not ANSWERING.fullmatch(scope.get("path", "")):
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("?",))[0]
        refusal = self._refusal(address)
        if refusal is not None:
            return await refusal(scope, receive, send)
        self.total += 1
        self.by_address[address] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.total -= 1
            self.by_address[address] -= 1
            if self.by_address[address] <= 0:
                del self.by_address[address]

    def _refusal(self, address: str):
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        if self.by_address[address] >= self.max_per_address:
            message = (f"Too many image requests at once from this address (at most {self.max_per_address}, "
                       "including answers still being sent); retry after the current ones finish.")
            return envelope(429, ErrorBody(message=message, type=RATE_LIMIT, code="too_many_requests"), headers)
        if self.total >= self.max_total:
            message = f"The server is answering its maximum of {self.max_total} image requests; retry shortly."
            return envelope(503, ErrorBody(message=message, type=SERVER, code="server_busy"), headers)
        return None
