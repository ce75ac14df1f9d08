"""Running one job: GPU stage, step events, file writing, upscaling.

The GPU is owned by one thread (``gpu`` executor) and guarded by an asyncio lock so generation and
upscaling never overlap on the device, while up to ``max_in_flight`` jobs are between 'taken from the
queue' and 'files written': one job's PNG encoding and file writes overlap the next job's denoising.

Step events leave the GPU thread at once: the step callback only submits them to a one-thread
'post' executor, which encodes previews and hands the events to the loop. Because that executor is
FIFO, draining it (``_drain_steps``) before announcing a status keeps every preview ahead of the
status that follows it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import TYPE_CHECKING

from server.core import files
from server.core.errors import AdapterRejected, JobCancelled, OutOfMemory, ServerError
from server.core.events import EventKind, JobEvent, PreviewImage
from server.core.generation import StepUpdate
from server.core.jobs import ImageFile, JobRecord, JobResult, Progress
from server.core.ports import ActiveJob, JobHost
from server.core.states import FAILURE_MESSAGES, UPSCALE_STOP_REASONS, FailureCode, JobStatus

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)


class JobRunner:
    """Runs one job at a time per call of ``run``, on behalf of a ``JobHost`` (server.core.ports)."""

    def __init__(self, host: JobHost, generator, upscaler):
        self._host = host
        self._generator = generator
        self._upscaler = upscaler
        self._gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        self._gpu_lock = asyncio.Lock()
        self._post = ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-events")
        self._cpu = ThreadPoolExecutor(max_workers=2, thread_name_prefix="encode")
        self._loop: asyncio.AbstractEventLoop | None = None  # bound by the host's start
        self.gpu_busy_s = 0.0  # total time the generator/upscaler ran: for throughput measurements

    def shutdown(self) -> None:
        self._gpu.shutdown(wait=False, cancel_futures=True)
        self._post.shutdown(wait=False, cancel_futures=True)
        self._cpu.shutdown(wait=False, cancel_futures=True)

    async def run(self, active: ActiveJob) -> None:
        host = self._host
        async with self._gpu_lock:
            if active.record.status is not JobStatus.PENDING:
                return  # cancelled while waiting for the GPU
            await host.move(active, JobStatus.PROCESSING)
            active.started_at = time.monotonic()
            images, error = await self._on_gpu(active, self._generate, active)
        await self._drain_steps()
        if error is not None:
            status, message, failure = _failure(active, error)
            await host.finish(active, status, error=message, failure=failure)
            return
        generation_s = time.monotonic() - active.started_at
        try:
            names = await self._save(active, images, upscaled=False)
        except OSError as exc:
            await host.finish(active, JobStatus.FAILED, error=f"could not write the image: {exc.strerror or exc}",
                              failure=FailureCode.STORAGE)
            return
        result = JobResult(images=tuple(ImageFile(name) for name in names),
                           seeds=tuple(active.record.spec.seed + i for i in range(len(names))),
                           generation_s=round(generation_s, 3))
        if not active.record.spec.upscale:
            await host.finish(active, JobStatus.COMPLETED, result=result)
            return
        await host.move(active, JobStatus.GENERATED, result=result)
        await host.finish(active, JobStatus.COMPLETED, result=await self._upscaled(active, images, result))

    async def _on_gpu(self, active, fn, *args):
        """Run ``fn`` on the GPU thread; return (value, None) or (None, exception)."""
        started = time.monotonic()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._gpu, fn, *args), None
        except (JobCancelled, ServerError) as exc:
            return None, exc
        except Exception as exc:  # one job's failure must not stop the worker
            log.exception("job %s: the GPU stage raised", active.job_id[:12])
            return None, exc
        finally:
            self.gpu_busy_s += time.monotonic() - started

    def _generate(self, active: ActiveJob) -> "list[Image]":
        loop_call = self._loop.call_soon_threadsafe
        request = active.record.spec.generation_request(self._host.config.preview_max_side, self._host.config.output_dir)

        def on_step(update: StepUpdate) -> None:
            self._post.submit(self._emit_step, active, update, time.time(), loop_call)

        return self._generator.generate(request, on_step, active.cancel_flag.is_set)

    async def _drain_steps(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._post, lambda: None)

    def _emit_step(self, active: ActiveJob, update: StepUpdate, at: float, loop_call) -> None:
        """Post thread: build the progress (and preview) events, then publish them on the loop."""
        spec = active.record.spec
        overall = update.image_index * update.total_steps + update.step
        elapsed = max(1e-6, time.monotonic() - active.started_at)
        progress = Progress(image_index=update.image_index, step=update.step, total_steps=update.total_steps,
                            overall_step=overall, overall_total=spec.n * update.total_steps,
                            elapsed_s=elapsed, seconds_per_step=elapsed / overall)
        events = [JobEvent(EventKind.PROGRESS, active.job_id, progress=progress, timestamp=at)]
        if update.preview is not None:
            data = files.encode_image(update.preview, "png", png_level=1)
            preview = PreviewImage(update.image_index, update.step, update.total_steps, files.to_b64(data),
                                   update.preview.width, update.preview.height, produced_at=at)
            events.append(JobEvent(EventKind.PREVIEW, active.job_id, preview=preview, timestamp=at))
        loop_call(self._publish_steps, active, events)

    def _publish_steps(self, active: ActiveJob, events: list[JobEvent]) -> None:
        if active.record.status is not JobStatus.PROCESSING:
            return  # late step events of a job that already moved on
        metrics = self._host.metrics
        if metrics is not None:
            metrics.preview_latency.observe(max(0.0, time.time() - events[0].timestamp))
            step = events[0].progress
            metrics.step_seconds.observe(step.seconds_per_step)
        for event in events:
            if event.kind is EventKind.PREVIEW:
                active.latest_preview = event
            self._host.publish_step(active, event)

    async def _save(self, active: ActiveJob, images: "list[Image]", upscaled: bool) -> list[str]:
        spec, config = active.record.spec, self._host.config
        names = [files.output_filename(spec.prompt, active.job_id, i, len(images), upscaled, active.record.created_at)
                 for i in range(len(images))]

        def write_all() -> None:
            for name, image in zip(names, images):
                files.write_atomic(config.output_dir, name, files.encode_image(image, "png", png_level=config.png_compress_level))

        await asyncio.get_running_loop().run_in_executor(self._cpu, write_all)
        return names

    async def _upscaled(self, active: ActiveJob, images: "list[Image]", result: JobResult) -> JobResult:
        """The result with upscaled files; on any failure the original images stay and the reason
        is recorded: a user's finished image is never thrown away."""
        if self._upscaler is None:
            return JobResult(result.images, result.seeds, "upscaling is not available on this server", result.generation_s)
        stop = active.cancel_flag.is_set  # a cancel or shutdown stops the upscale within one tile
        async with self._gpu_lock:
            big, error = await self._on_gpu(active, lambda: [self._upscaler.upscale(image, stop) for image in images])
        if isinstance(error, JobCancelled):
            return JobResult(result.images, result.seeds, upscale_stopped(active.cancel_cause), result.generation_s)
        if error is None:
            try:
                names = await self._save(active, big, upscaled=True)
                pairs = tuple(ImageFile(img.filename, name) for img, name in zip(result.images, names))
                return JobResult(pairs, result.seeds, None, result.generation_s)
            except OSError as exc:
                error = exc
        log.warning("job %s: upscaling failed: %s", active.job_id[:12], error)
        return JobResult(result.images, result.seeds, f"upscaling failed: {_describe(error)}", result.generation_s)

    @property
    def can_upscale(self) -> bool:
        return self._upscaler is not None

    async def upscale_saved(self, active: ActiveJob) -> None:
        """Finish a generated job whose upscale has not run (the process died during it, or a repeat
        request retries a failed one): read its saved images back, upscale, complete. The images
        are never generated again; if they cannot be read the job completes without the upscale."""
        result = active.record.result
        active.started_at = time.monotonic()
        try:
            images = await asyncio.get_running_loop().run_in_executor(
                self._cpu, _load_saved, self._host.config.output_dir, result)
        except OSError as exc:
            log.warning("job %s: the generated image could not be read back: %s", active.job_id[:12], exc)
            reason = f"upscaling failed: the generated image could not be read ({_describe(exc)})"
            result = replace(result, upscale_error=reason)
            await self._host.finish(active, JobStatus.COMPLETED, result=result)
            return
        await self._host.finish(active, JobStatus.COMPLETED, result=await self._upscaled(active, images, result))

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop


