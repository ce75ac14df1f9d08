"""Every exception an HTTP request can raise, mapped once to the OpenAI error envelope.

``{"error": {"message", "type", "param", "code"}}`` with the status the official SDK turns into
the right exception class. Messages of ``ServerError`` are safe to show; anything else becomes a
bare "internal server error" (logged with the job id when the route recorded one in
``request.state.job_id``), so no trace or path ever reaches a client.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.core import errors
from server.openai_api.schemas import ErrorBody, ErrorEnvelope

log = logging.getLogger(__name__)

INVALID = "invalid_request_error"
SERVER = "server_error"
NO_RETRY = {"x-should-retry": "false"}  # the SDK retries 5xx; these would only fail again
QUEUE_RETRY_AFTER_S = 2


@dataclass(frozen=True)
class ErrorMapping:
    status: int
    type: str
    headers: dict[str, str] | None = None


# Most specific first: the first isinstance match wins (OutOfMemory before GenerationFailed).
ERROR_MAP: tuple[tuple[type[errors.ServerError], ErrorMapping], ...] = (
    (errors.InvalidRequest, ErrorMapping(400, INVALID)),
    (errors.PayloadTooLarge, ErrorMapping(413, INVALID)),
    (errors.AuthenticationFailed, ErrorMapping(401, INVALID, {"WWW-Authenticate": "Bearer"})),
    (errors.ModelNotFound, ErrorMapping(404, INVALID)),
    (errors.JobNotFound, ErrorMapping(404, INVALID)),
    (errors.NotFound, ErrorMapping(404, INVALID)),
    (errors.JobNotCancellable, ErrorMapping(409, INVALID)),
    (errors.IllegalTransition, ErrorMapping(409, INVALID)),
    (errors.QueueFull, ErrorMapping(429, "rate_limit_error", {"Retry-After": str(QUEUE_RETRY_AFTER_S)})),
    (errors.ShuttingDown, ErrorMapping(503, SERVER)),
    (errors.StorageUnavailable, ErrorMapping(503, SERVER, {"Retry-After": "30"})),
    (errors.ModelLoadError, ErrorMapping(503, SERVER, NO_RETRY)),
    (errors.GenerationFailed, ErrorMapping(500, SERVER, NO_RETRY)),
)


def error_body(exc: errors.ServerError) -> ErrorBody:
    """The envelope's inner object for a domain error (also used in-band by the SSE stream)."""
    return ErrorBody(message=exc.message, type=mapping_for(exc).type, param=exc.param, code=exc.code)


def mapping_for(exc: errors.ServerError) -> ErrorMapping:
    for cls, mapping in ERROR_MAP:
        if isinstance(exc, cls):
            return mapping
    return ErrorMapping(500, SERVER)


def headers_for(exc: errors.ServerError, mapping: ErrorMapping) -> dict[str, str] | None:
    """The mapping's headers; a full queue's ``Retry-After`` is its expected drain time."""
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is None:
        return mapping.headers
    return {**(mapping.headers or {}), "Retry-After": str(retry_after)}


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may echo client input, and a lone surrogate
    (valid in a JSON string, not encodable as UTF-8) must not turn a 4xx into a crash."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


def envelope(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    return AsciiJSONResponse(ErrorEnvelope(error=body).model_dump(), status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the one mapping for domain errors, validation, routing errors and the rest."""

    async def on_server_error(request: Request, exc: errors.ServerError) -> JSONResponse:
        mapping = mapping_for(exc)
        if mapping.status >= 500:
            log.warning("job %s: %s %s -> %d %s", _job_id(request), request.method, request.url.path,
                        mapping.status, exc.message)
        return envelope(mapping.status, error_body(exc), headers_for(exc, mapping))

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return envelope(400, validation_body(exc))

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            body = ErrorBody(message=f"Invalid URL ({request.method} {request.url.path})", type=INVALID, code="not_found")
        elif exc.status_code == 405:
            body = ErrorBody(message=f"Method {request.method} is not allowed for {request.url.path}", type=INVALID,
                             code="method_not_allowed")
        else:
            body = ErrorBody(message=str(exc.detail), type=INVALID if exc.status_code < 500 else SERVER,
                             code=f"http_{exc.status_code}")
        return envelope(exc.status_code, body, getattr(exc, "headers", None))

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("job %s: unhandled %s on %s %s", _job_id(request), type(exc).__name__, request.method,
                  request.url.path, exc_info=exc)
        return envelope(500, ErrorBody(message="internal server error", type=SERVER, code="internal_error"))

    app.add_exception_handler(errors.ServerError, on_server_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI schema say what the handlers above really send: FastAPI documents a 422
    ``HTTPValidationError`` for every route with parameters, but validation errors are 400 here,
    in the error envelope."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        envelope_ref = {"$ref": "#/components/schemas/ErrorEnvelope"}
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses.setdefault("400", {"description": "Invalid request",
                                                 "content": {"application/json": {"schema": envelope_ref}}})
        components = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi


def validation_body(exc: RequestValidationError) -> ErrorBody:
    """400 body for FastAPI's validation errors: ``param`` names the first offending field."""
    first = (exc.errors() or [{}])[0]
    if first.get("type") == "json_invalid":
        return ErrorBody(message="The request body is not valid JSON.", type=INVALID, code="invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    if param is None:
        message = "The request body must be a JSON object with at least 'prompt'."
    else:
        message = f"Invalid value for '{param}': {first.get('msg', 'invalid value')}"
    code = "missing_required_parameter" if first.get("type") == "missing" else "invalid_value"
    return ErrorBody(message=message, type=INVALID, param=param, code=code)


def _job_id(request: Request) -> str:
    job_id = getattr(request.state, "job_id", None)
    return job_id[:12] if job_id else "-"
