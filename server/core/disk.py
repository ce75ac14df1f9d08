"""Free disk space as an admission rule: a new job is refused while the output directory's disk is
nearly full, and accepted again by itself once space is back (retention, or the operator).

Without this a job is accepted on a nearly full disk and fails at its very end ("could not write
the image: No space left on device") after using the GPU, and the job database fails only when
the disk is entirely full (issue #16: "a full disk refuses new jobs with 507/503 and recovers by
itself once pruning frees space"). Joining a running job or a cached answer costs no disk and is
never refused here.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

from server.core.errors import StorageUnavailable

class DiskSpace:
    """Free bytes of the disk holding ``directory``, read off the event loop at most once per
    ``max_age_s`` (a submit burst costs one ``statvfs``, not one each)."""

    def __init__(self, directory: Path, min_free_bytes: int, max_age_s: float = 1.0):
        self.directory, self.min_free_bytes, self.max_age_s = Path(directory), min_free_bytes, max_age_s
        self._free: int | None = None
        self._read_at = 0.0

    async def free_bytes(self) -> int:
        if self._free is None or time.monotonic() - self._read_at >= self.max_age_s:
            self._free = await asyncio.to_thread(_free_bytes, self.directory)
            self._read_at = time.monotonic()
        return self._free

    async def check(self) -> None:
        """Raise ``StorageUnavailable`` (503 with Retry-After on the OpenAI API) while less than
        ``min_free_bytes`` are free; 0 turns the check off."""
        refusal = await self.refusal()
        if refusal is not None:
            raise refusal

    async def refusal(self) -> StorageUnavailable | None:
        """The ``StorageUnavailable`` a new job gets now, or None while there is room (or the check
        is off). For a backend that decides join/cache/create elsewhere (the Redis SUBMIT script):
        it asks first and raises this only if the job turns out to be new."""
        if self.min_free_bytes <= 0:
            return None
        free = await self.free_bytes()
        if free >= self.min_free_bytes:
            return None
        return StorageUnavailable(
            f"The server's disk is nearly full ({free // 1_048_576} MiB free, new jobs need "
            f"{self.min_free_bytes // 1_048_576} MiB); retry later.")


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except FileNotFoundError:  # not created yet: its parent's disk
        return shutil.disk_usage(directory.parent).free
