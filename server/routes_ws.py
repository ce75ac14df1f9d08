"""``WS /api/ws``: the WebSocket job protocol, a thin adapter over the job engine.

Connect with ``?client_id=<id>`` to get a session that survives reconnects (see ``ws_sessions``);
without one the connection gets a generated id that only names its interest in jobs. With API keys
configured the key comes from ``Authorization: Bearer <key>`` or ``?api_key=<key>``; a missing or
wrong key gets an ``error`` frame, then close code 4401. A browser page whose ``Origin`` the CORS
allowlist does not admit gets close code 4403. Message schemas: ``schemas_ws``.

Every bad frame (not JSON, no or unknown ``type``, invalid params, too large, binary) is answered
with an ``error`` frame and the connection stays open; ``error_frame`` is the one place that maps
exceptions to error frames.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from fastapi import FastAPI, WebSocket
from pydantic import ValidationError

from server.ws import schemas as wire
from server.auth import authenticate, bearer_token, client_host
from server.core.ports import Engine
from server.core.errors import AuthenticationFailed, InvalidRequest, ServerError
from server.core.fairness import requester_for
from server.core.jobs import JobStatus
from server.core.inputs import EditInputs, fit_size
from server.core.loras import LoraRef, resolve_async
from server.core.spec import JobSpec, Limits, SpecInput, normalize
from server.ws import edits as ws_edits
from server.origins import origin_allowed
from server.ws.outbox import CLOSE_BAD_REQUEST, CLOSE_FORBIDDEN, CLOSE_TOO_MANY, CLOSE_UNAUTHORIZED, Connection
from server.ws.sessions import MAX_CONNECTIONS_PER_CLIENT, Renderer, Session, SessionRegistry

log = logging.getLogger(__name__)
CLIENT_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


@dataclass
class Context:
    """What a message handler needs: the app's services and this connection's session."""

    websocket: WebSocket
    session: Session
    conn: Connection

    @property
    def engine(self) -> Engine:
        return self.websocket.app.state.engine

    @property
    def settings(self):
        return self.websocket.app.state.settings

    def status(self, record, request_id: wire.RequestId = None) -> dict[str, Any]:
        return _render_status(self.websocket.app, record, request_id)


# -- errors: the one mapping ---------------------------------------------------------------------

def error_frame(exc: BaseException, request_id: wire.RequestId = None) -> dict[str, Any]:
    """An ``error`` message for any exception: domain errors keep their message and code
    (``exc.code``); validation errors name the first bad field; anything else is a bare
    'internal server error' (logged here, never sent)."""
    if isinstance(exc, ValidationError):
        exc = _invalid_from_validation(exc)
    if isinstance(exc, ServerError):
        message = wire.ErrorMessage(message=exc.message, code=exc.code, request_id=request_id)
        if exc.param is not None:
            message.param = exc.param
        if getattr(exc, "retry_after_s", None) is not None:  # a full queue: when to try again
            message.retry_after_s = exc.retry_after_s
        return wire.dump(message)
    log.error("ws: unexpected %s while handling a message", type(exc).__name__, exc_info=exc)
    return wire.dump(wire.ErrorMessage(message="internal server error", code="internal_error",
                                       request_id=request_id))


def _invalid_from_validation(exc: ValidationError) -> InvalidRequest:
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ())]
    param = ".".join(loc[1:] if loc[:1] == ["params"] and len(loc) > 1 else loc) or None  # "params" alone: missing
    if first.get("type") == "missing":
        return InvalidRequest(f"{param} is required", param=param, code="missing_required_parameter")
    return InvalidRequest(f"invalid value for {param}: {first.get('msg', 'invalid value')}", param=param)


# -- handlers -------------------------------------------------------------------------------------

def spec_from_message(message: wire.CreateJob, app, stored: EditInputs | None = None,
                      loras: tuple[LoraRef, ...] = ()) -> JobSpec:
    """The one place a create_job request becomes a ``JobSpec`` (profile defaults filled in);
    ``stored``: an image_to_image job's inputs (``server.ws.edits.ingest``); ``loras``: its adapters,
    checked and pinned (``core.loras.resolve_async``)."""
    params, settings = message.params, app.state.settings
    profile = app.state.catalog.resolve(params.model)
    width, height = params.width, params.height
    if stored is not None and width is None and height is None:
        width, height = fit_size(stored.width, stored.height, profile)
    given = SpecInput(prompt=params.prompt, model=profile.model_id, model_type=params.model_type,
                      negative_prompt=params.negative_prompt, width=width, height=height,
                      steps=params.steps, guidance_scale=params.guidance_scale, seed=params.seed, n=1,
                      upscale=params.upscale, task_type=message.task_type,
                      image_sha=stored.image_sha if stored else None, mask_sha=stored.mask_sha if stored else None,
                      strength=params.strength, loras=loras)
    limits = Limits(max_prompt_chars=settings.max_prompt_chars, max_n=settings.max_n,
                    preview_method=settings.preview_method, preview_percent=settings.preview_percent)
    return normalize(given, profile, limits)


async def create_job(ctx: Context, message: wire.CreateJob) -> None:
    """Reply with the job's current status (a duplicate joins the existing job), then follow it."""
    app = ctx.websocket.app
    loras = await resolve_async(app.state.loras, message.params.loras, app.state.catalog.resolve(message.params.model),
                                message.params.model_type, ctx.settings.max_loras)
    spec = spec_from_message(message, app, await ws_edits.ingest(message, ctx.settings), loras)
    session = ctx.session
    submission = await ctx.engine.submit(spec, interest=session.interest, client_id=session.client_id,
                                         owner=session.owner, subscribe=True,
                                         requester=requester_for(session.owner, client_host(ctx.websocket)))
    record = submission.record
    ctx.conn.push_status(record, ctx.status(record, message.request_id), reply=True)
    session.follow(submission.subscriber, preview=message.params.preview, request_id=message.request_id)
    log.info("job %s: ws client %s %s it", record.job_id[:12], session.interest,
             "created" if submission.created else "joined")


