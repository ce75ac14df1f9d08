"""Queue fairness: who a client is, how much of the queue it may hold, and when to come back.

A *requester* is who the client is, not what it calls itself: its API key (the owner
fingerprint) when keys are on, else its network address (``X-Forwarded-For`` only from a proxy
listed in ``forwarded_allow_ips``). Made-up ``client_id``s or fresh connections do not give one
address more of the queue. Every job a requester *creates* counts against
``max_queue_per_client`` until it finishes; joining or reading a cached job costs nothing.

``Retry-After`` comes from the queue's expected drain time: the seconds one job takes (an
exponential average of observed run times, or of the dequeue rate on an API node) times the jobs
that must finish before the refused client would get a slot.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

from server.core.errors import QueueFull
from server.core.ports import ActiveJob, EngineConfig
from server.core.states import JobStatus

INITIAL_JOB_S = 2.0  # before any job was observed
MAX_RETRY_AFTER_S = 3600


def requester_for(owner: str | None, address: str | None) -> str:
    """The queue identity: ``key:<owner>`` with API keys, else ``addr:<address>``."""
    return f"key:{owner}" if owner else f"addr:{address or 'unknown'}"


class DrainEstimate:
    """Seconds per job as an exponential moving average; ``retry_after`` from it."""

    def __init__(self, initial_s: float = INITIAL_JOB_S, weight: float = 0.3):
        self.seconds_per_job = initial_s
        self.weight = weight
        self._moving_since: float | None = None  # observe_queue: when the queue last moved

    def observe(self, seconds: float) -> None:
        if seconds > 0:
            self.seconds_per_job += self.weight * (seconds - self.seconds_per_job)

    def observe_queue(self, before: Iterable[str], after: Iterable[str], now: float) -> None:
        """From two snapshots of the pending queue (an API node sees no run times): jobs that
        left it since the queue was last seen moving, over the time it took."""
        left = len(set(before) - set(after))
        if left and self._moving_since is not None:
            self.observe((now - self._moving_since) / left)
        if not after:
            self._moving_since = None
        elif left or self._moving_since is None:
            self._moving_since = now

    def retry_after(self, jobs_ahead: int) -> int:
        """Whole seconds until ``jobs_ahead`` jobs and then one more have finished (1 s .. 1 h)."""
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self.seconds_per_job * (jobs_ahead + 1))))


def queue_full(limit: int, retry_after_s: int) -> QueueFull:
    return QueueFull(f"the queue is full ({limit} jobs waiting); retry in {retry_after_s} s",
                     retry_after_s=retry_after_s)


def requester_full(limit: int, retry_after_s: int) -> QueueFull:
    return QueueFull(f"you already have {limit} unfinished jobs (per API key, or per address without keys); "
                     f"retry in {retry_after_s} s", code="client_queue_full", retry_after_s=retry_after_s)


class RequesterLedger:
    """Which requester created which unfinished job (one process). Entries of jobs that are no
    longer unfinished are dropped whenever a requester's jobs are counted."""

    def __init__(self) -> None:
        self._by_job: dict[str, str] = {}

    def charge(self, job_id: str, requester: str | None) -> None:
        if requester:
            self._by_job[job_id] = requester

    def unfinished(self, requester: str, active_ids: Iterable[str]) -> set[str]:
        """The requester's jobs among ``active_ids`` (the unfinished ones)."""
        active = set(active_ids)
        self._by_job = {job_id: who for job_id, who in self._by_job.items() if job_id in active}
        return {job_id for job_id, who in self._by_job.items() if who == requester}

    def __len__(self) -> int:
        return len(self._by_job)


def check_capacity(active: Mapping[str, ActiveJob], config: EngineConfig, requesters: RequesterLedger,
                   drain: DrainEstimate, interest: str, requester: str | None) -> None:
    """Raise ``QueueFull`` unless one more job may be queued: the global queue limit, then the
    per-client ones: per interest (a WebSocket client id, or an anonymous connection's own id; a
    withdrawn interest no longer counts) and per requester, who the client is (API key, else
    address), over every job it created. Retry-After: the drain time until a slot should be free."""
    limit = config.max_queue_per_client
    pending = sum(1 for a in active.values() if a.record.status is JobStatus.PENDING)
    if pending >= config.max_queue:
        raise queue_full(config.max_queue, drain.retry_after(0))
    if sum(interest in a.interests for a in active.values()) >= limit:
        raise QueueFull(f"this client already has {limit} unfinished jobs", code="client_queue_full",
                        retry_after_s=drain.retry_after(pending))
    mine = requesters.unfinished(requester, active) if requester else ()
    if len(mine) >= limit:
        first = min(active[job_id].enqueued_seq for job_id in mine)
        ahead = sum(1 for a in active.values() if a.enqueued_seq < first)
        raise requester_full(limit, drain.retry_after(ahead))
