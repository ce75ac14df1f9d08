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
from pathlib import Path

from server.core import inputs
from server.core.errors import InvalidRequest
from server.core.generation import GenerationRequest, preview_interval_for, steps_run
from server.core.loras import LoraRef
from server.core.profiles import ModelProfile

TASK_TEXT_TO_IMAGE = "text_to_image"
TASK_IMAGE_TO_IMAGE = "image_to_image"
TASK_TYPES = (TASK_TEXT_TO_IMAGE, TASK_IMAGE_TO_IMAGE)
MAX_SEED = 2**63 - 1
# Edit-only fields: left out of the hash while unset, so text-to-image job ids stay what they were.
EDIT_FIELDS = ("image_sha", "mask_sha", "strength")
# Likewise LoRA adapters: left out while empty, so jobs without adapters keep their ids.
OPTIONAL_EMPTY_FIELDS = ("loras",)
# The strength an edit gets when it names none (documented in README "Image edits"): OpenAI's
# ``input_fidelity`` high keeps more of the input (less noise), low lets the prompt change more.
# Without a mask (img2img) diffusers' own default is 0.6; with one (inpaint) 1.0 repaints the
# masked area from scratch, which is what OpenAI's masked edits do.
DEFAULT_STRENGTH = {  # (has mask, input_fidelity) -> strength
    (False, None): 0.6, (False, "low"): 0.8, (False, "high"): 0.4,
    (True, None): 1.0, (True, "low"): 1.0, (True, "high"): 0.75,
}


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
    # image_to_image only: pixel hashes of the stored inputs (server.core.inputs), 0 < strength <= 1
    image_sha: str | None = None
    mask_sha: str | None = None
    strength: float | None = None
    input_fidelity: str | None = None  # "high" | "low": picks the default strength
    # LoRA adapters, already checked and pinned to their file hashes (``LoraDirectory.resolve``)
    loras: tuple[LoraRef, ...] = ()


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
    image_sha: str | None = None  # image_to_image: the input's pixel hash (server.core.inputs)
    mask_sha: str | None = None  # ... and the converted mask's (white = repaint); None: img2img
    strength: float | None = None
    loras: tuple[LoraRef, ...] = ()  # name, content sha256 and weight of each adapter, in request order

    @property
    def job_id(self) -> str:
        fields = {k: v for k, v in asdict(self).items()
                  if not (k in EDIT_FIELDS and v is None) and not (k in OPTIONAL_EMPTY_FIELDS and not v)}
        canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def steps_run(self) -> int:
        """Denoising steps the pipeline really runs (an edit runs ``steps x strength`` of them)."""
        return steps_run(self.steps, self.strength)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JobSpec":
        loras = tuple(LoraRef(**item) for item in data.get("loras") or ())
        return cls(**{**data, "loras": loras})

    def generation_request(self, preview_max_side: int, output_dir: Path | None = None) -> GenerationRequest:
        """The generator's request; an edit's inputs are read from ``output_dir`` (where the adapter
        stored them, shared by every node)."""
        image_path = mask_path = None
        if self.image_sha is not None and output_dir is not None:
            image_path = str(inputs.input_path(output_dir, self.image_sha))
            mask_path = str(inputs.input_path(output_dir, self.mask_sha)) if self.mask_sha else None
        return GenerationRequest(
            model=self.model, variant=self.model_type, prompt=self.prompt,
            negative_prompt=self.negative_prompt, width=self.width, height=self.height,
            steps=self.steps, guidance_scale=self.guidance_scale, seed=self.seed, n=self.n,
            preview_method=self.preview_method, preview_interval=self.preview_interval,
            preview_max_side=preview_max_side, image_path=image_path, mask_path=mask_path, strength=self.strength,
            loras=self.loras,
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
    if given.task_type not in TASK_TYPES:
        raise InvalidRequest(f"task_type must be one of: {', '.join(TASK_TYPES)}", param="task_type")
    edit = given.task_type == TASK_IMAGE_TO_IMAGE
    prompt = given.prompt.strip() if isinstance(given.prompt, str) else ""
    if not prompt and not edit:  # an edit without a prompt is a variation
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
    strength = _edit_strength(given, profile) if edit else None
    return JobSpec(
        task_type=given.task_type, model=profile.model_id, model_type=variant, prompt=prompt,
        negative_prompt=_negative(given, profile, limits), width=width, height=height, steps=steps,
        guidance_scale=guidance, seed=seed, n=given.n, upscale=bool(given.upscale),
        preview_method=limits.preview_method,
        preview_interval=preview_interval_for(steps_run(steps, strength), limits.preview_percent),
        image_sha=given.image_sha if edit else None, mask_sha=given.mask_sha if edit else None, strength=strength,
        loras=tuple(given.loras),
    )


def _negative(given: SpecInput, profile: ModelProfile, limits: Limits) -> str | None:
    negative = (given.negative_prompt or "").strip() or None
    if negative and len(negative) > limits.max_prompt_chars:
        raise InvalidRequest(f"negative_prompt is longer than {limits.max_prompt_chars} characters", param="negative_prompt")
    # A pipeline that ignores it: keeping it would split otherwise-equal jobs.
    return negative if profile.supports_negative_prompt else None


def _edit_strength(given: SpecInput, profile: ModelProfile) -> float:
    """The strength of an edit (explicit, else by ``input_fidelity``); checks the edit's inputs."""
    if not profile.supports_edits:
        raise InvalidRequest(f"{profile.model_id} cannot edit images", param="model")
    if not given.image_sha:
        raise InvalidRequest("an image_to_image job needs an input image", param="image")
    if given.input_fidelity not in (None, "high", "low"):
        raise InvalidRequest("input_fidelity must be 'high' or 'low'", param="input_fidelity")
    if given.strength is None:
        return DEFAULT_STRENGTH[(given.mask_sha is not None, given.input_fidelity)]
    strength = float(given.strength)
    if not 0.0 < strength <= 1.0:  # 0 would run no step at all
        raise InvalidRequest(f"strength must be greater than 0 and at most 1 (got {strength})", param="strength")
    return strength


def _checked_size(value: int | None, profile: ModelProfile, param: str) -> int:
    size = profile.default_size if value is None else value
    if not profile.min_size <= size <= profile.max_size or size % profile.size_multiple:
        raise InvalidRequest(
            f"{param} must be a multiple of {profile.size_multiple} between {profile.min_size} and "
            f"{profile.max_size} for {profile.model_id} (got {size})",
            param=param,
        )
    return size


def scoped_job_id(spec: JobSpec, owner: str | None) -> str:
    """The job id: the spec's hash, or, when API keys scope jobs, a hash of owner and spec hash."""
    if owner is None:
        return spec.job_id
    return hashlib.sha256(f"{owner}:{spec.job_id}".encode()).hexdigest()
