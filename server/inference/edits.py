"""Edits on the model layer: img2img and inpainting pipelines over a loaded Z-Image pipeline.

- ``derive``: ``ZImageImg2ImgPipeline`` / ``ZImageInpaintPipeline`` built with ``from_pipe`` from the
  resident ``ZImagePipeline``: the same modules, no second copy of the weights.
- ``load_inputs``: the stored input (RGB) and mask (L, white = repaint, already converted from
  OpenAI's alpha-0 convention by ``server.core.inputs``), resized to the job's size when it differs
  (the image with Lanczos, the mask with nearest neighbour so it stays binary).
- ``keep_unmasked``: the VAE's round trip changes every pixel a little (a random-weight demo VAE
  changes them completely), so the result outside the mask is the input's own pixels: what OpenAI's
  masked edits promise ("only the transparent area changes").

Runs on the GPU thread; torch and diffusers are imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from server.core.errors import InvalidRequest

if TYPE_CHECKING:
    from PIL.Image import Image

    from server.core.generation import GenerationRequest

IMG2IMG, INPAINT = "ZImageImg2ImgPipeline", "ZImageInpaintPipeline"


@dataclass(frozen=True)
class EditImages:
    image: "Image"  # RGB, at the job's size
    mask: "Image | None"  # L, white = repaint, at the job's size; None: img2img


def load_inputs(request: "GenerationRequest") -> EditImages:
    from PIL import Image

    size = (request.width, request.height)
    image = _open(request.image_path, "RGB", "image")
    if image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    mask = None
    if request.mask_path is not None:
        mask = _open(request.mask_path, "L", "mask")
        if mask.size != size:
            mask = mask.resize(size, Image.Resampling.NEAREST)
    return EditImages(image, mask)


def _open(path: str, mode: str, param: str) -> "Image":
    from PIL import Image

    try:
        with Image.open(path) as stored:
            return stored.convert(mode)
    except FileNotFoundError:
        # The output directory was cleaned, or a worker does not share the API node's directory.
        raise InvalidRequest(f"The stored input {param} is gone ({path}); send the edit again.", param=param) from None


def derive(base: Any, masked: bool) -> Any:
    import diffusers

    pipe = getattr(diffusers, INPAINT if masked else IMG2IMG).from_pipe(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs(edit: EditImages, request: "GenerationRequest") -> dict:
    kwargs: dict[str, Any] = {"image": edit.image, "strength": request.strength}
    if edit.mask is not None:
        kwargs["mask_image"] = edit.mask
    return kwargs


def keep_unmasked(result: "Image", edit: EditImages) -> "Image":
    from PIL import Image

    if edit.mask is None:
        return result
    return Image.composite(result, edit.image, edit.mask)
