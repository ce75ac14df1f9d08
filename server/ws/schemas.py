"""Wire schemas of the WebSocket job protocol (``WS /api/ws``): every client message and every
server push, plus the pure functions that render engine objects as pushes.

Client messages (JSON objects with a ``type``; ``request_id`` is echoed on the reply):
    create_job       -> job_status (the job's current status), then pushes
    get_status       -> job_status
    cancel_job       -> cancel_result
    get_client_jobs  -> client_jobs
Server pushes: job_status, job_progress, job_preview (only for jobs created with
``params.preview: true``), error.

Rendered messages are dumped with ``exclude_unset``: a field that does not apply to a message is
absent, while a field set to None (``upscaled_filename`` after a failed upscale) is sent as null.
"""

from __future__ import annotations

from typing import Any, Literal, Union, get_origin

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from pydantic_core import PydanticUndefined

from server.core.events import PreviewImage
from server.core.jobs import JobRecord, JobStatus, Progress
from server.core.spec import TASK_TEXT_TO_IMAGE

RequestId = Union[str, int, None]
PROTOCOL_SEED = 42  # the protocol's documented default seed: repeated requests are one job


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    def model_post_init(self, context: Any) -> None:
        # Constant fields (``type``, ``stage``...) count as set, so ``dump`` always sends them.
        self.__pydantic_fields_set__.update(_constant_fields(type(self)))


def _constant_fields(model: type[BaseModel]) -> tuple[str, ...]:
    return tuple(name for name, info in model.model_fields.items()
                 if get_origin(info.annotation) is Literal and info.default is not PydanticUndefined)


# -- client messages ----------------------------------------------------------------------------

class LoraParam(_Message):
    name: str = Field(max_length=200)
    weight: StrictFloat | StrictInt = 1.0


class CreateJobParams(_Message):
    """``None`` means 'the model's default' (size, steps, guidance, variant come from its profile)."""

    prompt: str
    negative_prompt: str | None = None
    model: str | None = None
    model_type: str | None = None
    # Strict, as over HTTP: ``true`` is not a guidance scale and ``"4"`` is not a step count.
    width: StrictInt | None = None
    height: StrictInt | None = None
    steps: StrictInt | None = None
    guidance_scale: StrictFloat | None = None
    seed: StrictInt | None = PROTOCOL_SEED  # an explicit null asks for a random seed
    upscale: StrictBool = True
    preview: StrictBool = False  # not part of the job: it only says whether this client wants previews
    # task_type image_to_image (server.ws.edits): the input as base64 or an earlier output's file name,
    # an optional mask (PNG, alpha 0 = edit) likewise, and the strength (0 < s <= 1; default 0.6, 1.0 with a mask)
    image: str | None = None
    image_filename: str | None = None
    mask: str | None = None
    mask_filename: str | None = None
    strength: StrictFloat | StrictInt | None = None
    loras: list[LoraParam] | None = None  # [{"name", "weight"}]: adapters of GET /v1/loras, weight -2..2


class CreateJob(_Message):
    type: Literal["create_job"]
    request_id: RequestId = None
    task_type: str = TASK_TEXT_TO_IMAGE
    params: CreateJobParams


class GetStatus(_Message):
    type: Literal["get_status"]
    request_id: RequestId = None
    job_id: str = Field(min_length=1, max_length=128)


class CancelJob(_Message):
    type: Literal["cancel_job"]
    request_id: RequestId = None
    job_id: str = Field(min_length=1, max_length=128)


class GetClientJobs(_Message):
    type: Literal["get_client_jobs"]
    request_id: RequestId = None


CLIENT_MESSAGES: dict[str, type[_Message]] = {
    "create_job": CreateJob,
    "get_status": GetStatus,
    "cancel_job": CancelJob,
    "get_client_jobs": GetClientJobs,
}


# -- server pushes ------------------------------------------------------------------------------

class JobResultPayload(_Message):
    filename: str
    local_path: str  # '<output dir name>/<filename>': never a path outside the output dir
    path: str  # the same as local_path, as the protocol was first documented
    url: str  # the URL path that serves it: /api/image/<filename>
    upscaled_filename: str | None = None
    upscaled_path: str | None = None  # '<output dir name>/<upscaled filename>', like path
    upscaled_url: str | None = None
    upscale_error: str | None = None  # why the job completed without its upscaled image
    seed: int | None = None


class JobStatusMessage(_Message):
    type: Literal["job_status"] = "job_status"
    job_id: str
    status: JobStatus
    request_id: RequestId = None  # replies: the request's; pushes: the create_job that made this client follow
    queue_position: int | None = None  # pending only: 0 = next to run
    result: JobResultPayload | None = None  # generated and completed
    error: str | None = None  # failed
    reason: str | None = None  # cancelled


class ProgressPayload(_Message):
    type: Literal["progress"] = "progress"
    stage: Literal["generating"] = "generating"
    percentage: int
    current_step: int
    total_steps: int
    elapsed: str  # MM:SS
    remaining: str  # MM:SS
    speed: str  # "3.75s/it", or "4.20it/s" when faster than one step per second