async def get_status(ctx: Context, message: wire.GetStatus) -> None:
    record = await ctx.engine.get(message.job_id, ctx.session.owner)
    ctx.conn.push_status(record, ctx.status(record, message.request_id), reply=True)


async def cancel_job(ctx: Context, message: wire.CancelJob) -> None:
    """Withdraw this client's interest; the engine cancels the job when nobody else wants it."""
    record, cancelled = await ctx.engine.cancel(message.job_id, ctx.session.interest, ctx.session.owner)
    if cancelled:
        text = ("job cancelled" if record.status is JobStatus.CANCELLED
                else "upscale stop requested; the job completes with its image without the upscale"
                if record.status is JobStatus.GENERATED
                else "cancellation requested; the job stops at its next step")
    else:
        text = "your interest was withdrawn; the job goes on for the other clients that requested it"
        ctx.session.unfollow(message.job_id)
    reply = wire.CancelResultMessage(job_id=record.job_id, cancelled=cancelled, withdrawn=not cancelled,
                                     status=record.status, message=text, request_id=message.request_id)
    ctx.conn.push(wire.dump(reply))


async def get_client_jobs(ctx: Context, message: wire.GetClientJobs) -> None:
    if ctx.session.client_id is None:
        raise InvalidRequest("get_client_jobs needs a client_id: connect with /api/ws?client_id=<id>",
                             param="client_id", code="client_id_required")
    records = await ctx.engine.client_jobs(ctx.session.client_id, ctx.session.owner)
    output_name = ctx.settings.output_dir.name
    jobs = [wire.client_job(record, output_name) for record in records]
    ctx.conn.push(wire.dump(wire.ClientJobsMessage(jobs=jobs, request_id=message.request_id)))


HANDLERS: dict[str, Callable[[Context, Any], Awaitable[None]]] = {
    "create_job": create_job,
    "get_status": get_status,
    "cancel_job": cancel_job,
    "get_client_jobs": get_client_jobs,
}


# -- frames ---------------------------------------------------------------------------------------

def parse_frame(frame: dict, max_bytes: int) -> dict:
    """The JSON object of a received frame; raises ``InvalidRequest`` for binary, oversized or
    non-JSON frames."""
    text = frame.get("text")
    if text is None:
        raise InvalidRequest("binary frames are not supported; send JSON text frames", code="binary_frame")
    if len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes:
        raise InvalidRequest(f"frame larger than {max_bytes} bytes", code="frame_too_large")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidRequest("the message is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the message must be a JSON object with a 'type'", code="invalid_json")
    return data


def _request_id(data: dict) -> wire.RequestId:
    value = data.get("request_id")
    return value if isinstance(value, (str, int)) and not isinstance(value, bool) else None


async def handle_frame(ctx: Context, frame: dict) -> None:
    """Parse, validate and dispatch one frame; any failure becomes an error reply."""
    request_id = None
    try:
        data = parse_frame(frame, ctx.settings.ws_max_frame_bytes)
        request_id = _request_id(data)
        kind = data.get("type")
        if not isinstance(kind, str) or not kind:
            raise InvalidRequest("the message has no 'type'", param="type", code="missing_type")
        if kind not in wire.CLIENT_MESSAGES:
            known = ", ".join(wire.CLIENT_MESSAGES)
            raise InvalidRequest(f"unknown message type '{kind[:64]}'; use one of: {known}", param="type",
                                 code="unknown_type")
        message = wire.CLIENT_MESSAGES[kind].model_validate(data)
        await HANDLERS[kind](ctx, message)
    except Exception as exc:  # one bad message never ends the connection
        ctx.conn.push(error_frame(exc, request_id))


