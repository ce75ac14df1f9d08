"""Retention: what the server keeps on disk, pruned on a schedule, off the event loop.

- Finished jobs with images: the record, its client links and its image files are deleted
  together ``finished_s`` after the job last changed (a record never outlives its files, so the
  result cache never answers with a file that is gone).
- Finished jobs without images (cancelled before they ran, failed): record and links after
  ``unstarted_s``. Client links of kept jobs go after ``finished_s`` too.
- Edit inputs (``outputs/inputs/``) once no kept job refers to them and they were stored more than
  ``min_age_s`` ago (a request may be between storing its input and recording its job).
- A size budget for images (``output_max_bytes``): beyond it the oldest finished jobs go first,
  but never one that finished less than ``min_age_s`` ago, and never an unfinished one (only
  finished jobs are ever selected).

Counts for ``/metrics`` are kept on the ``Retention`` object (``server.metrics`` reads them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from server.core import files, inputs
from server.core.jobs import JobRecord
from server.core.store import JobStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionPolicy:
    finished_s: float = 7 * 86_400
    unstarted_s: float = 60.0
    output_max_bytes: int = 5 * 1024**3
    min_age_s: float = 3600.0
    interval_s: float = 30.0

    @classmethod
    def from_settings(cls, settings) -> "RetentionPolicy":
        return cls(finished_s=settings.retention_finished_s, unstarted_s=settings.retention_unstarted_s,
                   output_max_bytes=settings.output_max_bytes, min_age_s=settings.retention_min_age_s,
                   interval_s=settings.retention_interval_s)


@dataclass
class RetentionCounts:
    """Totals since start, and what is kept after the latest run."""

    pruned: dict[str, int] = field(default_factory=lambda: {"jobs": 0, "links": 0, "files": 0, "inputs": 0,
                                                             "bytes": 0})
    kept_jobs: int = 0
    kept_bytes: int = 0


class Retention:
    def __init__(self, store: JobStore, output_dir: Path, policy: RetentionPolicy,
                 forget: Callable[[list[str]], None], is_active: Callable[[str], bool]):
        """``forget`` drops job ids from the engine's in-memory cache of finished records;
        ``is_active`` spares a job that runs again (an upscale retry) since it was selected."""
        self.store, self.output_dir, self.policy = store, output_dir, policy
        self.forget, self.is_active = forget, is_active
        self.counts = RetentionCounts()

    async def run_forever(self) -> None:
        while True:
            try:
                await self.prune_once()
            except Exception as exc:  # a failed run (disk error) must not end the schedule
                log.error("retention run failed: %s", exc)
            await asyncio.sleep(self.policy.interval_s)

    async def prune_once(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        policy = self.policy
        doomed = await self.store.expired(now - policy.finished_s, now - policy.unstarted_s)
        total = await asyncio.to_thread(output_bytes, self.output_dir)
        doomed_ids = {record.job_id for record in doomed}
        freed = await asyncio.to_thread(image_bytes, self.output_dir, doomed)
        if total - freed > policy.output_max_bytes:
            for record in await self.store.oldest_finished(now - policy.min_age_s, limit=1000):
                if total - freed <= policy.output_max_bytes:
                    break
                if record.job_id not in doomed_ids:
                    doomed.append(record)
                    doomed_ids.add(record.job_id)
                    freed += await asyncio.to_thread(image_bytes, self.output_dir, [record])
        await self._delete(doomed, now - policy.finished_s)
        await self._prune_inputs(now - policy.min_age_s)
        self.counts.kept_jobs = await self.store.job_count()
        self.counts.kept_bytes = await asyncio.to_thread(output_bytes, self.output_dir)

    async def _delete(self, doomed: list[JobRecord], links_before: float) -> None:
        """Records first (and out of the engine's cache), then files: a request arriving between
        the two runs the job again rather than getting a name whose file is about to go."""
        doomed = [record for record in doomed if not self.is_active(record.job_id)]
        ids = [record.job_id for record in doomed]
        jobs, links = await self.store.delete(ids, links_before)
        self.forget(ids)
        removed, removed_bytes = await asyncio.to_thread(remove_images, self.output_dir, doomed)
        pruned = self.counts.pruned
        pruned["jobs"] += jobs
        pruned["links"] += links
        pruned["files"] += removed
        pruned["bytes"] += removed_bytes
        if jobs or links or removed:
            log.info("retention: pruned %d jobs, %d client links, %d files (%d bytes)", jobs, links, removed,
                     removed_bytes)


    async def _prune_inputs(self, stored_before: float) -> None:
        referenced = await self.store.input_refs()
        removed, removed_bytes = await asyncio.to_thread(inputs.prune_unreferenced, self.output_dir, referenced,
                                                         stored_before)
        self.counts.pruned["inputs"] += removed
        self.counts.pruned["bytes"] += removed_bytes
        if removed:
            log.info("retention: pruned %d edit inputs no job refers to (%d bytes)", removed, removed_bytes)


def _image_names(record: JobRecord) -> list[str]:
    if record.result is None:
        return []
    return [name for image in record.result.images for name in (image.filename, image.upscaled_filename) if name]


def image_bytes(directory: Path, records: list[JobRecord]) -> int:
    """Bytes of the records' image files that exist (blocking: run in a thread)."""
    paths = (files.resolve_output(directory, name) for record in records for name in _image_names(record))
    return sum(path.stat().st_size for path in paths if path is not None)


def remove_images(directory: Path, records: list[JobRecord]) -> tuple[int, int]:
    """Delete the records' image files: (files, bytes). Blocking: run in a thread."""
    count = size = 0
    for record in records:
        for name in _image_names(record):
            path = files.resolve_output(directory, name)
            if path is None:
                continue
            try:
                stat = path.stat()
                path.unlink()
            except OSError as exc:
                log.warning("job %s: could not delete %s: %s", record.job_id[:12], name, exc)
                continue
            count, size = count + 1, size + stat.st_size
    return count, size


def output_bytes(directory: Path) -> int:
    """Bytes of the image files in the output directory (blocking: run in a thread)."""
    total = 0
    for path in directory.glob("*.png") if directory.is_dir() else ():
        try:
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
        except OSError:
            continue
    return total
