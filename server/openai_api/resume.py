"""Resuming a job's SSE stream on any API node: ``GET /v1/images/jobs/{job_id}/events``.

A client whose stream of ``POST /v1/images/generations`` broke (its API node died, the network
dropped) reconnects here, on any node, with the ``Last-Event-ID`` header of the last event it got
(``id:`` lines; browsers' EventSource sends it by itself). It receives the step dialect from there
on: the previews after that event, the final ``StepEvent`` per image, ``[DONE]``. ``job_id`` is the
``job_id`` field of every StepEvent.

- Redis backend: events strictly after Last-Event-ID, so no duplicates (events trimmed from the
  capped per-job stream meanwhile are skipped: a gap, never a repeat). A job that already ended
  answers its final events. Without the header: from the job's current status.
- Single node (``JobEngine``, no event ids): always from the job's current status (the latest
  preview, then live events), so the latest preview may repeat one the client saw; the header is
  ignored.

The resumed stream only watches: it holds no interest in the job, so closing it cancels nothing.
When the first node died, the interrupted request's interest still holds the job; when the client
left a live node instead, that node withdrew the interest and the job was cancelled unless someone
else (an identical request, a WebSocket client) still wanted it: the resumed stream then ends with
the cancellation error. The OpenAI dialect (``partial_images``) is not resumable: its partial
image counts are per stream.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Literal

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response
from starlette.background import BackgroundTask

from server.auth import require_owner
from server.core.errors import InvalidRequest
from server.core.events import Subscriber
from server.core.jobs import JobRecord
from server.core.ports import Engine
from server.openai_api.serving import ERRORS, final_images, job_failure, usage_for
from server.openai_api.b64body import Slots
from server.streaming import FinalImage, GatedEventSourceResponse, StepDialect, StreamContext, job_events

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["openai"])
EVENT_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")  # a Redis stream id as sent in ``id:`` (ASCII: \d is any script)


async def resume_subscriber(engine: Engine, job_id: str, last_event_id: str | None,
                            owner: str | None) -> tuple[JobRecord, Subscriber]:
    """The job's record and a subscriber that starts after ``last_event_id`` where the engine has
    event ids, else at the job's current status (``Engine.subscribe_from``). Raises ``JobNotFound``."""
    record = await engine.get(job_id, owner)
    return record, await engine.subscribe_from(job_id, last_event_id, owner)


@router.get("/images/jobs/{job_id}/events", response_model=None, summary="Resume a job's SSE stream (step events)",
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "Step events after Last-Event-ID, the final image(s), [DONE]"},
                       **ERRORS})
async def resume_job_events(job_id: str, request: Request,
                            output_format: Literal["png", "jpeg", "webp"] = "png",
                            output_compression: int = Query(100, ge=0, le=100),
                            last_event_id: str | None = Header(None),
                            owner: str | None = Depends(require_owner)) -> Response:
    if last_event_id is not None and not EVENT_ID.fullmatch(last_event_id):
        raise InvalidRequest("Last-Event-ID must be an id received in this API's event stream", param="Last-Event-ID")
    state = request.app.state
    record, subscriber = await resume_subscriber(state.engine, job_id, last_event_id, owner)
    request.state.job_id = job_id  # for the error handlers' log lines
    log.info("job %s: stream resumed after %s", job_id[:12], last_event_id or "its current status")
    spec = record.spec
    ctx = StreamContext(job_id=job_id, spec=spec, size=f"{spec.width}x{spec.height}", quality="auto",
                        output_format=output_format, compression=output_compression, usage=usage_for(spec),
                        created_at=int(record.created_at or time.time()))

    async def load(final: JobRecord) -> tuple[list[FinalImage], Slots]:
        return await final_images(state.settings, final, output_format, output_compression, state.variants)

    async def events():
        state.metrics.sse_streams.inc()
        try:
            async for item in job_events(subscriber, StepDialect(ctx), load, job_failure):
                yield item
        finally:  # normal end, error, or the client went away: only watching, nothing to withdraw
            state.metrics.sse_streams.dec()
            subscriber.close()

    # ``close`` is idempotent; the background task covers a client gone before the generator started.
    return GatedEventSourceResponse(events(), ping=state.settings.sse_ping_s, headers={"Cache-Control": "no-cache"},
                                    background=BackgroundTask(subscriber.close))
