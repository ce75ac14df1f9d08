"""Keys, connections and the mapping between domain objects and Redis hashes/stream entries."""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
from dataclasses import asdict, dataclass, replace

from server.core.events import EventKind, JobEvent, PreviewImage
from server.core.jobs import JobRecord, JobResult, JobStatus, Progress
from server.core.spec import JobSpec
from server.core.store import parse_failure

GROUP = "workers"
READ_BLOCK_MS = 5000  # longest XREAD/XREADGROUP BLOCK any reader issues
# A blocked read's socket must outlast its BLOCK: with redis-py's default (5 s, equal to the block)
# every idle read timed out, was logged and reconnected (about every 7 s per idle API node).
READER_SOCKET_TIMEOUT_S = READ_BLOCK_MS / 1000 + 10


def connect(url: str, max_connections: int, timeout_s: float = 10.0, name: str | None = None):
    """An asyncio client over a BlockingConnectionPool: under load callers wait for a connection
    instead of failing at once (a plain pool raises as soon as ``max_connections`` are in use).
    ``name`` (see ``client_name``) labels its connections in ``CLIENT LIST``."""
    import redis.asyncio as redis

    pool = redis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=timeout_s,
                                                 decode_responses=True, health_check_interval=30, client_name=name)
    return redis.Redis(connection_pool=pool)


def reader_client(url: str, name: str | None = None):
    """A client with one connection of its own for blocking reads (XREAD BLOCK / XREADGROUP BLOCK):
    a blocked read must never hold a connection that request handlers wait for. Reads must block
    at most ``READ_BLOCK_MS``: the socket timeout is above that."""
    import redis.asyncio as redis

    pool = redis.BlockingConnectionPool.from_url(url, max_connections=1, timeout=30, decode_responses=True,
                                                 client_name=name, socket_timeout=READER_SOCKET_TIMEOUT_S)
    return redis.Redis(connection_pool=pool)


def client_name(role: str, node_id: str) -> str:
    """``t2i-{role}-{node id}``: which node holds a connection, for operators (``CLIENT LIST``) and
    the leak tests. CLIENT SETNAME refuses spaces and odd characters, so those become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.:-]", "_", f"t2i-{role}-{node_id}")[:120]


def default_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def client_list_name(client_id: str, owner: str | None) -> str:
    """A client's job list is per API key owner (``|`` is not allowed in a client id), so one key's
    jobs never crowd another key's off a shared client id's list."""
    return client_id if owner is None else f"{owner}|{client_id}"


@dataclass(frozen=True)
class Keys:
    prefix: str

    def job(self, job_id: str) -> str:
        return f"{self.prefix}job:{job_id}"

    def events(self, job_id: str) -> str:
        return f"{self.prefix}ev:{job_id}"

    def client(self, client_list: str) -> str:
        """The sorted set of a ``client_list_name``'s jobs."""
        return f"{self.prefix}cl:{client_list}"

    @property
    def queue(self) -> str:
        return f"{self.prefix}queue"

    @property
    def pending(self) -> str:
        return f"{self.prefix}pending"

    @property
    def running(self) -> str:
        return f"{self.prefix}running"

    @property
    def upscaler(self) -> str:
        """Set by workers with an upscaler: SUBMIT retries a missing upscale only when it exists."""
        return f"{self.prefix}upscaler"

    def wake(self, node_id: str) -> str:
        return f"{self.prefix}wake:{node_id}"

    def cancel_wake(self, job_id: str) -> str:
        """The list CANCEL pushes to when it asks a job's worker to stop (the worker BLPOPs it)."""
        return f"{self.prefix}cx:{job_id}"


def pairs(flat: list) -> dict[str, str]:
    """A flat ``[k1, v1, k2, v2, ...]`` reply (HGETALL inside a script) as a dict."""
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def record_from_hash(job_id: str, fields: dict[str, str]) -> JobRecord:
    result = fields.get("result") or ""
    return JobRecord(
        job_id=job_id, spec=JobSpec.from_dict(json.loads(fields["spec"])), status=JobStatus(fields["status"]),
        created_at=float(fields["created_at"]), updated_at=float(fields["updated_at"]),
        result=JobResult.from_dict(json.loads(result)) if result else None,
        error=fields.get("error") or None, failure=parse_failure(fields.get("failure")),
        owner=fields.get("owner") or None, attempt=int(fields.get("attempt") or 1))


def result_json(result: JobResult | None) -> str:
    return json.dumps(result.to_dict()) if result is not None else ""


def status_from_entry(base: JobRecord, fields: dict[str, str]) -> JobRecord:
    """A status event (an entry of the job's stream) applied to the job's unchanging part."""
    result = fields.get("result") or ""
    return replace(base, status=JobStatus(fields["status"]), updated_at=float(fields["updated_at"]),
                   result=JobResult.from_dict(json.loads(result)) if result else None,
                   error=fields.get("error") or None, failure=parse_failure(fields.get("failure")),
                   attempt=int(fields.get("attempt") or 1))


def event_from_entry(base: JobRecord, entry_id: str, fields: dict[str, str]) -> JobEvent:
    kind = fields.get("k")
    if kind == "status":
        record = status_from_entry(base, fields)
        return JobEvent(EventKind.STATUS, base.job_id, record=record, timestamp=record.updated_at, event_id=entry_id)
    if kind == "progress":
        return JobEvent(EventKind.PROGRESS, base.job_id, progress=Progress(**json.loads(fields["v"])),
                        timestamp=float(fields["ts"]), event_id=entry_id)
    return preview_event(base.job_id, entry_id, fields["v"], fields["ts"])


def preview_event(job_id: str, entry_id: str, payload: str, ts: str) -> JobEvent:
    return JobEvent(EventKind.PREVIEW, job_id, preview=PreviewImage(**json.loads(payload)), timestamp=float(ts),
                    event_id=entry_id)


def step_payload(event: JobEvent) -> tuple[str, str, str]:
    """(kind, JSON payload, timestamp) of a progress or preview event, for the STEP script."""
    body = event.progress if event.kind is EventKind.PROGRESS else event.preview
    return event.kind.value, json.dumps(asdict(body)), repr(event.timestamp)


def id_key(entry_id: str | None) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence)."""
    if not entry_id:
        return (0, 0)
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq or 0))