def _load_saved(directory, result: JobResult) -> "list[Image]":
    """The job's saved (not upscaled) images, decoded. Raises ``OSError`` when one is missing."""
    from PIL import Image

    images = []
    for image in result.images:
        path = files.resolve_output(directory, image.filename)
        if path is None:
            raise FileNotFoundError(2, "no such file", image.filename)
        with Image.open(path) as opened:
            images.append(opened.convert("RGB"))
    return images


def _failure(active: ActiveJob, error: BaseException) -> tuple[JobStatus, str, FailureCode]:
    """(status, error message, failure code) for a GPU stage that raised ``error``."""
    if isinstance(error, JobCancelled):
        cause = active.cancel_cause
        if cause is FailureCode.CANCELLED:
            return JobStatus.CANCELLED, "cancelled", cause
        return JobStatus.FAILED, FAILURE_MESSAGES.get(cause, cause.value), cause  # stopped by shutdown, not a user
    if isinstance(error, OutOfMemory):
        return JobStatus.FAILED, _describe(error), FailureCode.OUT_OF_MEMORY
    if isinstance(error, AdapterRejected):
        return JobStatus.FAILED, _describe(error), FailureCode.INVALID_ADAPTER
    if isinstance(error, ServerError):
        return JobStatus.FAILED, _describe(error), FailureCode.GENERATION_FAILED
    if isinstance(error, OSError):
        return JobStatus.FAILED, _describe(error), FailureCode.STORAGE
    return JobStatus.FAILED, _describe(error), FailureCode.INTERNAL


