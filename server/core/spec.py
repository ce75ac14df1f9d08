"""Job specs: the normalized request, and the job id that is its SHA-256.

Adapters build a ``SpecInput`` from their wire schema (one function each); ``normalize`` fills in the
model profile's defaults *before* hashing, so ``{"prompt": "x"}`` and the same request with every
default spelled out are the same spec and the same job.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import asdict, dataclass

from server.core.errors import InvalidRequest
from server.core.generation import GenerationRequest, preview_interval_for
from server.core.profiles import ModelProfile

TASK_TEXT_TO_IMAGE = "text_to_image"
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SpecInput:
    """What a client asked for; ``None`` means 'the model's default'."""

    prompt: str
    model: str
    model_type: str | None = None
    negative_prompt: str | None = None
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    n: int = 1
    upscale: bool = False
    task_type: str = TASK_TEXT_TO_IMAGE


@dataclass(frozen=True)
class JobSpec:
    """A fully normalized job. Its ``job_id`` is the idempotency key: equal specs are one job."""

    task_type: str
    model: str
    model_type: str | None
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    n: int
    upscale: bool
    preview_method: str
    preview_interval: int

    @property
    def job_id(self) -> str:
        canonical = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        return cls(**data)

    def generation_request(self, preview_max_side: int) -> GenerationRequest:
        return GenerationRequest(
            model=self.model, variant=self.model_type, prompt=self.prompt,
            negative_prompt=self.negative_prompt, width=self.width, height=self.height,
            steps=self.steps, guidance_scale=self.guidance_scale, seed=self.seed, n=self.n,
            preview_method=self.preview_method, preview_interval=self.preview_interval,
            preview_max_side=preview_max_side,
        )


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 4000
    max_n: int = 4
    preview_method: str = "fast"
    preview_percent: int = 10


def normalize(given: SpecInput, profile: ModelProfile, limits: Limits) -> JobSpec:
    """Validate ``given`` against the profile and limits; raise ``InvalidRequest`` naming the param.

    A missing seed becomes a random one, so such a job never matches an earlier one.
    """
    if given.task_type != TASK_TEXT_TO_IMAGE:
        raise InvalidRequest(f"task_type must be '{TASK_TEXT_TO_IMAGE}'", param="task_type")
    prompt = given.prompt.strip() if isinstance(given.prompt, str) else ""
    if not prompt:
        raise InvalidRequest("prompt must be a non-empty string", param="prompt")
    if len(prompt) > limits.max_prompt_chars:
        raise InvalidRequest(f"prompt is longer than {limits.max_prompt_chars} characters", param="prompt")
    variant = given.model_type or profile.default_variant
    if variant not in profile.variants:
        allowed = ", ".join(profile.variants)
        raise InvalidRequest(f"model_type '{variant}' is not available for {profile.model_id}; use one of: {allowed}", param="model_type")
    width = _checked_size(given.width, profile, "width")
    height = _checked_size(given.height, profile, "height")
    steps = profile.default_steps if given.steps is None else given.steps
    if not 1 <= steps <= profile.max_steps:
        raise InvalidRequest(f"steps must be between 1 and {profile.max_steps}", param="steps")
    guidance = profile.default_guidance if given.guidance_scale is None else float(given.guidance_scale)
    if not 0.0 <= guidance <= 30.0:
        raise InvalidRequest("guidance_scale must be between 0 and 30", param="guidance_scale")
    if not 1 <= given.n <= limits.max_n:
        raise InvalidRequest(f"n must be between 1 and {limits.max_n}", param="n")
    seed = secrets.randbelow(MAX_SEED) if given.seed is None else given.seed
    if not 0 <= seed <= MAX_SEED - given.n:
        raise InvalidRequest(f"seed must be between 0 and {MAX_SEED - given.n}", param="seed")
    negative = (given.negative_prompt or "").strip() or None
    if negative and len(negative) > limits.max_prompt_chars:
        raise InvalidRequest(f"negative_prompt is longer than {limits.max_prompt_chars} characters", param="negative_prompt")
    if not profile.supports_negative_prompt:
        negative = None  # the pipeline ignores it; keeping it would split otherwise-equal jobs
    return JobSpec(
        task_type=given.task_type, model=profile.model_id, model_type=variant, prompt=prompt,
        negative_prompt=negative, width=width, height=height, steps=steps, guidance_scale=guidance,
        seed=seed, n=given.n, upscale=bool(given.upscale), preview_method=limits.preview_method,
        preview_interval=preview_interval_for(steps, limits.preview_percent),
    )


def _checked_size(value: int | None, profile: ModelProfile, param: str) -> int:
    size = profile.default_size if value is None else value
    if not profile.min_size <= size <= profile.max_size or size % profile.size_multiple:
        raise InvalidRequest(
            f"{param} must be a multiple of {profile.size_multiple} between {profile.min_size} and "
            f"{profile.max_size} for {profile.model_id} (got {size})",
            param=param,
        )
    return size
