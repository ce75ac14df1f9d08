"""``POST /v1/images/edits`` and ``/v1/images/variations``: multipart wire request -> ``Plan``.

``plan_edit`` is the one function where an edit's wire request becomes a job spec. The multipart
body is parsed by Starlette's ``request.form`` (python-multipart): files are spooled to temporary
files (on disk past 1 MiB), never held whole in memory; the body's size is bounded before that by
``server.body_limit`` (``max_upload_bytes``). The image and mask are then decoded, checked, hashed
and stored off the event loop (``server.core.inputs.ingest``), and the temporary files closed.

- ``image`` (one file) or ``image[]`` (the SDKs' form for a list): exactly one image. Several are
  a 400 (``param: image``): no served model takes reference images, and silently editing only
  the first would hide that the others were ignored.
- ``mask``: optional PNG, alpha 0 = edit, the image's size; with it the job inpaints. Without
  one, a request for ``dall-e-2`` (whose clients rely on it) inpaints the image's own transparent
  pixels; for other names a transparent image is edited whole, as GPT image models do.
- A variation is an edit without a prompt (strength 0.6 unless ``strength`` is given).
"""

from __future__ import annotations

import asyncio
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from server.config import Settings
from server.core import inputs
from server.core.catalog import Catalog
from server.core.errors import InvalidRequest
from server.core.loras import resolve_async
from server.core.profiles import ModelProfile
from server.core.spec import TASK_IMAGE_TO_IMAGE, SpecInput
from server.openai_api.plans import Plan, normalize_wire, plan_delivery
from server.openai_api.schemas import ImageEditRequest
from server.streaming import EDIT

EDITS_PATH, VARIATIONS_PATH = "/v1/images/edits", "/v1/images/variations"
UPLOAD_PATHS = (EDITS_PATH, VARIATIONS_PATH)
IMAGE_FIELDS = ("image", "image[]")
MAX_IMAGES = 16  # what the SDKs may send; more is refused while the form is parsed
MAX_FIELD_BYTES = 1_048_576  # one non-file field (the prompt): python-multipart's default bound
SIZE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
DALL_E_2 = "dall-e-2"  # its edits use the image's transparency when no mask is sent


async def plan_edit(request: Request, catalog: Catalog, settings: Settings, variation: bool = False) -> Plan:
    """The edit (or variation) as a ``Plan``; raises ``InvalidRequest`` naming the wire param."""
    form = await _read_form(request)
    try:
        body, image, mask = _parts(form)
        prompt = "" if variation else (body.prompt or "").strip()
        if not variation and not prompt:
            raise InvalidRequest("prompt is required and must not be empty", param="prompt")
        if body.background == "transparent":
            raise InvalidRequest("Transparent backgrounds are not supported; use 'opaque' or 'auto'.",
                                 param="background")
        profile = _edit_profile(catalog, body.model)
        loras = await resolve_async(request.app.state.loras, body.loras, profile, body.model_type, settings.max_loras)
        stored = await asyncio.to_thread(inputs.ingest, settings.output_dir, image.file,
                                         mask.file if mask is not None else None, settings.max_input_pixels,
                                         alpha_as_mask=not variation and body.model == DALL_E_2)
    finally:
        await form.close()  # the spooled temporary files: the inputs are stored now
    width, height = edit_size(body.size, stored.width, stored.height, profile)
    given = SpecInput(prompt=prompt, model=profile.model_id, model_type=body.model_type,
                      negative_prompt=body.negative_prompt, width=width, height=height,
                      steps=body.num_inference_steps, guidance_scale=body.guidance_scale, seed=body.seed,
                      n=1 if body.n is None else body.n, upscale=bool(body.upscale), task_type=TASK_IMAGE_TO_IMAGE,
                      image_sha=stored.image_sha, mask_sha=stored.mask_sha, strength=body.strength,
                      input_fidelity=body.input_fidelity, loras=loras)
    spec = normalize_wire(given, profile, settings)
    return plan_delivery(body, spec, family=EDIT)


async def _read_form(request: Request) -> FormData:
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("An edit is sent as multipart/form-data with the image as a file field 'image'.",
                             param="image")
    try:
        return await request.form(max_files=MAX_IMAGES + 1, max_fields=100, max_part_size=MAX_FIELD_BYTES)
    except HTTPException as exc:  # python-multipart's parse errors, e.g. too many files
        raise InvalidRequest(f"The multipart body could not be read: {exc.detail}", param="image") from None


def _parts(form: FormData) -> tuple[ImageEditRequest, UploadFile, UploadFile | None]:
    """(scalar fields, the image, the mask or None); unknown fields are ignored."""
    images = [item for name in IMAGE_FIELDS for item in form.getlist(name)]
    if not images:
        raise InvalidRequest("'image' is required: the picture to edit, as a file.", param="image")
    if len(images) > 1:
        raise InvalidRequest(f"{len(images)} images were sent; this server edits one image per request "
                             "(no served model takes reference images).", param="image")
    if not isinstance(images[0], UploadFile):
        raise InvalidRequest("'image' must be a file (PNG, JPEG or WebP), not a text field.", param="image")
    mask = form.get("mask")
    if mask is not None and not isinstance(mask, UploadFile):
        raise InvalidRequest("'mask' must be a PNG file, not a text field.", param="mask")
    fields = {name: value for name, value in form.multi_items() if isinstance(value, str)}
    try:
        body = ImageEditRequest.model_validate(fields)
    except ValidationError as exc:  # the same 400 envelope as JSON bodies (param = the field)
        raise RequestValidationError(exc.errors()) from None
    return body, images[0], mask


def _edit_profile(catalog: Catalog, name: str | None) -> ModelProfile:
    profile = catalog.resolve(name)
    if not profile.supports_edits:
        able = [p.model_id for p in catalog.profiles() if p.supports_edits]
        hint = f"models that can: {', '.join(able)}" if able else "no served model can"
        raise InvalidRequest(f"The model '{profile.model_id}' cannot edit images; {hint}.", param="model")
    return profile


def edit_size(size: str | None, width: int, height: int, profile: ModelProfile) -> tuple[int, int]:
    """``auto``/None: the input's size in the model's bounds (aspect kept, then each side rounded to
    the model's multiple); ``"WxH"``: that size (the input is resized to it)."""
    if size is not None and size != "auto":
        match = SIZE.fullmatch(size.lower())
        if match is None:
            raise InvalidRequest(f"size must be 'WIDTHxHEIGHT' (e.g. '512x512') or 'auto', not '{size[:40]}'",
                                 param="size")
        return int(match[1]), int(match[2])
    return inputs.fit_size(width, height, profile)
