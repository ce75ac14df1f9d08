"""What both image routes (generations, edits) turn a wire request into: a ``Plan`` = the job spec
plus how to deliver its images. ``normalize_wire`` is the one call into the job core's
``normalize`` for the OpenAI adapter: it reports errors under the wire's parameter names."""

from __future__ import annotations

from dataclasses import dataclass

from server.config import Settings
from server.core.catalog import is_dalle_name
from server.core.errors import InvalidRequest
from server.core.profiles import ModelProfile
from server.core.spec import JobSpec, Limits, SpecInput, normalize
from server.streaming import GENERATION

SIZE_PARAMS = {"width": "size", "height": "size", "steps": "num_inference_steps"}


@dataclass(frozen=True)
class Plan:
    """A validated request: the job spec plus how to deliver its images."""

    spec: JobSpec
    size: str
    quality: str
    response_format: str
    output_format: str
    compression: int
    stream: bool
    partial_images: int | None
    family: str = GENERATION  # the OpenAI stream events' prefix: image_generation | image_edit


def plan_delivery(body, spec: JobSpec, family: str = GENERATION) -> Plan:
    """The ``Plan`` of ``spec`` for a wire request (generation or edit): OpenAI's response_format
    default (``url`` for dall-e names, else ``b64_json``), format, compression and streaming."""
    response_format = body.response_format or ("url" if is_dalle_name(body.model) else "b64_json")
    return Plan(spec=spec, size=f"{spec.width}x{spec.height}", quality=body.quality or "auto",
                response_format=response_format,
                output_format="png" if response_format == "url" else (body.output_format or "png"),
                compression=100 if body.output_compression is None else body.output_compression,
                stream=bool(body.stream), partial_images=body.partial_images, family=family)


def normalize_wire(given: SpecInput, profile: ModelProfile, settings: Settings) -> JobSpec:
    """``core.spec.normalize`` with the server's limits; ``InvalidRequest`` names the wire param."""
    limits = Limits(max_prompt_chars=settings.max_prompt_chars, max_n=settings.max_n,
                    preview_method=settings.preview_method, preview_percent=settings.preview_percent)
    try:
        return normalize(given, profile, limits)
    except InvalidRequest as exc:  # the spec's names are not the wire's: report the wire's
        if exc.param in SIZE_PARAMS:
            raise InvalidRequest(exc.message, param=SIZE_PARAMS[exc.param]) from None
        raise
