"""The job core's written contracts. Adapters and roles depend on these, not on implementations.

- ``Engine``: what the protocol adapters (OpenAI HTTP/SSE, WebSocket, /health, /metrics) use.
  Implemented by ``server.core.engine.JobEngine`` (one process, SQLite) and
  ``server.cluster.redis_engine.RedisEngine`` (API node over Redis/Valkey). Both pass the same
  contract tests (tests/cluster/test_conformance.py).
- ``JobHost``: what ``server.core.runner.JobRunner`` needs from whoever runs jobs: the state
  changes of a job it runs and a door for its step events. Implemented by ``JobEngine`` and
  ``server.cluster.redis_worker.RedisWorker``.
- The door to inference is ``server.core.generation`` (``Generator``, ``Upscaler``).

Interest: every submit names an ``interest`` (a WebSocket client, one HTTP request). A job is
cancelled only when the last interest in it is withdrawn (``cancel`` or ``release``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from server.core.events import JobEvent, Subscriber
from server.core.jobs import JobRecord
from server.core.spec import JobSpec
from server.core.states import FailureCode, JobStatus

if TYPE_CHECKING:
    from server.metrics import Metrics


@dataclass(frozen=True)
class EngineConfig:
    output_dir: Path
    max_in_flight: int = 4
    max_queue: int = 64
    max_queue_per_client: int = 16
    preview_max_side: int = 512
    png_compress_level: int = 3
    finished_cache_size: int = 10_000
    max_restarts: int = 3  # a job running at this many process deaths is not retried (``--max-deliveries``)
    min_free_disk_bytes: int = 0  # new jobs are refused below this much free space (``server.core.disk``)

    @classmethod
    def from_settings(cls, settings, **overrides) -> "EngineConfig":
        """The engine's part of the server settings (``server.config.Settings``)."""
        values = dict(output_dir=settings.output_dir, max_in_flight=settings.max_in_flight,
                      max_queue=settings.max_queue, max_queue_per_client=settings.max_queue_per_client,
                      preview_max_side=settings.preview_max_side, png_compress_level=settings.png_compress_level,
                      max_restarts=settings.max_deliveries, min_free_disk_bytes=settings.min_free_disk_bytes)
        return cls(**{**values, **overrides})


@dataclass(frozen=True)
class Submission:
    record: JobRecord  # the job's state when submit returned
    created: bool  # False: deduplicated onto an existing job (or answered from the cache)
    subscriber: Subscriber | None  # first event: the current status; None when subscribe=False


@dataclass
class ActiveJob:
    """Runtime state of a job being run; ``record`` is replaced on every transition."""

    record: JobRecord
    interests: set[str] = field(default_factory=set)
    cancel_flag: threading.Event = field(default_factory=threading.Event)
    cancel_cause: FailureCode = FailureCode.CANCELLED  # why the flag was set
    enqueued_seq: int = 0
    started_at: float = 0.0
    latest_preview: JobEvent | None = None
    status_history: list[JobEvent] = field(default_factory=list)  # replayed to late subscribers
    client_ids: set[str] = field(default_factory=set)
    # Queued again after a restart: the interests that wanted it died with the old process, so it
    # is never cancelled for lack of interest, only by an explicit ``cancel``.
    recovered: bool = False

    @property
    def job_id(self) -> str:
        return self.record.job_id

    def request_cancel(self, cause: FailureCode) -> None:
        """Ask the job to stop at its next step boundary (the generator polls the flag)."""
        self.cancel_cause = cause
        self.cancel_flag.set()

    def keep_alive(self) -> None:
        """A new interest joined: withdraw a pending cancel for lack of interest (not a shutdown's)."""
        if self.cancel_cause is FailureCode.CANCELLED:
            self.cancel_flag.clear()


class Engine(Protocol):
    """The job core as the protocol adapters see it. All methods run on the event loop."""

    config: EngineConfig

    @property
    def accepting(self) -> bool:
        """False once ``stop`` began: ``submit`` raises ``ShuttingDown``."""

    async def start(self) -> None: ...

    async def stop(self, grace_s: float = 30.0) -> None:
        """Accept no more work; let running jobs finish within ``grace_s``. Idempotent."""

    async def submit(self, spec: JobSpec, *, interest: str, client_id: str | None = None,
                     owner: str | None = None, subscribe: bool = True, requester: str | None = None) -> Submission:
        """Create the job for ``spec`` or join the existing one (same spec and owner = same id).
        ``requester`` (``core.fairness.requester_for``: API key or address) is charged for a job it
        creates, up to ``max_queue_per_client`` unfinished ones.

        pending/processing/generated: join it (no new work; a cancel requested for lack of
        interest is withdrawn). completed: answered from the cache (``JobEngine``: unless its
        upscale is missing, which then runs as a new attempt). failed/cancelled: runs again
        (attempt + 1). Raises ``QueueFull``, ``ShuttingDown``,
        ``StorageUnavailable``. The subscriber's first event is the job's current status."""

    def subscribe(self, record: JobRecord) -> Subscriber:
        """Events of a job read through this engine: its current status first, then live ones."""

    async def subscribe_from(self, job_id: str, last_event_id: str | None, owner: str | None = None) -> Subscriber:
        """Resume a job's events after ``last_event_id`` where the engine has event ids (Redis);
        otherwise (or with ``None``) from the job's current status. Raises ``JobNotFound``."""

    async def get(self, job_id: str, owner: str | None = None) -> JobRecord:
        """The job's record; ``JobNotFound`` when missing or owned by another key."""

    async def cancel(self, job_id: str, interest: str, owner: str | None = None) -> tuple[JobRecord, bool]:
        """Withdraw ``interest``; cancel the job if nobody else wants it: (record, cancelled).
        Raises ``JobNotFound``, or ``JobNotCancellable`` unless the job is in ``STOPPABLE``: for a
        ``generated`` job the cancel stops its upscale within a tile and the job completes with
        its image (``upscale_error``), on both engines."""

    async def release(self, job_id: str, interest: str) -> None:
        """As ``cancel`` but silent and never raising: an HTTP client went away."""

    async def client_jobs(self, client_id: str, owner: str | None = None) -> list[JobRecord]:
        """The client's jobs, newest first (at most 200)."""

    def queue_position(self, job_id: str) -> int | None:
        """0-based place among pending jobs, None when not pending (may lag on Redis)."""

    def counts(self) -> dict[str, int]:
        """Unfinished jobs by status value, for metrics and /health."""

    def health(self) -> dict[str, Any]:
        """What /health shows about this engine (backend, role)."""


class JobHost(Protocol):
    """What ``JobRunner`` drives. ``move``/``finish`` persist a state change, then announce it;
    a host may refuse silently (a fenced-out Redis worker) and set the job's cancel flag."""

    config: EngineConfig
    metrics: "Metrics | None"

    async def move(self, active: ActiveJob, status: JobStatus, **changes) -> JobRecord:
        """A non-terminal change of a running job (processing, generated)."""

    async def finish(self, active: ActiveJob, status: JobStatus, **changes) -> JobRecord:
        """The terminal change of a running job (completed, failed, cancelled)."""

    def publish_step(self, active: ActiveJob, event: JobEvent) -> None:
        """A progress or preview event of a processing job (on the event loop, never blocking)."""