class JobProgressMessage(_Message):
    type: Literal["job_progress"] = "job_progress"
    job_id: str
    progress: ProgressPayload
    request_id: RequestId = None  # as on job_status pushes


class PreviewPayload(_Message):
    image: str  # base64 PNG
    format: Literal["png"] = "png"
    image_index: int
    step: int
    total_steps: int
    width: int
    height: int


class JobPreviewMessage(_Message):
    type: Literal["job_preview"] = "job_preview"
    job_id: str
    preview: PreviewPayload


class CancelResultMessage(_Message):
    type: Literal["cancel_result"] = "cancel_result"
    job_id: str
    cancelled: bool  # True: the job is (or will be, at its next step) cancelled
    withdrawn: bool  # True: only this client's interest was withdrawn; the job goes on for others
    status: JobStatus  # the job's status when the cancel was handled
    message: str
    request_id: RequestId = None


class ClientJob(_Message):
    job_id: str
    task_type: str
    status: JobStatus
    created_at: float  # Unix time, seconds
    result: JobResultPayload | None = None
    error: str | None = None


class ClientJobsMessage(_Message):
    type: Literal["client_jobs"] = "client_jobs"
    jobs: list[ClientJob]
    request_id: RequestId = None


class ErrorMessage(_Message):
    type: Literal["error"] = "error"
    message: str
    code: str
    request_id: RequestId = None
    param: str | None = None
    retry_after_s: int | None = None  # queue_full / client_queue_full: the queue's expected drain time


def dump(message: _Message) -> dict[str, Any]:
    return message.model_dump(mode="json", exclude_unset=True)


# -- rendering engine objects -------------------------------------------------------------------

def mm_ss(seconds: float) -> str:
    """``MM:SS``; minutes grow past 59 rather than adding an hours field."""
    total = max(0, int(round(seconds)))
    return f"{total // 60:02d}:{total % 60:02d}"


def speed_text(seconds_per_step: float) -> str:
    if seconds_per_step >= 1.0:
        return f"{seconds_per_step:.2f}s/it"
    return f"{1.0 / max(seconds_per_step, 1e-9):.2f}it/s"


def result_payload(record: JobRecord, output_name: str) -> JobResultPayload | None:
    """The first image of the job (the WebSocket protocol creates one image per job)."""
    if record.result is None or not record.result.images:
        return None
    image = record.result.images[0]
    local_path = f"{output_name}/{image.filename}"
    payload = JobResultPayload(filename=image.filename, local_path=local_path, path=local_path,
                               url=f"/api/image/{image.filename}",
                               seed=record.result.seeds[0] if record.result.seeds else None)
    if record.status is JobStatus.COMPLETED:
        upscaled = image.upscaled_filename
        payload.upscaled_filename = upscaled
        payload.upscaled_path = f"{output_name}/{upscaled}" if upscaled else None
        payload.upscaled_url = f"/api/image/{upscaled}" if upscaled else None
        payload.upscale_error = record.result.upscale_error
    return payload


def status_message(record: JobRecord, output_name: str, queue_position: int | None = None,
                   request_id: RequestId = None) -> JobStatusMessage:
    message = JobStatusMessage(job_id=record.job_id, status=record.status)
    if request_id is not None:
        message.request_id = request_id
    if record.status is JobStatus.PENDING:
        message.queue_position = queue_position
    elif record.status in (JobStatus.GENERATED, JobStatus.COMPLETED):
        message.result = result_payload(record, output_name)
    elif record.status is JobStatus.FAILED:
        message.error = record.error or "failed"
    elif record.status is JobStatus.CANCELLED:
        message.reason = record.error or "cancelled"
    return message


def progress_message(job_id: str, progress: Progress, request_id: RequestId = None) -> JobProgressMessage:
    payload = ProgressPayload(percentage=progress.percentage, current_step=progress.overall_step,
                              total_steps=progress.overall_total, elapsed=mm_ss(progress.elapsed_s),
                              remaining=mm_ss(progress.remaining_s), speed=speed_text(progress.seconds_per_step))
    message = JobProgressMessage(job_id=job_id, progress=payload)
    if request_id is not None:
        message.request_id = request_id
    return message


def preview_message(job_id: str, preview: PreviewImage) -> JobPreviewMessage:
    payload = PreviewPayload(image=preview.png_b64, image_index=preview.image_index, step=preview.step,
                             total_steps=preview.total_steps, width=preview.width, height=preview.height)
    return JobPreviewMessage(job_id=job_id, preview=payload)


def client_job(record: JobRecord, output_name: str) -> ClientJob:
    job = ClientJob(job_id=record.job_id, task_type=record.spec.task_type, status=record.status,
                    created_at=record.created_at, result=result_payload(record, output_name))
    if record.status in (JobStatus.FAILED, JobStatus.CANCELLED):
        job.error = record.error
    return job
