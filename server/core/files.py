"""Output files: names, atomic writes and image encoding. Everything here is blocking: call it from
a worker thread, never from the event loop.

Names: ``YYYYMMDD-<prompt-slug>-<first 8 of job_id>[-<i>].png`` and ``...-upscaled.png``. A file is
written to a temporary name in the same directory and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import base64
import io
import os
import re
import tempfile
import time
import unicodedata
from pathlib import Path

from PIL import Image

SLUG_MAX = 40
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")
MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def slugify(prompt: str, max_len: int = SLUG_MAX) -> str:
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    return slug[:max_len].rstrip("-") or "image"


def output_filename(prompt: str, job_id: str, index: int, n: int, upscaled: bool = False, when: float | None = None) -> str:
    day = time.strftime("%Y%m%d", time.localtime(when))
    suffix = f"-{index}" if n > 1 else ""
    tail = "-upscaled" if upscaled else ""
    return f"{day}-{slugify(prompt)}-{job_id[:8]}{suffix}{tail}.png"


def encode_image(image: Image.Image, fmt: str = "png", quality: int = 100, png_level: int = 3) -> bytes:
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=png_level)
    elif fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=max(1, min(quality, 95)))
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=quality, lossless=quality >= 100)
    else:
        raise ValueError(f"unknown image format {fmt}")
    return buffer.getvalue()


def to_b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def write_atomic(directory: Path, filename: str, data: bytes) -> Path:
    """Write ``data`` as ``directory/filename`` via a temp file, fsync and rename."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        target = directory / filename
        os.replace(tmp, target)
        return target
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_output(directory: Path, filename: str) -> Path | None:
    """The file ``filename`` inside ``directory``, or None for anything that could leave it
    (separators, dot-dot, absolute paths, symlinks pointing out) or does not exist. Only PNGs:
    the job database (``jobs.sqlite3`` and its -wal/-shm) lives in the same directory."""
    if not SAFE_NAME.match(filename) or filename.startswith(".tmp-") or not filename.endswith(".png"):
        return None
    root = directory.resolve()
    candidate = (root / filename).resolve()
    if candidate.parent != root or not candidate.is_file():
        return None
    return candidate


def read_as(path: Path, fmt: str, quality: int = 100) -> bytes:
    """The stored PNG at ``path`` in ``fmt`` (re-encoded unless png)."""
    if fmt == "png":
        return path.read_bytes()
    with Image.open(path) as image:
        return encode_image(image, fmt, quality)


def remove_partials(directory: Path) -> int:
    """Delete temp files a killed process left behind; they were never announced to anyone."""
    removed = 0
    for path in directory.glob(".tmp-*.part") if directory.is_dir() else ():
        path.unlink(missing_ok=True)
        removed += 1
    return removed