# -- the route ------------------------------------------------------------------------------------

def _render_status(app, record, request_id: wire.RequestId = None) -> dict[str, Any]:
    engine, output_name = app.state.engine, app.state.settings.output_dir.name
    position = engine.queue_position(record.job_id) if record.status is JobStatus.PENDING else None
    return wire.dump(wire.status_message(record, output_name, position, request_id))


def _registry(app) -> SessionRegistry:
    registry = getattr(app.state, "ws_sessions", None)
    if registry is None:
        registry = app.state.ws_sessions = SessionRegistry()
    return registry


def _renderer(app) -> Renderer:
    return Renderer(status=lambda record, request_id: _render_status(app, record, request_id),
                    progress=lambda event, request_id: wire.dump(wire.progress_message(
                        event.job_id, event.progress, request_id)),
                    preview=lambda event: wire.dump(wire.preview_message(event.job_id, event.preview)))


async def _refuse(websocket: WebSocket, exc: ServerError, code: int) -> None:
    await websocket.send_text(json.dumps(error_frame(exc)))
    await websocket.close(code, exc.code)


async def _admit(websocket: WebSocket) -> tuple[str | None, str | None] | None:
    """(owner, client_id) for an acceptable connection; otherwise refuse it and return None."""
    params = websocket.query_params
    origin = websocket.headers.get("origin")
    if origin is not None and not origin_allowed(origin, websocket.headers.get("host"), websocket.app.state.settings):
        # Browsers send any page's origin; without this check a web page the user visits could
        # drive the local server (cross-site WebSocket hijacking). Non-browser clients send none.
        await _refuse(websocket, ServerError(f"origin '{origin[:100]}' is not allowed; add it to T2I_CORS_ORIGINS",
                                             code="origin_not_allowed"), CLOSE_FORBIDDEN)
        return None
    key = bearer_token(websocket.headers.get("authorization")) or params.get("api_key")
    try:
        owner = authenticate(websocket.app.state.settings, key)
    except AuthenticationFailed as exc:
        await _refuse(websocket, exc, CLOSE_UNAUTHORIZED)
        return None
    client_id = params.get("client_id") or None
    if client_id is not None and not CLIENT_ID.match(client_id):
        await _refuse(websocket, InvalidRequest("client_id must be 1-128 characters of A-Z a-z 0-9 . _ : @ -",
                                                param="client_id"), CLOSE_BAD_REQUEST)
        return None
    return owner, client_id


async def jobs_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    admitted = await _admit(websocket)
    if admitted is None:
        return
    owner, client_id = admitted
    app = websocket.app
    registry = _registry(app)
    session = registry.open(client_id, owner, _renderer(app))
    if len(session.connections) >= MAX_CONNECTIONS_PER_CLIENT:
        await _refuse(websocket, ServerError(f"at most {MAX_CONNECTIONS_PER_CLIENT} connections per client_id",
                                             code="too_many_connections"), CLOSE_TOO_MANY)
        return
    conn = Connection(websocket)
    conn.open()
    session.attach(conn)
    ctx = Context(websocket, session, conn)
    log.info("ws %s: client %s connected", conn.conn_id, session.interest)
    await follow_unfinished(ctx)
    app.state.metrics.ws_connections.inc()
    try:
        while True:
            frame = await websocket.receive()
            if frame["type"] == "websocket.disconnect":
                break
            await handle_frame(ctx, frame)
    finally:
        app.state.metrics.ws_connections.dec()
        await conn.stop()
        await registry.detach(session, conn, app.state.engine)
        log.info("ws %s: client %s disconnected", conn.conn_id, session.interest)


async def follow_unfinished(ctx: Context) -> None:
    """Follow a named client's unfinished jobs that its session does not follow yet: the server
    restarted (its jobs were queued again), or the session expired, or (Redis) its last connection
    was on another API node. It then sees them continue to their final status. Previews are not
    resumed this way (the wish was per create_job and is not stored): statuses and progress are."""
    session = ctx.session
    if session.client_id is None:
        return
    try:
        records = await ctx.engine.client_jobs(session.client_id, session.owner)
    except Exception:  # the listing is a convenience: the connection works without it
        log.exception("ws client %s: could not list its jobs to follow them", session.interest)
        return
    for record in records:
        if record.status.is_active and record.job_id not in session.subscriptions:
            session.follow(ctx.engine.subscribe(record), preview=False)
            log.info("job %s: ws client %s follows it again", record.job_id[:12], session.interest)


def install(app: FastAPI) -> None:
    app.add_api_websocket_route("/api/ws", jobs_socket)
