"""Input images of edit jobs: bounded decoding, pixel hashes, content-addressed storage.

Everything here blocks (decoding, hashing, file I/O): call it from a worker thread, never from the
event loop.

- Decoding reads the header first and refuses more than ``max_pixels`` pixels *before* the pixel
  data is decoded (decompression bombs), then decodes fully so a truncated file is refused here
  and not on the GPU thread. Only PNG, JPEG and WebP are accepted (as OpenAI's edits endpoint).
- Identity: ``pixel_sha`` is the SHA-256 of the decoded pixels (mode, size, bytes), so the same
  picture sent as PNG or re-encoded losslessly is the same input, and any changed pixel is another.
- Storage: ``<output_dir>/inputs/<sha>.png``, written once and atomically (``files.write_atomic``);
  storing it again refreshes its time. Retention deletes an input once no kept job refers to it
  and it was stored longer ago than a new job takes to be recorded (``prune_unreferenced``).
  With the Redis backend every node mounts the same output directory, so a worker reads the input
  from there: the bytes never travel through Redis.
- Masks follow OpenAI: fully transparent pixels (alpha 0) mark the area to change. They are stored
  converted to what diffusers wants: an ``L`` image, 255 (white) = repaint, 0 = keep.
- DALL-E 2 clients send no mask and let the image's own transparency mark the area to change
  ("If mask is not provided, image must have transparency, which will be used as the mask");
  ``alpha_as_mask`` does that. An image without a fully transparent pixel is then edited whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from server.core import files
from server.core.errors import InvalidRequest
from server.core.profiles import ModelProfile

log = logging.getLogger(__name__)
INPUTS_DIR = "inputs"
# Between store()'s refresh of an existing input and a prune's age check and delete of that file
# (both run in worker threads): without it a prune could take a file a new job was just given.
_PRUNE_LOCK = threading.Lock()
FORMATS = ("PNG", "JPEG", "WEBP")
REPAINT, KEEP = 255, 0


@dataclass(frozen=True)
class EditInputs:
    """What an edit's spec needs about its inputs: their pixel hashes and the image's size."""

    image_sha: str
    width: int
    height: int
    mask_sha: str | None = None


def open_bounded(source: Path | BinaryIO, param: str, max_pixels: int) -> Image.Image:
    """The decoded image (first frame); ``InvalidRequest(param=param)`` for anything else: not an
    image, another format, more than ``max_pixels`` pixels, a truncated or corrupt file."""
    try:
        with warnings.catch_warnings():  # PIL warns about large images; the bound below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)  # lazy: only the header is read here
    except Image.DecompressionBombError:
        raise InvalidRequest(f"'{param}' has too many pixels (at most {max_pixels}).", param=param) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InvalidRequest(f"'{param}' is not an image this server can read: send a PNG, JPEG or WebP file.",
                             param=param) from None
    if image.format not in FORMATS:
        raise InvalidRequest(f"'{param}' is a {image.format} image; send a PNG, JPEG or WebP file.", param=param)
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InvalidRequest(f"'{param}' is {width}x{height}: too many pixels (at most {max_pixels}).", param=param)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise InvalidRequest(f"'{param}' is truncated or corrupt: it could not be decoded.", param=param) from None
    return image


def pixel_sha(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def mask_from_alpha(mask: Image.Image, image_size: tuple[int, int], param: str = "mask") -> Image.Image:
    """OpenAI's mask (alpha 0 = edit) as diffusers' (white = repaint); 400 without alpha or at
    another size than the image's."""
    if mask.size != image_size:
        raise InvalidRequest(f"'{param}' is {mask.width}x{mask.height} but the image is "
                             f"{image_size[0]}x{image_size[1]}: they must be the same size.", param=param)
    if not mask.has_transparency_data:
        raise InvalidRequest(f"'{param}' has no alpha channel: send a PNG whose fully transparent pixels "
                             "(alpha 0) mark the area to edit.", param=param)
    alpha = mask.convert("RGBA").getchannel("A")
    return alpha.point(lambda a: REPAINT if a == 0 else KEEP, mode="L")


def input_path(output_dir: Path, sha: str) -> Path:
    return Path(output_dir) / INPUTS_DIR / f"{sha}.png"


def store(output_dir: Path, image: Image.Image) -> str:
    """Store ``image`` once under its pixel hash; returns the hash. Concurrent stores of the same
    picture are harmless: each writes complete bytes and the link is exclusive."""
    sha = pixel_sha(image)
    target = input_path(output_dir, sha)
    with _PRUNE_LOCK:  # a prune deciding on this very file waits, then sees it refreshed
        try:
            os.utime(target)  # stored again: a new job will refer to it, so retention must not take it now
            return sha
        except FileNotFoundError:
            pass
    files.write_atomic(target.parent, target.name, files.encode_image(image, "png", png_level=1))  # new: young
    return sha


def prune_unreferenced(output_dir: Path, referenced: set[str], stored_before: float) -> tuple[int, int]:
    """Delete the stored inputs no job refers to that were last stored before ``stored_before``
    (younger ones may belong to a job being submitted): (files, bytes). Blocking."""
    count = size = 0
    directory = Path(output_dir) / INPUTS_DIR
    for path in directory.glob("*.png") if directory.is_dir() else ():
        try:
            with _PRUNE_LOCK:  # checked and deleted with no store() refreshing it in between
                stat = path.stat()
                if path.stem in referenced or stat.st_mtime >= stored_before:
                    continue
                path.unlink()
        except OSError as exc:
            log.warning("retention: could not delete the input %s: %s", path.name, exc)
            continue
        count, size = count + 1, size + stat.st_size
    return count, size


def ingest(output_dir: Path, image: Path | BinaryIO, mask: Path | BinaryIO | None, max_pixels: int,
           image_param: str = "image", mask_param: str = "mask", alpha_as_mask: bool = False) -> EditInputs:
    """Decode, check and store an edit's image (as RGB) and optional mask; raise ``InvalidRequest``
    naming the offending param. ``alpha_as_mask``: without a mask, the image's transparent pixels
    are the mask (when it has any)."""
    picture = open_bounded(image, image_param, max_pixels)
    size = picture.size
    rgb = picture.convert("RGB")
    converted = None
    if mask is not None:
        converted = mask_from_alpha(open_bounded(mask, mask_param, max_pixels), size, mask_param)
    elif alpha_as_mask and picture.has_transparency_data:
        own = mask_from_alpha(picture, size, image_param)
        converted = own if own.getextrema()[1] == REPAINT else None  # no transparent pixel: edit it whole
    image_sha = store(output_dir, rgb)
    mask_sha = store(output_dir, converted) if converted is not None else None
    return EditInputs(image_sha=image_sha, width=size[0], height=size[1], mask_sha=mask_sha)


def fit_size(width: int, height: int, profile: ModelProfile) -> tuple[int, int]:
    """An edit's size when none is asked for: the input's, scaled into the model's bounds (aspect
    kept), then each side rounded to the model's multiple."""
    scale = min(1.0, profile.max_size / max(width, height))
    if min(width, height) * scale < profile.min_size:
        scale = profile.min_size / min(width, height)
    step = profile.size_multiple

    def fit(side: int) -> int:
        return min(profile.max_size, max(profile.min_size, round(side * scale / step) * step))

    return fit(width), fit(height)
