"""Output files: names, atomic writes and image encoding. Everything here is blocking: call it from
a worker thread, never from the event loop.

Names: ``YYYYMMDD-<prompt-slug>-<first 32 hex of job_id>[-<i>].png`` and ``...-upscaled.png``.
128 bits of the id: two jobs sharing a name is out of reach even for a birthday search (with 32
bits, a few seconds found one, and prompts without ASCII letters all share the slug ``image``).

A file is written to a temporary name in the same directory, fsynced, then hard-linked to its
name, which fails if the name exists: a write never replaces a file, so one job can never
overwrite another's image. A name that exists is this job's own file from an earlier run (the
name carries its id), which counts as written.
"""

from __future__ import annotations

import base64
import errno
import io
import logging
import os
import re
import stat
import tempfile
import time
import unicodedata
from pathlib import Path

from PIL import Image

log = logging.getLogger(__name__)

SLUG_MAX = 40
ID_CHARS = 32  # hex digits of the job id in a file name: 128 bits
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
    return f"{day}-{slugify(prompt)}-{job_id[:ID_CHARS]}{suffix}{tail}.png"


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
    """Write ``data`` as ``directory/filename`` via a temp file, fsync and link; never replaces a
    file. If ``filename`` exists already it is kept and returned unchanged (the name carries the
    job id: it is this job's file from an earlier run, e.g. before a restart)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    target = directory / filename
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(Path(tmp), target)
        return target
    finally:
        Path(tmp).unlink(missing_ok=True)


def _publish(tmp: Path, target: Path) -> None:
    """Give ``tmp`` the name ``target`` unless that name exists (then keep the existing file)."""
    try:
        os.link(tmp, target)  # atomic and exclusive: fails with EEXIST instead of replacing
    except FileExistsError:
        if not target.is_file():
            raise  # a directory or other odd thing under the name: not this job's image
        log.info("%s exists already: kept (written by an earlier run of the same job)", target.name)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        # A filesystem without hard links: check, then rename. Not atomic against another writer,
        # but names are per job and one job is written by one writer at a time.
        if target.exists():
            log.info("%s exists already: kept (written by an earlier run of the same job)", target.name)
        else:
            os.rename(tmp, target)


def resolve_output(directory: Path, filename: str) -> Path | None:
    """The file ``filename`` inside ``directory``, or None for anything that could leave it
    (separators, dot-dot, absolute paths) or is not a regular file: never a symlink, wherever it
    points (``x.png`` -> ``jobs.sqlite3`` would serve the job database). Only PNGs: the job
    database (``jobs.sqlite3`` and its -wal/-shm) lives in the same directory."""
    if not SAFE_NAME.match(filename) or filename.startswith(".tmp-") or not filename.endswith(".png"):
        return None
    candidate = directory.resolve() / filename
    try:
        mode = candidate.lstat().st_mode  # lstat: a symlink is reported as one, not followed
    except OSError:
        return None
    return candidate if stat.S_ISREG(mode) else None


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
