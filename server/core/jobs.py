"""Job records: immutable snapshots of a job, replaced on every state change.

Every change goes through ``JobRecord.moved_to``, which checks it against the transition table in
``server.core.states`` (the statuses, failure codes and restart rule live there). A failed or
cancelled job may be resubmitted, which starts it over as ``pending`` under the same job id.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

from server.core.spec import JobSpec
from server.core.states import FailureCode, JobStatus, check_transition

__all__ = ["FailureCode", "ImageFile", "JobRecord", "JobResult", "JobStatus", "Progress"]


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
    error: str | None = None  # for people: what went wrong, in words
    failure: FailureCode | None = None  # for programs: why a failed/cancelled job ended
    owner: str | None = None  # the API key's fingerprint when keys are on: scopes visibility
    attempt: int = 1

    def moved_to(self, status: JobStatus, **changes) -> "JobRecord":
        check_transition(self.job_id, self.status, status)
        return replace(self, status=status, updated_at=time.time(), **changes)

    @property
    def upscale_missing(self) -> bool:
        """Completed, asked for an upscale and got none (``result.upscale_error``: the upscale failed
        or was cut short). A repeat of the request runs it again where the server can upscale."""
        return (self.status is JobStatus.COMPLETED and self.spec.upscale and self.result is not None
                and self.result.upscale_error is not None)

    def upscale_retry(self) -> "JobRecord":
        """The record that runs a missing upscale again (completed -> generated, a new attempt,
        ``upscale_error`` cleared); its generated images stay as they are."""
        return self.moved_to(JobStatus.GENERATED, attempt=self.attempt + 1,
                             result=replace(self.result, upscale_error=None))


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
