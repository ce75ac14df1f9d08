"""``create_job`` with ``task_type: image_to_image`` on the WebSocket: where the input comes from.

``params.image`` is the picture as base64 (it must fit in one frame, ``ws_max_frame_bytes``), or
``params.image_filename`` names an earlier output (as in a result's ``filename``, served by
``/api/image/<file>``); ``params.mask`` / ``params.mask_filename`` likewise (a PNG whose alpha-0
pixels mark the area to edit). Decoding and storing run off the event loop
(``server.core.inputs.ingest``), like every other image work.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from pathlib import Path
from typing import BinaryIO

from server.config import Settings
from server.core import files, inputs
from server.core.errors import InvalidRequest
from server.core.spec import TASK_IMAGE_TO_IMAGE
from server.ws.schemas import CreateJob


async def ingest(message: CreateJob, settings: Settings) -> inputs.EditInputs | None:
    """The stored inputs of an image_to_image job (None for other tasks); ``InvalidRequest`` naming
    the param for a missing, unknown or unreadable input."""
    if message.task_type != TASK_IMAGE_TO_IMAGE:
        return None
    params = message.params
    if params.image is None and params.image_filename is None:
        raise InvalidRequest("image_to_image needs params.image (base64) or params.image_filename", param="image")
    return await asyncio.to_thread(_ingest, settings, params.image, params.image_filename, params.mask,
                                   params.mask_filename)


def _ingest(settings: Settings, image: str | None, image_filename: str | None, mask: str | None,
            mask_filename: str | None) -> inputs.EditInputs:
    image_source = _source(settings.output_dir, image, image_filename, "image")
    mask_source = None
    if mask is not None or mask_filename is not None:
        mask_source = _source(settings.output_dir, mask, mask_filename, "mask")
    return inputs.ingest(settings.output_dir, image_source, mask_source, settings.max_input_pixels)


def _source(output_dir: Path, data: str | None, filename: str | None, param: str) -> Path | BinaryIO:
    if data is not None and filename is not None:
        raise InvalidRequest(f"send either {param} or {param}_filename, not both", param=param)
    if filename is not None:
        path = files.resolve_output(output_dir, filename)
        if path is None:
            raise InvalidRequest(f"{param}_filename '{filename[:80]}' is not an output of this server",
                                 param=f"{param}_filename")
        return path
    if data.startswith("data:"):  # a data URL from a browser canvas: data:image/png;base64,....
        data = data.partition(",")[2]
    try:
        return io.BytesIO(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"{param} must be base64 (or a data: URL)", param=param) from None
