"""Wire schemas of the OpenAI-compatible adapter: the request, the responses and the stream events.

Every JSON message ``routes_openai`` and ``streaming`` put on the wire is one of these models.
Inside the server the adapter turns them into a ``SpecInput`` (the job core's input) and plain
dataclasses; nothing past the adapter sees pydantic.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

Quality = Literal["auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"]
OutputFormat = Literal["png", "jpeg", "webp"]


class LoraParam(BaseModel):
    """One LoRA adapter of a request: a name from ``GET /v1/loras`` and a weight (-2 to 2, default 1;
    0 is the model without it)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=200)
    weight: StrictFloat | StrictInt = 1.0


def parse_loras(value: object) -> object:
    """Multipart forms carry ``loras`` as JSON text: ``[{"name": "a", "weight": 0.8}]``."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            raise ValueError('loras must be a JSON list such as [{"name": "style", "weight": 0.8}]') from None
    return value


class ImageGenerationRequest(BaseModel):
    """``POST /v1/images/generations``: the OpenAI fields plus this server's extensions.

    Unknown fields are ignored (newer SDKs send fields this server does not know) and ``null``
    means "the default" for every field, as the official SDK sends ``None`` as ``null``. Numbers
    and booleans are strict, as the schema says: ``true`` is not a guidance scale, ``"4"`` not an n.

    - ``size``: ``"WxH"`` or ``"auto"`` (the model's default size); the bounds are the model's.
    - ``model``: a served id, a configured alias, or any OpenAI image name (``gpt-image-*``,
      ``chatgpt-image-*``, ``dall-e-*``: the default model); anything else is a 404.
    - ``response_format``: ``b64_json`` or ``url``: an absolute URL of the stored PNG (``output_format``
      then does not apply and the response says ``png``). Default as OpenAI's: ``url`` for ``dall-e-*``
      model names (DALL-E clients read ``data[0].url``), ``b64_json`` otherwise.
    - ``quality`` is accepted, validated and echoed back, but **does not change the image**: the
      served models are step-distilled to a fixed step count, where fewer steps ruin the image and
      more add nothing, so quality-to-steps would be a trap. Ask for ``num_inference_steps`` to
      change the step count. Leaving quality out of the job also lets requests that differ only in
      quality share one job and its cache entry.
    - ``background``: only opaque images exist here; ``transparent`` is a 400.
    - ``stream`` + ``partial_images`` choose the stream dialect: with ``partial_images`` (even 0)
      the OpenAI events, without it the step events (one per preview, then ``[DONE]``). Stream
      events always carry base64 images; ``response_format`` applies to the JSON response only.
    - ``upscale``: each ``data`` entry also carries the x4 image as ``upscaled_b64_json`` or
      ``upscaled_url`` (``data`` stays one entry per image); if upscaling failed the image is still
      returned and ``upscale_error`` says why.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(description="What to draw; required, non-empty.")
    model: str | None = Field(None, description="A served model id, an alias, or an OpenAI image name such as "
                                                "gpt-image-2 or dall-e-3 (the default model); null: the default.")
    n: StrictInt | None = Field(None, ge=1, description="Images to generate: 1 up to the server's max_n "
                                                        "(4 unless configured; OpenAI allows 10).")
    size: str | None = Field(None, description='"WxH" (e.g. "512x512") or "auto".')
    response_format: Literal["b64_json", "url"] | None = None
    output_format: OutputFormat | None = None
    output_compression: StrictInt | None = Field(None, ge=0, le=100, description="jpeg/webp quality; 100 = best.")
    quality: Quality | None = Field(None, description="Echoed back; does not change generation.")
    background: Literal["transparent", "opaque", "auto"] | None = None
    # Accepted so that today's clients work unchanged; none of them changes the image here.
    moderation: Literal["low", "auto"] | None = None  # there is no moderation here
    style: Literal["vivid", "natural"] | None = None  # dall-e-3 only upstream
    complexity: Literal["low", "medium", "high"] | None = None
    safety_identifier: str | None = Field(None, description="Replaces `user` upstream; not used here.")
    user: str | None = None
    stream: StrictBool | None = None
    partial_images: StrictInt | None = Field(None, ge=0, le=3)
    # -- extensions ---------------------------------------------------------------------------
    negative_prompt: str | None = None
    guidance_scale: StrictFloat | None = None
    num_inference_steps: StrictInt | None = Field(None, ge=1)
    seed: StrictInt | None = Field(None, ge=0, description="Fixes the images; equal requests are one cached job.")
    upscale: StrictBool | None = Field(None, description="Also produce the Real-ESRGAN x4 image.")
    model_type: str | None = Field(None, description="Weight variant, e.g. uint4 or int8 for z-image-turbo.")
    loras: list[LoraParam] | None = Field(None, description="LoRA adapters (GET /v1/loras) and their weights.")

    @field_validator("output_format", mode="before")
    @classmethod
    def _no_animation_or_vector(cls, value: object) -> object:
        # OpenAI's newest models also make gif and svg; say plainly that this server cannot.
        if value in ("gif", "svg"):
            raise ValueError(f"'{value}' cannot be made by this server; use png, jpeg or webp")
        return value


class ImageEditRequest(BaseModel):
    """The scalar fields of ``POST /v1/images/edits`` (multipart/form-data, so every value arrives as
    a string: numbers and booleans are parsed leniently, ``"2"`` is 2 and ``"true"`` is true).
    The files (``image``/``image[]``, ``mask``) are read by ``server.openai_api.edits``.

    Same meaning as on generations, plus:

    - ``size``: ``auto`` (default) keeps the input's size, rounded to the model's multiple of 16
      (and scaled into the model's bounds, keeping the aspect ratio); ``WxH`` resizes the input first.
    - ``input_fidelity``: ``high`` keeps more of the input (strength 0.4; 0.75 with a mask), ``low``
      lets the prompt change more (0.8; 1.0 with a mask); unset: 0.6, or 1.0 with a mask.
    - ``strength`` (extension, 0 < strength <= 1) overrides it: the share of the denoising schedule
      that runs from the noised input; the job runs ``num_inference_steps x strength`` steps.
    """

    model_config = ConfigDict(extra="ignore")

    prompt: str | None = Field(None, description="What to change; required on edits, none on variations.")
    model: str | None = None
    n: int | None = Field(None, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    output_format: OutputFormat | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    quality: Quality | None = None
    background: Literal["transparent", "opaque", "auto"] | None = None
    input_fidelity: Literal["high", "low"] | None = None
    safety_identifier: str | None = None
    user: str | None = None
    stream: bool | None = None
    partial_images: int | None = Field(None, ge=0, le=3)
    # -- extensions ---------------------------------------------------------------------------
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    num_inference_steps: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0)
    upscale: bool | None = None
    model_type: str | None = None
    strength: float | None = Field(None, gt=0.0, le=1.0)
    loras: list[LoraParam] | None = Field(None, description='JSON text: [{"name": "style", "weight": 0.8}]')

    @field_validator("loras", mode="before")
    @classmethod
    def _loras_json(cls, value: object) -> object:
        return parse_loras(value)

    @field_validator("output_format", mode="before")
    @classmethod
    def _no_animation_or_vector(cls, value: object) -> object:
        return ImageGenerationRequest._no_animation_or_vector(value)

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_default(cls, value: object) -> object:
        return None if value == "" else value  # form clients send empty fields for "not set"


class InputTokensDetails(BaseModel):
    text_tokens: int
    image_tokens: int = 0


class Usage(BaseModel):
    """Token accounting in the OpenAI shape: input = prompt words, output = 16x16 image patches."""

    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    upscaled_b64_json: str | None = None
    upscaled_url: str | None = None
    seed: int | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    size: str
    output_format: str
    quality: str
    background: str = "opaque"
    usage: Usage
    job_id: str
    upscale_error: str | None = None


class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None  # the served model an alias stands for
    supports_edits: bool = False  # POST /v1/images/edits (img2img, inpainting) works with this model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelObject]


class LoraObject(BaseModel):
    """One adapter of ``GET /v1/loras``: ``models`` are the served models its keys fit;
    ``loaded``: resident in a pipeline of this process (always false on an API node)."""

    name: str
    object: Literal["lora"] = "lora"
    size: int
    sha256: str
    models: list[str]
    loaded: bool


class LoraList(BaseModel):
    object: Literal["list"] = "list"
    data: list[LoraObject]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


# -- stream events --------------------------------------------------------------------------


class StepEvent(BaseModel):
    """Step dialect: one per preview (``is_final`` false), then one per image with the final image.

    ``progress`` is the job's overall percentage (0-100) over all ``n`` images; ``step`` counts
    within image ``index``; ``timestamp`` is when the server produced the picture (Unix seconds).
    """

    job_id: str
    index: int
    step: int
    total_steps: int
    progress: float
    image: str
    timestamp: float
    is_final: bool
    output_format: str
    seed: int | None = None
    upscaled_image: str | None = None


class PartialImageEvent(BaseModel):
    """OpenAI ``image_generation.partial_image`` (``image_edit.partial_image`` for edits);
    ``image_index`` (an extension) is the image of n."""

    type: Literal["image_generation.partial_image", "image_edit.partial_image"] = "image_generation.partial_image"
    b64_json: str
    partial_image_index: int
    created_at: int
    size: str
    quality: str
    background: str = "opaque"
    output_format: str
    image_index: int = 0
    job_id: str


class CompletedEvent(BaseModel):
    """OpenAI ``image_generation.completed`` (``image_edit.completed`` for edits): one per image."""

    type: Literal["image_generation.completed", "image_edit.completed"] = "image_generation.completed"
    b64_json: str
    created_at: int
    size: str
    quality: str
    background: str = "opaque"
    output_format: str
    usage: Usage
    image_index: int = 0
    job_id: str
    seed: int | None = None
    upscaled_b64_json: str | None = None


class ErrorEvent(BaseModel):
    """An error after the 200: the SDK raises ``openai.APIError`` on a truthy ``error`` key."""

    type: Literal["error"] = "error"
    error: ErrorBody
