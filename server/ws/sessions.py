"""Per-client sessions of the WebSocket protocol.

A ``Session`` belongs to one client id (scoped by API-key owner). It holds the client's open
``Connection``s and its job ``Subscription``s. Subscriptions outlive connections: a client that
reconnects with the same id resumes them and is sent the current status of each job, including the
final status of any job that finished while it was away (the session records which status it last
delivered for each job). One pump task per subscription reads the engine subscriber and fans each
event out to every open connection of the client.

Lifetime: a session with no connection is dropped at once if it follows no job, otherwise
``ttl_s`` after its last job finished (undelivered final statuses are lost then; ``get_client_jobs``,
which reads the persisted links, still lists those jobs). An anonymous connection (no client_id)
has a session of its own; when it closes, its interest in unfinished jobs is released, so a job
nobody else wants is cancelled.

Sending and close codes: ``server.ws.outbox``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from server.core.events import EventKind, JobEvent, Subscriber
from server.core.jobs import JobRecord
from server.ws.outbox import Connection, StatusKey, status_key

log = logging.getLogger(__name__)

MAX_CONNECTIONS_PER_CLIENT = 16
SESSION_TTL_S = 600.0


@dataclass
class Subscription:
    """One followed job: the engine subscriber, its pump, and the newest record the pump saw."""

    job_id: str
    subscriber: Subscriber
    preview: bool = False
    # The create_job that made this client follow the job: every push of it carries this id, so a
    # client can match pushes to its requests (each client its own, even on a deduplicated job).
    request_id: str | int | None = None
    record: JobRecord | None = None
    task: asyncio.Task | None = None

    @property
    def finished(self) -> bool:
        return self.record is not None and self.record.status.is_terminal


@dataclass
class Renderer:
    """Turns engine records and events into wire dicts; built by the route module. The second
    argument is the subscription's request_id (None: none)."""

    status: Callable[[JobRecord, Any], dict]
    progress: Callable[[JobEvent, Any], dict]
    preview: Callable[[JobEvent], dict]


@dataclass
class Session:
    key: tuple[str | None, str]
    client_id: str | None  # None: anonymous (the interest is a generated id)
    interest: str
    owner: str | None
    render: Renderer
    connections: set[Connection] = field(default_factory=set)
    subscriptions: dict[str, Subscription] = field(default_factory=dict)
    delivered: dict[str, StatusKey] = field(default_factory=dict)  # job_id -> newest status sent
    expiry: asyncio.TimerHandle | None = None
    on_idle: Callable[["Session"], None] | None = None  # the registry's expiry check

    # -- connections --------------------------------------------------------------------------

    def attach(self, conn: Connection) -> None:
        """Add an open connection and replay: unfinished jobs' current status, and final statuses
        this session has not delivered yet."""
        conn.on_sent = self._mark_delivered
        self.connections.add(conn)
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        for sub in list(self.subscriptions.values()):
            record = sub.record
            if record is None:
                continue  # its pump has not run yet: it will deliver to this connection too
            if not record.status.is_terminal or self.delivered.get(sub.job_id, ()) < status_key(record):
                conn.push_status(record, self.render.status(record, sub.request_id))

    # -- subscriptions ------------------------------------------------------------------------

    def follow(self, subscriber: Subscriber, preview: bool, request_id: str | int | None = None) -> None:
        """Pump ``subscriber``'s events to this client's connections. Following a job already
        followed (and unfinished) only records the preview wish and closes the extra subscriber:
        its pushes keep the request_id of the create_job that started following it."""
        current = self.subscriptions.get(subscriber.job_id)
        if current is not None and not current.finished:
            current.preview = current.preview or preview
            subscriber.close()
            return
        if current is not None:
            self._drop(current)
        sub = Subscription(subscriber.job_id, subscriber, preview, request_id)
        sub.task = asyncio.create_task(self._pump(sub), name=f"ws-pump-{subscriber.job_id[:12]}")
        self.subscriptions[sub.job_id] = sub

    def unfollow(self, job_id: str) -> None:
        sub = self.subscriptions.pop(job_id, None)
        if sub is not None:
            self._drop(sub)
        self.delivered.pop(job_id, None)
        for conn in self.connections:
            conn.forget(job_id)

    def unfinished(self) -> list[str]:
        return [job_id for job_id, sub in self.subscriptions.items() if not sub.finished]

    def close_all(self) -> None:
        for sub in list(self.subscriptions.values()):
            self._drop(sub)
        self.subscriptions.clear()
        if self.expiry is not None:
            self.expiry.cancel()

    def _drop(self, sub: Subscription) -> None:
        sub.subscriber.close()
        if sub.task is not None and sub.task is not asyncio.current_task():
            sub.task.cancel()

    async def _pump(self, sub: Subscription) -> None:
        try:
            async for event in sub.subscriber:
                self._dispatch(sub, event)
                if event.is_terminal:
                    break
        except Exception:  # a rendering bug must not kill the session silently
            log.exception("job %s: ws pump for client %s failed", sub.job_id[:12], self.interest)
        finally:
            sub.subscriber.close()
            if sub.finished and self.delivered.get(sub.job_id, ()) >= status_key(sub.record):
                self._prune(sub)
            self._on_change()

    def _dispatch(self, sub: Subscription, event: JobEvent) -> None:
        if event.kind is EventKind.STATUS and event.record is not None:
            sub.record = event.record
            payload = self.render.status(event.record, sub.request_id)
            for conn in list(self.connections):
                conn.push_status(event.record, payload)
        elif event.kind is EventKind.PROGRESS and event.progress is not None:
            payload = self.render.progress(event, sub.request_id)
            for conn in list(self.connections):
                conn.push_coalesced("progress", sub.job_id, payload)
        elif event.kind is EventKind.PREVIEW and sub.preview and event.preview is not None:
            payload = self.render.preview(event)
            for conn in list(self.connections):
                conn.push_coalesced("preview", sub.job_id, payload)

    def _mark_delivered(self, job_id: str, key: StatusKey) -> None:
        if key > self.delivered.get(job_id, ()):
            self.delivered[job_id] = key
        sub = self.subscriptions.get(job_id)
        if sub is not None and sub.finished and sub.task is not None and sub.task.done() \
                and key >= status_key(sub.record):
            self._prune(sub)

    def _prune(self, sub: Subscription) -> None:
        """Forget a finished job whose final status reached the client."""
        if self.subscriptions.get(sub.job_id) is sub:
            del self.subscriptions[sub.job_id]
            self.delivered.pop(sub.job_id, None)

    # -- lifetime -----------------------------------------------------------------------------

    def _on_change(self) -> None:
        if self.on_idle is not None and not self.connections:
            self.on_idle(self)


