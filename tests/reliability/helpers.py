"""Shared pieces of the reliability tests: live servers, a small WebSocket client, resource
snapshots (tasks on the server loop, threads, file descriptors) and a response-leak check.

Imported as ``tests.reliability.helpers`` (``tests`` is a namespace package, as for
``tests.conftest``). Waiting is on messages or engine events with timeouts, never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

from websockets.asyncio.client import connect

from tests.conftest import live, run_async, terminal_record, wait_until  # noqa: F401 (re-exported to the tests)

TIMEOUT = 10.0
SMALL = {"width": 64, "height": 64}
# What must never appear in a response: traces, paths outside the output directory, internals.
LEAK_MARKERS = ("Traceback", "site-packages", "/root", "/work/", "/tmp/", "/usr/", "/home/", 'File "',
                "errors.pydantic.dev", "starlette.", "uvicorn.", "sqlite3.", "Errno", "object at 0x")


run = run_async  # the name these tests use


def assert_no_leak(text: str, context: object = "") -> None:
    for marker in LEAK_MARKERS:
        assert marker not in text, f"{marker!r} leaked in {context}: {text[:300]}"


# -- resources --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resources:
    tasks: int
    threads: int
    fds: int
    active_jobs: int
    subscribers: int

    def within(self, base: "Resources", slack: int = 0) -> bool:
        return (self.tasks <= base.tasks + slack and self.threads <= base.threads + slack
                and self.fds <= base.fds + slack and self.active_jobs <= base.active_jobs
                and self.subscribers <= base.subscribers)


async def _loop_state(engine) -> tuple[int, int]:
    subscribers = engine.hub.subscriber_count()
    return len(asyncio.all_tasks()), subscribers


def own_threads() -> int:
    """Threads, without the loop's default executor ("asyncio_N"): ``asyncio.to_thread`` work starts
    those lazily up to a fixed bound (min(32, cpus + 4)), so one more of them is not a leak."""
    return sum(1 for thread in threading.enumerate() if not thread.name.startswith("asyncio_"))


def resources(server) -> Resources:
    tasks, subscribers = server.call(_loop_state(server.engine))
    return Resources(tasks=tasks, threads=own_threads(), fds=len(os.listdir("/proc/self/fd")),
                     active_jobs=sum(server.engine.counts().values()), subscribers=subscribers)


def settle(server, base: Resources, slack: int = 0, timeout: float = 15.0) -> Resources:
    """Resources once they are back within ``base`` (+ slack): closed sockets and cancelled tasks
    take a few loop iterations to go away. Polls at 20 Hz up to ``timeout``; returns the last."""
    deadline = time.monotonic() + timeout
    now = resources(server)
    while not now.within(base, slack) and time.monotonic() < deadline:
        threading.Event().wait(0.05)
        now = resources(server)
    return now


# -- WebSocket client -----------------------------------------------------------------------------

class WsClient:
    def __init__(self, ws):
        self.ws = ws
        self._ids = 0
        self.backlog: deque[dict] = deque()

    async def send(self, **message) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = TIMEOUT) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def request(self, **message) -> dict:
        """Send with a fresh request_id; the reply to it (pushes read meanwhile are kept)."""
        self._ids += 1
        message.setdefault("request_id", f"q{self._ids}")
        await self.send(**message)
        return await self.reply_to(message["request_id"])

    async def reply_to(self, request_id) -> dict:
        while True:
            message = await self.recv()
            if message.get("request_id") == request_id:
                return message
            self.backlog.append(message)

    async def create(self, prompt: str, **params) -> dict:
        return await self.request(type="create_job", params={"prompt": prompt, **SMALL, **params})

    async def until_status(self, job_id: str, *statuses: str) -> dict:
        while True:
            message = self.backlog.popleft() if self.backlog else await self.recv()
            if message.get("job_id") == job_id and message.get("type") == "job_status" \
                    and message["status"] in statuses:
                return message


@contextlib.asynccontextmanager
async def ws_client(server, client_id: str | None = None, query: str = "", headers: dict | None = None,
                    **kwargs):
    params = ([f"client_id={client_id}"] if client_id else []) + ([query] if query else [])
    url = f"{server.ws_url}/api/ws" + ("?" + "&".join(params) if params else "")
    async with connect(url, additional_headers=headers, open_timeout=TIMEOUT, **kwargs) as ws:
        yield WsClient(ws)


async def engine_terminal(engine, job_id: str, timeout: float = TIMEOUT) -> str:
    """The job's final status, waited for on the engine's own events."""
    return (await terminal_record(engine, job_id, timeout)).status.value
