"""One WebSocket connection's outbox and its sender task.

Sending: each connection has one sender task and an outbox. Status messages and replies are never
dropped; progress and preview messages are coalesced per job: once ``BACKLOG[kind]`` of them wait
unsent (a burst, or a client that reads slowly), the newest waiting one is overwritten in place, so
the client gets the latest data and the order relative to status messages is kept. A connection
whose outbox exceeds ``MAX_OUTBOX`` is closed with ``CLOSE_TOO_SLOW``.

Close codes sent by the server:
    1000 CLOSE_NORMAL        normal closure
    1011 CLOSE_INTERNAL      unexpected server error
    4400 CLOSE_BAD_REQUEST   an unusable connection request (an invalid client_id)
    4401 CLOSE_UNAUTHORIZED  missing or wrong API key (sent after an ``error`` frame)
    4403 CLOSE_FORBIDDEN     a browser page of an origin not allowed by the CORS allowlist
    4408 CLOSE_TOO_SLOW      the client does not read its messages (outbox overflow)
    4429 CLOSE_TOO_MANY      too many open connections for one client_id
(uvicorn itself closes with 1009 for frames above its ``ws_max_size`` and 1012 at shutdown.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable

from starlette.websockets import WebSocket

from server.core.jobs import JobRecord
from server.core.states import RANK

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_INTERNAL = 1011
CLOSE_BAD_REQUEST = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403
CLOSE_TOO_SLOW = 4408
CLOSE_TOO_MANY = 4429

MAX_OUTBOX = 512  # messages waiting for one connection
MAX_SEEN_JOBS = 1024  # per connection
BACKLOG = {"progress": 8, "preview": 2}  # unsent ones per job before coalescing (previews are big)


StatusKey = tuple  # (attempt, rank, updated_at): grows with every state change of a job


def status_key(record: JobRecord) -> StatusKey:
    return (record.attempt, RANK[record.status], record.updated_at)


class ConnState(str, Enum):
    CONNECTING = "connecting"  # accepted, not yet authenticated / attached
    OPEN = "open"  # attached to its session; messages flow
    CLOSING = "closing"  # overflowed or shutting down: accepts no new messages
    CLOSED = "closed"


@dataclass
class _Slot:
    payload: dict[str, Any]
    job_id: str | None = None
    key: StatusKey | None = None  # set on status messages: reported as delivered once sent
    group: tuple[str, str] | None = None  # (kind, job_id) of a coalescable message


class Connection:
    """One WebSocket: an outbox and the single task that sends it (no other code sends)."""

    def __init__(self, websocket: WebSocket, conn_id: str | None = None):
        self.websocket = websocket
        self.conn_id = conn_id or uuid.uuid4().hex[:8]
        self.state = ConnState.CONNECTING
        self.on_sent: Callable[[str, StatusKey], None] | None = None
        self._outbox: deque[_Slot] = deque()
        self._coalescing: dict[tuple[str, str], deque[_Slot]] = {}  # (kind, job_id) -> unsent slots
        # job_id -> newest status enqueued; an LRU so a long-lived connection stays bounded (an
        # evicted job can at worst see one repeated status, which clients treat as idempotent).
        self._seen: OrderedDict[str, StatusKey] = OrderedDict()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def open(self) -> None:
        self.state = ConnState.OPEN
        self._task = asyncio.create_task(self._send_loop(), name=f"ws-send-{self.conn_id}")

    async def stop(self) -> None:
        self.state = ConnState.CLOSED
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def push(self, payload: dict[str, Any]) -> None:
        """A reply or error: never dropped."""
        self._append(_Slot(payload))

    def push_status(self, record: JobRecord, payload: dict[str, Any], reply: bool = False) -> bool:
        """A job status; a push older than or equal to what this connection already got is skipped
        (replies are always sent). Returns whether the connection has (or will have) it."""
        key = status_key(record)
        seen = self._seen.get(record.job_id)
        if not reply and seen is not None and key <= seen:
            return True
        if seen is None or key > seen:
            self._seen[record.job_id] = key
            self._seen.move_to_end(record.job_id)
            if len(self._seen) > MAX_SEEN_JOBS:
                self._seen.popitem(last=False)
        self._coalescing.pop(("progress", record.job_id), None)  # later progress goes after it
        self._coalescing.pop(("preview", record.job_id), None)
        return self._append(_Slot(payload, record.job_id, key))

    def queued(self) -> int:
        """Messages waiting to be sent."""
        return len(self._outbox)

    def push_coalesced(self, kind: str, job_id: str, payload: dict[str, Any]) -> None:
        """Progress or preview: queued, or, with ``BACKLOG[kind]`` of them unsent since the job's
        last status, written over the newest unsent one."""
        if self.state is not ConnState.OPEN:
            return
        group = (kind, job_id)
        waiting = self._coalescing.setdefault(group, deque())
        if len(waiting) >= BACKLOG[kind]:
            waiting[-1].payload = payload
            return
        slot = _Slot(payload, group=group)
        waiting.append(slot)
        self._append(slot)

    def forget(self, job_id: str) -> None:
        self._seen.pop(job_id, None)

    def _append(self, slot: _Slot) -> bool:
        if self.state is not ConnState.OPEN:
            return False
        if len(self._outbox) >= MAX_OUTBOX:
            log.warning("ws %s: client does not read its messages; closing", self.conn_id)
            self.state = ConnState.CLOSING
            self._wake.set()
            return False
        self._outbox.append(slot)
        self._wake.set()
        return True

    async def _send_loop(self) -> None:
        try:
            while self.state is ConnState.OPEN:
                while not self._outbox:
                    self._wake.clear()
                    await self._wake.wait()
                    if self.state is not ConnState.OPEN:
                        break
                else:
                    await self._send_next()
            if self.state is ConnState.CLOSING:
                await self.websocket.close(CLOSE_TOO_SLOW, "client too slow")
        except Exception as exc:  # the peer went away: the receive loop sees the disconnect
            log.debug("ws %s: send stopped: %s", self.conn_id, exc)
            self.state = ConnState.CLOSED

    async def _send_next(self) -> None:
        slot = self._outbox.popleft()
        waiting = self._coalescing.get(slot.group) if slot.group else None
        if waiting and waiting[0] is slot:
            waiting.popleft()
            if not waiting:
                del self._coalescing[slot.group]
        await self.websocket.send_text(json.dumps(slot.payload, separators=(",", ":")))
        if slot.key is not None and self.on_sent is not None:
            self.on_sent(slot.job_id, slot.key)
