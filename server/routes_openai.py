"""The OpenAI-compatible adapter: ``POST /v1/images/generations`` and ``GET /v1/models[/{id}]``.

Thin: ``plan_request`` is the one place a wire request becomes a job spec; the engine does the work;
``streaming`` formats the SSE events. Every request names its own interest (a uuid), so a client
that goes away (streaming or not) withdraws only itself: the job is cancelled when nobody else,
e.g. an identical request or a WebSocket client, still wants it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from server.auth import client_host, require_owner
from server.core.catalog import Catalog
from server.core.profiles import ModelProfile
from server.config import Settings
from server.core.errors import InvalidRequest, NotFound
from server.core.events import Subscriber
from server.core.fairness import requester_for
from server.core.loras import resolve_async
from server.openai_api.errors import document_errors, install_error_handlers
from server.core.jobs import JobRecord, JobStatus
from server.openai_api.schemas import (ErrorEnvelope, ImageData, ImageGenerationRequest, ImagesResponse,
                                   ModelList, ModelObject)
from server.core.loras import LoraRef
from server.core.spec import SpecInput
from server.openai_api.edits import EDITS_PATH, VARIATIONS_PATH, plan_edit
from server.openai_api.loras import router as loras_router
from server.openai_api.plans import Plan, normalize_wire, plan_delivery
from server.openai_api.resume import router as resume_router
from server.openai_api.b64body import Slots, json_answer
from server.openai_api.serving import ERRORS, final_images, job_failure, usage_for
from server.streaming import (FinalImage, GatedEventSourceResponse, OpenAIDialect, StepDialect, StreamContext,
                              job_events)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])
CLIENT_CLOSED = 499  # nginx's "client closed request": logged only, nobody reads it
SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
SIZE_PARAMS = {"width": "size", "height": "size", "steps": "num_inference_steps"}
TOO_LARGE = {413: {"model": ErrorEnvelope, "description": "The body is larger than max_body_bytes"}}


def plan_request(body: ImageGenerationRequest, catalog: Catalog, settings: Settings,
                 loras: tuple[LoraRef, ...] = ()) -> Plan:
    """Map the wire request onto a ``JobSpec``; raises ``InvalidRequest`` naming the wire param.
    ``loras``: the request's adapters, already checked and pinned (``core.loras.resolve_async``)."""
    if body.background == "transparent":
        raise InvalidRequest("Transparent backgrounds are not supported; use 'opaque' or 'auto'.", param="background")
    profile = catalog.resolve(body.model)
    width, height = parse_size(body.size)
    given = SpecInput(prompt=body.prompt, model=profile.model_id, model_type=body.model_type,
                      negative_prompt=body.negative_prompt, width=width, height=height, steps=body.num_inference_steps,
                      guidance_scale=body.guidance_scale, seed=body.seed, n=1 if body.n is None else body.n,
                      upscale=bool(body.upscale), loras=loras)
    return plan_delivery(body, normalize_wire(given, profile, settings))


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """``"WxH"`` -> (W, H); ``None``/``"auto"`` -> the model's default (None, None)."""
    if size is None or size == "auto":
        return None, None
    # ASCII digits only: str.isdigit() admits '²' (int() then raises) and other scripts' digits.
    match = SIZE.fullmatch(size.lower())
    if match is None:
        raise InvalidRequest(f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', not '{size[:40]}'", param="size")
    return int(match[1]), int(match[2])


# -- routes ---------------------------------------------------------------------------------------


@router.post("/images/generations", response_model=None, summary="Create images (OpenAI-compatible)",
             responses={200: {"model": ImagesResponse, "content": {"text/event-stream": {}},
                              "description": "JSON, or an SSE stream when 'stream' is true"}, **ERRORS, **TOO_LARGE})
async def create_images(body: ImageGenerationRequest, request: Request,
                        owner: str | None = Depends(require_owner)) -> Response:
    state = request.app.state
    profile = state.catalog.resolve(body.model)
    loras = await resolve_async(state.loras, body.loras, profile, body.model_type, state.settings.max_loras)
    return await serve_plan(request, plan_request(body, state.catalog, state.settings, loras), owner)


@router.post(EDITS_PATH.removeprefix("/v1"), response_model=None, summary="Edit an image (OpenAI-compatible)",
             description="multipart/form-data: `image` (or one `image[]`), optional `mask` (PNG, alpha 0 = edit), "
                         "`prompt` and the fields of generations plus `input_fidelity` and `strength` (README, "
                         "'Image edits'). The multipart body is "
                         "described here, not as a requestBody schema: form values are text on the wire, so typed "
                         "properties would promise a distinction (1 vs \"1\") that multipart cannot carry.",
             responses={200: {"model": ImagesResponse, "content": {"text/event-stream": {}},
                              "description": "JSON, or an SSE stream (image_edit.* events) when 'stream' is true"},
                        **ERRORS, **TOO_LARGE})
async def edit_images(request: Request, owner: str | None = Depends(require_owner)) -> Response:
    state = request.app.state
    return await serve_plan(request, await plan_edit(request, state.catalog, state.settings), owner)


@router.post(VARIATIONS_PATH.removeprefix("/v1"), response_model=None, summary="Image variations (legacy)",
             description="The retired dall-e-2 endpoint, kept for older clients: an edit without a prompt.",
             responses={200: {"model": ImagesResponse}, **ERRORS, **TOO_LARGE})
async def create_variation(request: Request, owner: str | None = Depends(require_owner)) -> Response:
    state = request.app.state
    return await serve_plan(request, await plan_edit(request, state.catalog, state.settings, variation=True), owner)


async def serve_plan(request: Request, plan: Plan, owner: str | None) -> Response:
    """Submit the plan's job and deliver it: JSON when it ends, or the SSE stream."""
    state = request.app.state
    interest = f"openai-{uuid.uuid4().hex}"
    submission = await state.engine.submit(plan.spec, interest=interest, owner=owner,
                                           requester=requester_for(owner, client_host(request)))
    job_id = submission.record.job_id
    request.state.job_id = job_id  # for the error handlers' log lines
    if plan.stream:
        return stream_response(request, plan, submission.subscriber, interest, job_id)
    try:
        record = await _terminal_unless_gone(submission.subscriber, request)
    finally:
        await _withdraw(request, submission.subscriber, job_id, interest)
    if record is None:
        log.info("job %s: client went away before the images were ready", job_id[:12])
        return Response(status_code=CLIENT_CLOSED)
    if record.status is not JobStatus.COMPLETED:
        raise job_failure(record)
    # pydantic's serializer (half the time of json.dumps), on the answer with a token per image:
    # the base64 is made from the files while the body is sent (b64body), never held whole.
    answer, slots = await images_response(request, plan, record)
    return json_answer(answer.model_dump_json(exclude_none=True), slots)


@router.get("/models", response_model=ModelList, responses=ERRORS)
async def list_models(request: Request, owner: str | None = Depends(require_owner)) -> ModelList:
    catalog: Catalog = request.app.state.catalog
    return ModelList(data=[_model_object(catalog, p.model_id, p) for p in catalog.profiles()])


# ``:path``: SDK 2+/3 percent-encode a '/' in the id, 1.x sends it raw; both must reach this route.
@router.get("/models/{model_id:path}", response_model=ModelObject, response_model_exclude_none=True, responses=ERRORS)
async def retrieve_model(model_id: str, request: Request, owner: str | None = Depends(require_owner)) -> ModelObject:
    catalog: Catalog = request.app.state.catalog
    if not model_id:
        raise NotFound("a model id is required", param="model")
    profile = catalog.resolve(model_id)
    return _model_object(catalog, model_id, profile)


def _model_object(catalog: Catalog, model_id: str, profile: ModelProfile) -> ModelObject:
    owner = "t2i-server (random-weight demo)" if profile.is_demo else "t2i-server"
    root = profile.model_id if profile.model_id != model_id else None
    return ModelObject(id=model_id, created=catalog.created, owned_by=owner, root=root,
                       supports_edits=profile.supports_edits)


# -- delivery -------------------------------------------------------------------------------------


def stream_response(request: Request, plan: Plan, subscriber: Subscriber, interest: str, job_id: str) -> Response:
    state = request.app.state
    ctx = StreamContext(job_id=job_id, spec=plan.spec, size=plan.size, quality=plan.quality,
                        output_format=plan.output_format, compression=plan.compression,
                        usage=usage_for(plan.spec), created_at=int(time.time()), family=plan.family)
    dialect = StepDialect(ctx) if plan.partial_images is None else OpenAIDialect(ctx, plan.partial_images)

    async def load(record: JobRecord) -> tuple[list[FinalImage], Slots]:
        return await final_images(state.settings, record, plan.output_format, plan.compression, state.variants)

    withdrawn = False

    async def withdraw_once() -> None:
        nonlocal withdrawn
        if not withdrawn:
            withdrawn = True
            await _withdraw(request, subscriber, job_id, interest)

    async def events():
        state.metrics.sse_streams.inc()
        try:
            async for item in job_events(subscriber, dialect, load, job_failure):
                yield item
        finally:  # normal end, error, or the client went away (cancellation lands here)
            state.metrics.sse_streams.dec()
            await withdraw_once()

    # The background task covers a client that left before the generator ever started: its
    # ``finally`` would never run, leaving the subscriber attached and the job wanted by nobody.
    return GatedEventSourceResponse(events(), ping=state.settings.sse_ping_s, headers={"Cache-Control": "no-cache"},
                                    background=BackgroundTask(withdraw_once))


async def images_response(request: Request, plan: Plan, record: JobRecord) -> tuple[ImagesResponse, Slots]:
    """The answer, its b64 fields tokens of the returned ``Slots`` (``b64body.json_answer``)."""
    settings: Settings = request.app.state.settings
    result = record.result
    slots = Slots()
    if plan.response_format == "url":
        base = (settings.public_url or str(request.base_url)).rstrip("/") + "/api/image/"
        data = [ImageData(url=base + img.filename, seed=seed,
                          upscaled_url=base + img.upscaled_filename if img.upscaled_filename else None)
                for img, seed in zip(result.images, result.seeds)]
    else:
        finals, slots = await final_images(settings, record, plan.output_format, plan.compression,
                                           request.app.state.variants)
        data = [ImageData(b64_json=f.b64, upscaled_b64_json=f.upscaled_b64, seed=f.seed) for f in finals]
    return ImagesResponse(created=int(record.updated_at), data=data, size=plan.size, output_format=plan.output_format,
                          quality=plan.quality, usage=usage_for(plan.spec), job_id=record.job_id,
                          upscale_error=result.upscale_error), slots


async def _terminal_unless_gone(subscriber: Subscriber, request: Request) -> JobRecord | None:
    """The job's terminal record, or None when the client disconnected first."""

    async def terminal() -> JobRecord:
        async for event in subscriber:
            if event.is_terminal:
                return event.record
        raise RuntimeError("subscriber ended")  # unreachable: a subscriber never ends by itself

    async def gone() -> None:
        # The body is already read, so the next ASGI message can only be the disconnect.
        while (await request.receive())["type"] != "http.disconnect":
            pass

    done_task, gone_task = asyncio.ensure_future(terminal()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({done_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        done_task.cancel()
        gone_task.cancel()
    return done_task.result() if done_task.done() and not done_task.cancelled() else None


async def _withdraw(request: Request, subscriber: Subscriber, job_id: str, interest: str) -> None:
    """Withdraw this request's interest (a no-op for a finished job), then unsubscribe.

    Shielded: it runs while a disconnected stream is being cancelled. Release comes before
    unsubscribing, so once a stream's subscriber is gone its interest is gone too.
    """
    try:
        with anyio.CancelScope(shield=True):
            await request.app.state.engine.release(job_id, interest)
    finally:
        subscriber.close()


def install(app: FastAPI) -> None:
    install_error_handlers(app)
    document_errors(app)
    app.include_router(router)
    app.include_router(resume_router)
    app.include_router(loras_router)
