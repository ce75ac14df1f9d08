"""SSE events of ``POST /v1/images/generations`` and ``/v1/images/edits`` with ``"stream": true``:
two dialects, one feed. Edits name their OpenAI events ``image_edit.*`` (``StreamContext.family``).

Both dialects turn the same job events (previews, then the terminal status) into
``ServerSentEvent`` objects; the route owns the transport (``EventSourceResponse``, disconnects,
releasing the job). Wire shapes are the pydantic models of ``schemas_openai``.

- Step dialect (default): ``data: StepEvent`` per preview, one final ``StepEvent`` per image
  (``is_final: true``, in image order), then ``data: [DONE]``.
- OpenAI dialect (the request has ``partial_images``): ``event: image_generation.partial_image``,
  exactly ``partial_images`` per image (fewer only when the job has fewer preview steps, or when
  the stream joined a running job late or was answered from the cache), spread evenly over the
  steps; then ``event: image_generation.completed`` per image; no ``[DONE]``, as upstream.
  For n > 1 every event also carries ``image_index``; ``partial_image_index`` counts per image.
- An error after the 200: one ``event: error`` whose data has a truthy ``error`` object (the SDK
  raises ``openai.APIError``), then the stream ends. Heartbeats are SSE comments (``: ping``).
- Event ids: with the Redis backend every job event has an id (its entry in the job's stream), sent
  as the SSE ``id:`` of the last SSE event it became; ``GET /v1/images/jobs/{id}/events`` with
  ``Last-Event-ID`` resumes after it on any API node (``server.openai_api.resume``).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from PIL import Image
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from server.core import files
from server.core.errors import ServerError
from server.core.events import EventKind, PreviewImage, Subscriber
from server.openai_api.b64body import Piece, Slots, pieces
from server.openai_api.errors import SERVER, error_body
from server.core.jobs import JobRecord, JobStatus
from server.openai_api.schemas import CompletedEvent, ErrorBody, ErrorEvent, PartialImageEvent, StepEvent, Usage
from server.core.spec import JobSpec

log = logging.getLogger(__name__)
SEP = "\n"
GENERATION, EDIT = "image_generation", "image_edit"  # the OpenAI dialect's event family per route
PARTIAL_EVENT = "image_generation.partial_image"
COMPLETED_EVENT = "image_generation.completed"


@dataclass(frozen=True)
class StreamContext:
    """What every event of one stream repeats."""

    job_id: str
    spec: JobSpec
    size: str
    quality: str
    output_format: str
    compression: int
    usage: Usage
    created_at: int
    family: str = GENERATION  # EDIT: ``image_edit.partial_image`` / ``image_edit.completed``


@dataclass(frozen=True)
class FinalImage:
    index: int
    b64: str  # in the stream's output format; from ``final_images``: a token of its ``Slots``
    seed: int | None = None
    upscaled_b64: str | None = None


class JsonEvent(ServerSentEvent):
    """An event whose data is one line of JSON (``model_dump_json`` escapes every newline), so it
    encodes without the generic per-line regex split: byte-identical output, but ~0.6 ms instead
    of ~30 ms on the event loop for a final 1024x1024 image (4 MB of base64); see BENCHMARKS.md."""

    def encode(self) -> bytes:
        head = f"event: {self.event}{self._sep}" if self.event is not None else ""
        if self.id is not None:  # same line and order as ServerSentEvent.encode (ids never hold newlines)
            head = f"id: {self.id}{self._sep}{head}"
        return f"{head}data: {self.data}{self._sep}{self._sep}".encode()


def sse(model: BaseModel, event: str | None = None, exclude_none: bool = True) -> ServerSentEvent:
    """One event; optional extension fields that are unset are left out of the JSON."""
    return JsonEvent(data=model.model_dump_json(exclude_none=exclude_none), event=event, sep=SEP)


def done_event() -> ServerSentEvent:
    return ServerSentEvent(data="[DONE]", sep=SEP)


def ping_event() -> ServerSentEvent:
    """A heartbeat: a comment line, which every SSE client skips (an event without data would
    crash the Python SDK)."""
    return ServerSentEvent(comment="ping", sep=SEP)


def error_event(body: ErrorBody) -> ServerSentEvent:
    return sse(ErrorEvent(error=body), event="error", exclude_none=False)  # the envelope keeps param/code


async def preview_b64(preview: PreviewImage, fmt: str, quality: int) -> str:
    """The preview in ``fmt``: previews arrive as PNG; others are re-encoded off the loop."""
    if fmt == "png":
        return preview.png_b64
    return await asyncio.to_thread(_reencode, preview.png_b64, fmt, quality)


def _reencode(png_b64: str, fmt: str, quality: int) -> str:
    with Image.open(io.BytesIO(base64.b64decode(png_b64))) as image:
        return files.to_b64(files.encode_image(image, fmt, quality))


def preview_steps(spec: JobSpec) -> list[int]:
    """The steps at which the job's generator emits a preview (per image)."""
    if spec.preview_method == "none":
        return []
    run = spec.steps_run  # an edit runs steps x strength of its steps
    return [s for s in range(1, run + 1) if s % spec.preview_interval == 0 or s == run]