def upscale_stopped(cause: FailureCode) -> str:
    """The ``upscale_error`` of a job whose upscale was stopped: the job completes with its image."""
    return f"upscaling stopped: {UPSCALE_STOP_REASONS.get(cause, cause.value)}"


def shutdown_outcome(active: ActiveJob) -> dict:
    """``finish`` arguments for a job the server stops: a generated job completes with its image
    (its upscale stopped); any other fails with ``SHUTDOWN`` (kept for the next start, see
    ``stored_form``) - unless its user's cancel was already pending: that cancel stands."""
    record = active.record
    cause = active.cancel_cause if active.cancel_flag.is_set() else FailureCode.SHUTDOWN
    if record.status is JobStatus.GENERATED and record.result is not None:
        return dict(status=JobStatus.COMPLETED, result=replace(record.result, upscale_error=upscale_stopped(cause)))
    if cause is FailureCode.CANCELLED:
        return dict(status=JobStatus.CANCELLED, error=FAILURE_MESSAGES[cause], failure=cause)
    return dict(status=JobStatus.FAILED, error=FAILURE_MESSAGES[FailureCode.SHUTDOWN], failure=FailureCode.SHUTDOWN)


def stored_form(previous: JobRecord, record: JobRecord) -> JobRecord | None:
    """What the job store keeps of a move from ``previous`` to ``record`` (None: nothing to write).

    A job the server stops fails for its clients (``shutting_down``) but stays unfinished in the
    store, so the next start runs it (``states.RECOVERY``; issue #15): a queued one as it is stored;
    a running one queued again as a new attempt, first in line (a pending job's queue time is its
    ``updated_at``; it was ahead of every queued job). A graceful stop is not a process death: it
    does not count toward ``max_restarts``, which a job left ``processing`` would."""
    if record.status is not JobStatus.FAILED or record.failure is not FailureCode.SHUTDOWN:
        return record
    if previous.status is JobStatus.PROCESSING:
        return replace(previous.moved_to(JobStatus.PENDING, attempt=previous.attempt + 1), updated_at=previous.created_at)
    return None


def report_finished(record: JobRecord, metrics) -> None:
    """The one log line and metric of a job reaching a terminal status (every host calls it)."""
    if metrics is not None:
        metrics.jobs_finished.labels(record.status.value).inc()
    log.info("job %s: %s%s", record.job_id[:12], record.status.value, f" ({record.error})" if record.error else "")


def _describe(error: BaseException) -> str:
    if isinstance(error, ServerError):
        return error.message
    if isinstance(error, OSError):
        return f"I/O error: {error.strerror or error}"
    return "internal error during generation"