class SessionRegistry:
    """All sessions of one app, keyed by (owner, client_id)."""

    def __init__(self, ttl_s: float = SESSION_TTL_S):
        self.ttl_s = ttl_s
        self._sessions: dict[tuple[str | None, str], Session] = {}

    def open(self, client_id: str | None, owner: str | None, render: Renderer) -> Session:
        """The client's session (created if needed); anonymous clients get a fresh one each time."""
        if client_id is None:
            interest = f"ws-anon-{uuid.uuid4().hex}"
            key = (owner, interest)
        else:
            interest = client_id if owner is None else f"{owner}:{client_id}"
            key = (owner, client_id)
        session = self._sessions.get(key)
        if session is None:
            session = Session(key=key, client_id=client_id, interest=interest, owner=owner, render=render)
            session.on_idle = self._idle
            self._sessions[key] = session
        return session

    def get(self, client_id: str, owner: str | None = None) -> Session | None:
        return self._sessions.get((owner, client_id))

    def __len__(self) -> int:
        return len(self._sessions)

    async def detach(self, session: Session, conn: Connection, engine) -> None:
        """Remove a closed connection; release an anonymous client's jobs; schedule expiry."""
        session.connections.discard(conn)
        if session.connections:
            return
        if session.client_id is None:
            for job_id in session.unfinished():
                await engine.release(job_id, session.interest)
            self._remove(session)
            return
        self._idle(session)

    def _idle(self, session: Session) -> None:
        """No connection: drop the session now if it follows nothing, else ``ttl_s`` after its
        last job finished (re-checked when the timer fires)."""
        if session.connections or self._sessions.get(session.key) is not session:
            return
        if not session.subscriptions:
            self._remove(session)
            return
        if session.expiry is not None:
            session.expiry.cancel()
            session.expiry = None
        if not session.unfinished():
            session.expiry = asyncio.get_running_loop().call_later(self.ttl_s, self._expire, session)

    def _expire(self, session: Session) -> None:
        session.expiry = None
        if not session.connections and not session.unfinished() and self._sessions.get(session.key) is session:
            log.info("ws client %s: session expired with %d undelivered results",
                     session.interest, len(session.subscriptions))
            self._remove(session)

    def _remove(self, session: Session) -> None:
        session.close_all()
        if self._sessions.get(session.key) is session:
            del self._sessions[session.key]
