"""Job records and the job state machine.

Every state change goes through ``check_transition``: the table below is the only place that says
which changes are legal. A failed or cancelled job may be resubmitted, which starts it over as
``pending`` (the same job id: the id is the spec's hash).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

from server.core.errors import IllegalTransition
from server.core.spec import JobSpec


class JobStatus(str, Enum):
    PENDING = "pending"  # queued, waiting for the GPU
    PROCESSING = "processing"  # denoising on the GPU
    GENERATED = "generated"  # image saved; upscaling under way
    COMPLETED = "completed"  # all files written; result final
    FAILED = "failed"  # error recorded; resubmitting runs it again
    CANCELLED = "cancelled"  # nobody wanted it any more; resubmitting runs it again

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)

    @property
    def is_active(self) -> bool:
        return not self.is_terminal


TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.PENDING: frozenset({JobStatus.PROCESSING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.PROCESSING: frozenset({JobStatus.GENERATED, JobStatus.COMPLETED, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.GENERATED: frozenset({JobStatus.COMPLETED, JobStatus.FAILED}),
    JobStatus.COMPLETED: frozenset(),
    JobStatus.FAILED: frozenset({JobStatus.PENDING}),  # resubmission
    JobStatus.CANCELLED: frozenset({JobStatus.PENDING}),  # resubmission
}
# pending -> failed exists for shutdown and restart recovery only: work that never ran is not lost
# silently, it is reported.


def check_transition(job_id: str, current: JobStatus, new: JobStatus) -> None:
    if new not in TRANSITIONS[current]:
        raise IllegalTransition(f"job {job_id[:12]}: {current.value} -> {new.value} is not allowed")


@dataclass(frozen=True)
class ImageFile:
    filename: str
    upscaled_filename: str | None = None


@dataclass(frozen=True)
class JobResult:
    images: tuple[ImageFile, ...]
    seeds: tuple[int, ...]
    upscale_error: str | None = None  # the job completed, without its upscaled image, for this reason
    generation_s: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobResult":
        images = tuple(ImageFile(**image) for image in data["images"])
        return cls(images=images, seeds=tuple(data["seeds"]), upscale_error=data.get("upscale_error"),
                   generation_s=data.get("generation_s", 0.0))


@dataclass(frozen=True)
class JobRecord:
    """An immutable snapshot of one job; the engine replaces it on every change."""

    job_id: str
    spec: JobSpec
    status: JobStatus
    created_at: float
    updated_at: float
    result: JobResult | None = None
    error: str | None = None
    owner: str | None = None  # the API key's fingerprint when keys are on: scopes visibility
    attempt: int = 1

    def moved_to(self, status: JobStatus, **changes) -> "JobRecord":
        check_transition(self.job_id, self.status, status)
        return replace(self, status=status, updated_at=time.time(), **changes)


@dataclass
class Progress:
    """Per-step progress over all ``n`` images of a job."""

    image_index: int
    step: int
    total_steps: int
    overall_step: int
    overall_total: int
    elapsed_s: float
    seconds_per_step: float
    extra: dict = field(default_factory=dict)

    @property
    def percentage(self) -> int:
        return int(100 * self.overall_step / max(1, self.overall_total))

    @property
    def remaining_s(self) -> float:
        return max(0.0, (self.overall_total - self.overall_step) * self.seconds_per_step)