def partial_targets(spec: JobSpec, wanted: int) -> list[int]:
    """Steps for ``wanted`` partial images, evenly spread; the last step is left to ``completed``
    unless there would be too few preview steps otherwise."""
    steps = preview_steps(spec)
    candidates = steps[:-1] if len(steps) > wanted else steps
    count = min(wanted, len(candidates))
    return [candidates[(j + 1) * len(candidates) // (count + 1)] for j in range(count)]


class StepDialect:
    """The step events: every preview, then the final image(s), then ``[DONE]``."""

    def __init__(self, ctx: StreamContext):
        self.ctx = ctx

    async def preview(self, preview: PreviewImage, timestamp: float) -> list[ServerSentEvent]:
        ctx = self.ctx
        done = preview.image_index * preview.total_steps + preview.step
        progress = round(100.0 * done / (ctx.spec.n * preview.total_steps), 1)
        image = await preview_b64(preview, ctx.output_format, ctx.compression)
        return [sse(StepEvent(job_id=ctx.job_id, index=preview.image_index, step=preview.step,
                              total_steps=preview.total_steps, progress=progress, image=image,
                              timestamp=preview.produced_at or timestamp, is_final=False,
                              output_format=ctx.output_format))]

    def completed(self, images: list[FinalImage]) -> list[ServerSentEvent]:
        ctx, now = self.ctx, time.time()
        events = [sse(StepEvent(job_id=ctx.job_id, index=img.index, step=ctx.spec.steps_run, total_steps=ctx.spec.steps_run,
                                progress=100.0, image=img.b64, timestamp=now, is_final=True,
                                output_format=ctx.output_format, seed=img.seed, upscaled_image=img.upscaled_b64))
                  for img in images]
        return [*events, done_event()]


class OpenAIDialect:
    """The OpenAI events: ``partial_images`` partials per image, then one ``completed`` each."""

    def __init__(self, ctx: StreamContext, partial_images: int):
        self.ctx = ctx
        self.targets = partial_targets(ctx.spec, partial_images)
        self.sent: dict[int, int] = {}  # image index -> partials sent

    async def preview(self, preview: PreviewImage, timestamp: float) -> list[ServerSentEvent]:
        sent = self.sent.get(preview.image_index, 0)
        # Usually one target per preview; a preview that passes several (coalesced previews of a
        # slow reader, or a late join) stands in for each, so the count stays exact.
        due = [j for j in range(sent, len(self.targets)) if preview.step >= self.targets[j]]
        if not due:
            return []
        ctx = self.ctx
        image = await preview_b64(preview, ctx.output_format, ctx.compression)
        self.sent[preview.image_index] = sent + len(due)
        kind = f"{ctx.family}.partial_image"
        return [sse(PartialImageEvent(type=kind, b64_json=image, partial_image_index=j, created_at=int(timestamp),
                                      size=ctx.size, quality=ctx.quality, output_format=ctx.output_format,
                                      image_index=preview.image_index, job_id=ctx.job_id), event=kind)
                for j in due]

    def completed(self, images: list[FinalImage]) -> list[ServerSentEvent]:
        ctx, now = self.ctx, int(time.time())
        kind = f"{ctx.family}.completed"
        return [sse(CompletedEvent(type=kind, b64_json=img.b64, created_at=now, size=ctx.size, quality=ctx.quality,
                                   output_format=ctx.output_format, usage=ctx.usage, image_index=img.index,
                                   job_id=ctx.job_id, seed=img.seed, upscaled_b64_json=img.upscaled_b64),
                    event=kind)
                for img in images]


Dialect = StepDialect | OpenAIDialect


def with_event_id(items: list[ServerSentEvent], event_id: str | None) -> list[ServerSentEvent]:
    """Put the job event's id (``JobEvent.event_id``, set by the Redis backend) on the LAST SSE event
    it became: a client that resumes with ``Last-Event-ID`` then gets again a job event whose SSE
    events it did not all receive (e.g. the final images of n > 1), and never one it did."""
    if items and event_id is not None:
        items[-1].id = event_id
    return items


async def job_events(subscriber: Subscriber, dialect: Dialect,
                     load_final: Callable[[JobRecord], Awaitable[tuple[list[FinalImage], Slots]]],
                     failure: Callable[[JobRecord], ServerError]) -> AsyncIterator[ServerSentEvent | bytes]:
    """The stream of one job for one dialect, until (and including) its last event.

    Progress events are not sent (previews carry the progress); the terminal status decides
    between the final events and one in-band error. Final events come as bytes in pieces, their
    base64 made while they are sent (``b64body``; send them with ``GatedEventSourceResponse``).
    The caller closes the subscriber.
    """
    # First bytes at once, even while the job waits for the GPU: a comment, which every SSE client
    # skips, so neither dialect's events change (issue #7, time to first byte).
    yield ServerSentEvent(comment=f"job {subscriber.job_id}", sep=SEP)
    open_event = False
    try:
        async for event in subscriber:
            if event.kind is EventKind.PREVIEW and event.preview is not None:
                for item in with_event_id(await dialect.preview(event.preview, event.timestamp), event.event_id):
                    yield item
            elif event.is_terminal:
                record = event.record
                if record.status is not JobStatus.COMPLETED:
                    yield with_event_id([error_event(error_body(failure(record)))], event.event_id)[0]
                    return
                finals, slots = await load_final(record)
                for item in with_event_id(dialect.completed(finals), event.event_id):
                    async for piece in pieces(slots.parts(item.encode().decode())):
                        open_event = isinstance(piece, Piece)
                        yield piece
                return
    except ServerError as exc:
        if open_event:  # half an event is on the wire: nothing can follow it; the connection ends
            raise
        log.warning("job %s: stream ended with an error: %s", subscriber.job_id[:12], exc.message)
        yield error_event(error_body(exc))
    except Exception:  # after the 200 an error can only travel in-band
        if open_event:
            raise
        log.exception("job %s: the stream failed", subscriber.job_id[:12])
        yield error_event(ErrorBody(message="internal server error", type=SERVER, code="internal_error"))


class EventGate:
    """Keeps heartbeats out of an event sent in pieces (``b64body.Piece``): sse_starlette sends its
    pings from another task, between any two body chunks, and one inside an event would corrupt it.
    A ping due while an event is open is dropped: the event's own bytes are traffic enough."""

    def __init__(self) -> None:
        self.open = False
        self._ping = ping_event().encode()

    def guard(self, send):
        async def guarded(message) -> None:
            if self.open and message.get("body") == self._ping:
                return
            await send(message)
        return guarded

    async def watch(self, items: AsyncIterator) -> AsyncIterator:
        """``items`` as they are; an event counts as open from its first piece until its last
        piece was sent (the response asks for the next item only after sending this one)."""
        try:
            async for item in items:
                self.open = self.open or isinstance(item, Piece)
                yield item
                self.open = isinstance(item, Piece)
        finally:  # run the source's cleanup now, not whenever it is collected
            await items.aclose()


class GatedEventSourceResponse(EventSourceResponse):
    """``EventSourceResponse`` for ``job_events``: its heartbeats never land inside an event."""

    def __init__(self, content: AsyncIterator, **kwargs) -> None:
        self.gate = EventGate()
        super().__init__(self.gate.watch(content), ping_message_factory=ping_event, sep=SEP, **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        await super().__call__(scope, receive, self.gate.guard(send))
