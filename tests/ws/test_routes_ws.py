"""The WebSocket job protocol (``WS /api/ws``) against a real uvicorn server and a real
``websockets`` client. (The image route: test_routes_misc.py; the outbox: test_ws_sessions.py.)

Waiting is always on a message (``recv`` with a timeout) or on an engine event, never a sleep.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
import threading
from collections import deque

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from server.testing.fakes import FakeGenerator, FakeUpscaler
from server.ws.outbox import CLOSE_UNAUTHORIZED
from tests.conftest import http_get, live, run_async, terminal_record, wait_until

MMSS = re.compile(r"^\d{2,}:\d{2}$")
SPEED = re.compile(r"^\d+\.\d{2}(s/it|it/s)$")
SMALL = {"width": 64, "height": 64}
TIMEOUT = 10.0


# -- helpers --------------------------------------------------------------------------------------

def run(coro):
    return run_async(coro, 45)


class Client:
    def __init__(self, ws):
        self.ws = ws
        self._ids = 0
        self.backlog: deque[dict] = deque()  # pushes read while waiting for a reply

    async def send(self, **message) -> None:
        await self.ws.send(json.dumps(message))

    async def recv(self, timeout: float = TIMEOUT) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def request(self, strict: bool = False, **message) -> dict:
        """Send with a fresh request_id and return its reply; pushes that arrive first are kept
        for ``until_status``, or, with ``strict``, fail the test."""
        self._ids += 1
        message.setdefault("request_id", f"q{self._ids}")
        await self.send(**message)
        while True:
            reply = await self.recv()
            if reply.get("request_id") == message["request_id"]:
                return reply
            assert not strict, f"unexpected message before the reply: {reply}"
            self.backlog.append(reply)

    async def create(self, prompt: str, **params) -> dict:
        return await self.request(type="create_job", params={"prompt": prompt, **SMALL, **params})

    async def until_status(self, job_id: str, *statuses: str) -> list[dict]:
        """Messages up to and including the job's first status in ``statuses``."""
        seen = []
        while True:
            message = self.backlog.popleft() if self.backlog else await self.recv()
            seen.append(message)
            if message.get("job_id") == job_id and message.get("type") == "job_status" \
                    and message["status"] in statuses:
                return seen


@contextlib.asynccontextmanager
async def client(server, client_id: str | None = None, query: str = "", headers: dict | None = None):
    url = f"{server.ws_url}/api/ws"
    params = [f"client_id={client_id}"] if client_id else []
    params += [query] if query else []
    if params:
        url += "?" + "&".join(params)
    async with connect(url, additional_headers=headers, open_timeout=TIMEOUT) as ws:
        yield Client(ws)


@pytest.fixture
def gated_server(tmp_path):
    """The GPU is held at every step until the test sets ``server.gate``."""
    gate = threading.Event()
    with live(tmp_path, generator=FakeGenerator(gate=gate)) as server:
        server.gate = gate
        try:
            yield server
        finally:
            gate.set()


def wait_terminal(server, job_id: str) -> str:
    """Block until the job is finished (an engine event, not a poll); its final status."""
    return server.call(terminal_record(server.engine, job_id, TIMEOUT)).status.value


# -- the happy path -------------------------------------------------------------------------------

def test_create_job_pushes_the_documented_sequence(fake_server):
    async def body():
        async with client(fake_server, "seq") as c:
            pending = await c.create("a red fox", seed=7)
            job_id = pending["job_id"]
            assert pending == {"type": "job_status", "job_id": job_id, "status": "pending",
                               "request_id": "q1", "queue_position": 0}
            messages = await c.until_status(job_id, "completed", "failed")
            # Nothing else follows: the next message is the reply to this request.
            after = await c.request(strict=True, type="get_status", job_id=job_id)
            return job_id, messages, after

    job_id, messages, after = run(body())
    assert [m["type"] for m in messages] == ["job_status"] + ["job_progress"] * 9 + ["job_status"] * 2
    assert messages[0]["status"] == "processing"
    for step, message in enumerate(messages[1:10], start=1):
        progress = message["progress"]
        assert message["job_id"] == job_id
        assert progress["type"] == "progress" and progress["stage"] == "generating"
        assert (progress["current_step"], progress["total_steps"]) == (step, 9)
        assert progress["percentage"] == int(100 * step / 9) and isinstance(progress["percentage"], int)
        assert MMSS.match(progress["elapsed"]) and MMSS.match(progress["remaining"])
        assert SPEED.match(progress["speed"]) and progress["speed"].endswith("it/s")  # 10 ms steps
    generated, completed = messages[10], messages[11]
    filename = generated["result"]["filename"]
    assert generated["status"] == "generated"
    assert generated["result"]["local_path"] == f"outputs/{filename}"
    assert completed["status"] == "completed"
    result = completed["result"]
    assert result["filename"] == filename and result["path"] == result["local_path"] == f"outputs/{filename}"
    assert result["url"] == f"/api/image/{filename}"
    assert result["upscaled_filename"].endswith("-upscaled.png") and result["upscale_error"] is None
    assert result["upscaled_path"] == f"outputs/{result['upscaled_filename']}"
    assert result["upscaled_url"] == f"/api/image/{result['upscaled_filename']}"
    assert after["status"] == "completed" and after["result"] == result
    # Every push of the job carries the request_id of the create_job that made this client follow it.
    assert {m.get("request_id") for m in messages} == {"q1"}

    status, headers, data = http_get(fake_server, result["url"])
    assert status == 200 and headers["content-type"] == "image/png" and data.startswith(b"\x89PNG")
    assert "max-age" in headers["cache-control"]
    request = fake_server.generator.calls[0]
    assert (request.width, request.height, request.seed, request.steps) == (64, 64, 7, 9)


def test_missing_params_take_the_models_defaults_and_previews_are_opt_in(fake_server):
    async def body():
        async with client(fake_server) as c:
            first = await c.request(type="create_job", params={"prompt": "defaults", "upscale": False})
            plain = await c.until_status(first["job_id"], "completed")
            second = await c.create("with previews", preview=True, upscale=False)
            with_previews = await c.until_status(second["job_id"], "completed")
            wrong_variant = await c.create("x", model_type="int8")
            return plain, with_previews, wrong_variant

    plain, with_previews, wrong_variant = run(body())
    request = fake_server.generator.calls[0]
    assert (request.width, request.height, request.variant, request.seed) == (256, 256, "fp32", 42)
    assert not any(m["type"] == "job_preview" for m in plain)
    previews = [m["preview"] for m in with_previews if m["type"] == "job_preview"]
    assert previews and base64.b64decode(previews[-1]["image"]).startswith(b"\x89PNG")
    assert previews[-1]["step"] == previews[-1]["total_steps"] == 9
    assert wrong_variant["type"] == "error" and wrong_variant["param"] == "model_type"
    assert "fp32" in wrong_variant["message"] and "uint4" in wrong_variant["message"]


def test_duplicate_create_job_joins_the_existing_job(fake_server):
    async def body():
        async with client(fake_server, "dup") as c:
            first = await c.create("same thing", seed=3)
            again = await c.create("same thing", seed=3)
            messages = await c.until_status(first["job_id"], "completed")
            done = await c.create("same thing", seed=3)
            extra = await c.request(strict=True, type="get_status", job_id=first["job_id"])
            return first, again, messages, done, extra

    first, again, messages, done, extra = run(body())
    assert again["type"] == "job_status" and again["job_id"] == first["job_id"]
    assert again["status"] in ("pending", "processing")
    statuses = [m["status"] for m in messages if m["type"] == "job_status"]
    assert statuses.count("completed") == 1 and statuses.count("generated") == 1
    assert done["status"] == "completed" and done["job_id"] == first["job_id"]
    assert done["result"]["upscaled_filename"]
    assert extra["status"] == "completed"  # no second 'completed' push slipped in before the reply
    assert len(fake_server.generator.calls) == 1


def test_two_connections_of_one_client_both_get_updates(fake_server):
    async def body():
        async with client(fake_server, "twin") as a, client(fake_server, "twin") as b:
            created = await a.create("shared view")
            seen_by_a = await a.until_status(created["job_id"], "completed")
            seen_by_b = await b.until_status(created["job_id"], "completed")
            return seen_by_a, seen_by_b

    seen_by_a, seen_by_b = run(body())
    assert seen_by_a[-1]["result"] == seen_by_b[-1]["result"]
    assert any(m["type"] == "job_progress" for m in seen_by_b)


# -- cancellation ---------------------------------------------------------------------------------

def test_cancel_pending_and_processing_jobs(gated_server):
    async def body():
        async with client(gated_server, "canceller") as c:
            running = await c.create("first", seed=1)
            await c.until_status(running["job_id"], "processing")
            queued = await c.create("second", seed=2)
            assert queued["status"] == "pending" and queued["queue_position"] == 0
            cancel_queued = await c.request(type="cancel_job", job_id=queued["job_id"])
            queued_final = await c.until_status(queued["job_id"], "cancelled")
            cancel_running = await c.request(type="cancel_job", job_id=running["job_id"])
            gated_server.gate.set()
            running_final = await c.until_status(running["job_id"], "cancelled", "completed")
            again = await c.request(type="cancel_job", job_id=running["job_id"])
            return cancel_queued, queued_final, cancel_running, running_final, again

    cancel_queued, queued_final, cancel_running, running_final, again = run(body())
    assert cancel_queued["type"] == "cancel_result" and cancel_queued["cancelled"] is True
    assert cancel_queued["status"] == "cancelled" and cancel_queued["withdrawn"] is False
    assert queued_final[-1]["reason"] == "cancelled"
    assert cancel_running["cancelled"] is True and cancel_running["status"] == "processing"
    assert running_final[-1]["status"] == "cancelled" and running_final[-1]["reason"]
    assert again["type"] == "error" and again["code"] == "job_not_cancellable"
    assert "cancelled" in again["message"]
    assert [r.prompt for r in gated_server.generator.calls] == ["first"]  # the queued one never ran


def test_cancel_of_a_shared_job_only_withdraws_this_clients_interest(gated_server):
    async def body():
        async with client(gated_server, "alice") as alice, client(gated_server, "bob") as bob:
            mine = await alice.create("popular", seed=5)
            await alice.until_status(mine["job_id"], "processing")
            theirs = await bob.create("popular", seed=5)
            assert theirs["job_id"] == mine["job_id"] and theirs["status"] == "processing"
            withdrawn = await alice.request(type="cancel_job", job_id=mine["job_id"])
            gated_server.gate.set()
            bob_saw = await bob.until_status(mine["job_id"], "completed", "cancelled")
            alice_next = await alice.request(strict=True, type="get_status", job_id=mine["job_id"])
            return withdrawn, bob_saw, alice_next

    withdrawn, bob_saw, alice_next = run(body())
    assert withdrawn["type"] == "cancel_result" and withdrawn["cancelled"] is False and withdrawn["withdrawn"]
    assert "other clients" in withdrawn["message"]
    assert bob_saw[-1]["status"] == "completed"
    assert alice_next["status"] == "completed"  # alice got no pushes after withdrawing


def test_cancel_of_a_finished_job_is_an_error(fake_server):
    async def body():
        async with client(fake_server, "late") as c:
            created = await c.create("quick", upscale=False)
            await c.until_status(created["job_id"], "completed")
            return await c.request(type="cancel_job", job_id=created["job_id"])

    reply = run(body())
    assert reply["type"] == "error" and reply["code"] == "job_not_cancellable"
    assert "completed" in reply["message"] and reply["request_id"] == "q2"


def test_anonymous_disconnect_releases_its_jobs(gated_server):
    async def body():
        async with client(gated_server) as c:
            created = await c.create("abandoned")
            await c.until_status(created["job_id"], "processing")
            no_id = await c.request(type="get_client_jobs")
        return created["job_id"], no_id

    job_id, no_id = run(body())
    assert no_id["type"] == "error" and no_id["code"] == "client_id_required"
    # The server notices the disconnect asynchronously: wait for the engine's stop request before
    # letting the held job run on.
    assert wait_until(lambda: gated_server.engine.cancel_requested(job_id))
    gated_server.gate.set()
    assert wait_terminal(gated_server, job_id) == "cancelled"


# -- reconnection ---------------------------------------------------------------------------------

def test_reconnect_replays_statuses_and_lists_client_jobs(gated_server):
    async def first_visit():
        async with client(gated_server, "wanderer") as c:
            created = await c.create("come back later")
            await c.until_status(created["job_id"], "processing")
            return created["job_id"]

    async def revisit(job_id):
        async with client(gated_server, "wanderer") as c:
            return await c.recv()  # sent unasked on connect

    async def after_finish(job_id):
        async with client(gated_server, "wanderer") as c:
            replay = await c.recv()
            jobs = await c.request(type="get_client_jobs")
        async with client(gated_server, "wanderer") as c:  # already delivered: not replayed again
            status = await c.request(strict=True, type="get_status", job_id=job_id)
        return replay, jobs, status

    job_id = run(first_visit())
    still_running = run(revisit(job_id))
    assert (still_running["type"], still_running["job_id"], still_running["status"]) == ("job_status", job_id, "processing")
    assert still_running["request_id"] == "q1"
    gated_server.gate.set()
    assert wait_terminal(gated_server, job_id) == "completed"
    replay, jobs, status = run(after_finish(job_id))
    assert replay["job_id"] == job_id and replay["status"] == "completed" and replay["result"]["filename"]
    assert replay["request_id"] == "q1"  # the create_job of the first visit
    assert jobs["type"] == "client_jobs"
    [listed] = jobs["jobs"]
    assert listed["job_id"] == job_id and listed["status"] == "completed" and listed["task_type"] == "text_to_image"
    assert listed["result"]["filename"] == replay["result"]["filename"] and listed["created_at"] > 0
    assert status["status"] == "completed"


# -- robustness -----------------------------------------------------------------------------------

BAD_INPUTS = [
    ("not json {", "invalid_json", None),
    (json.dumps({"request_id": "r"}), "missing_type", "type"),
    (json.dumps({"type": "dance", "request_id": "r"}), "unknown_type", "type"),
    (json.dumps({"type": "create_job", "request_id": "r", "params": {"width": 64}}), "missing_required_parameter", "prompt"),
    (json.dumps({"type": "create_job", "request_id": "r", "params": {"prompt": "p", "width": 1000}}), "invalid_value", "width"),
    (json.dumps({"type": "create_job", "request_id": "r", "params": {"prompt": "p", "steps": 0}}), "invalid_value", "steps"),
    (json.dumps({"type": "create_job", "request_id": "r", "params": {"prompt": "p", "seed": "abc"}}), "invalid_value", "seed"),
    (json.dumps({"type": "create_job", "request_id": "r", "params": {"prompt": "p", "steps": "4"}}), "invalid_value", "steps"),
    (json.dumps({"type": "create_job", "request_id": "r", "params": {"prompt": "p", "guidance_scale": True}}),
     "invalid_value", "guidance_scale"),
    (json.dumps({"type": "get_status", "request_id": "r", "job_id": "nope"}), "job_not_found", "job_id"),
    (json.dumps({"type": "cancel_job", "request_id": "r"}), "missing_required_parameter", "job_id"),
    (json.dumps({"type": "create_job", "request_id": "r"}), "missing_required_parameter", "params"),
    ("x" * (1_048_576 + 1), "frame_too_large", None),
    (b"\x00\x01binary", "binary_frame", None),
]


def test_bad_input_gets_an_error_reply_and_the_connection_stays_usable(fake_server):
    async def body():
        async with client(fake_server, "clumsy") as bad, client(fake_server, "bystander") as good:
            bystander = await good.create("unaffected")
            replies = []
            for frame, _, _ in BAD_INPUTS:
                await bad.ws.send(frame)
                replies.append(await bad.recv())
            created = await bad.create("after the errors")
            done = await bad.until_status(created["job_id"], "completed")
            other = await good.until_status(bystander["job_id"], "completed")
            return replies, done[-1], other[-1]

    replies, done, other = run(body())
    for (frame, code, param), reply in zip(BAD_INPUTS, replies):
        assert reply["type"] == "error" and reply["code"] == code, (frame[:60], reply)
        assert reply.get("param") == param, reply
        assert "Traceback" not in reply["message"] and "/" not in reply["message"]
        if code == "missing_required_parameter":
            assert reply["message"] == f"{param} is required", reply
        if isinstance(frame, str) and '"request_id": "r"' in frame:
            assert reply["request_id"] == "r"
    assert "multiple of 16" in replies[4]["message"]
    assert done["status"] == "completed" and other["status"] == "completed"


def test_upscale_failure_still_completes_with_the_original_image(tmp_path):
    with live(tmp_path, upscaler=FakeUpscaler(fail=True)) as server:
        async def body():
            async with client(server, "no-upscale") as c:
                created = await c.create("too big to upscale")
                return await c.until_status(created["job_id"], "completed", "failed")

        messages = run(body())
        result = messages[-1]["result"]
        assert messages[-1]["status"] == "completed"
        assert result["upscaled_filename"] is None and "upscaling failed" in result["upscale_error"]
        assert http_get(server, result["url"])[0] == 200


# -- API keys -------------------------------------------------------------------------------------

def test_api_keys_gate_the_socket_and_scope_jobs(tmp_path):
    with live(tmp_path, api_keys=["key-one", "key-two"]) as server:
        async def refused(query="", headers=None):
            async with client(server, "k", query=query, headers=headers) as c:
                error = await c.recv()
                with pytest.raises(ConnectionClosed) as closed:
                    await c.recv()
                return error, closed.value.rcvd.code

        async def body():
            results = [await refused(), await refused(query="api_key=wrong")]
            async with client(server, "shared-id", headers={"Authorization": "Bearer key-one"}) as one:
                created = await one.create("owned")
                await one.until_status(created["job_id"], "completed")
            async with client(server, "shared-id", query="api_key=key-two") as two:
                listed = await two.request(type="get_client_jobs")
                hidden = await two.request(type="get_status", job_id=created["job_id"])
            return results, listed, hidden

        results, listed, hidden = run(body())
        for error, code in results:
            assert error["type"] == "error" and error["code"] == "invalid_api_key"
            assert code == CLOSE_UNAUTHORIZED == 4401
        assert listed["jobs"] == []
        assert hidden["type"] == "error" and hidden["code"] == "job_not_found"


# -- the real model -------------------------------------------------------------------------------

def test_end_to_end_with_the_tiny_model(tiny_server):
    pytest.importorskip("server.model")

    async def body():
        async with client(tiny_server, "tiny-e2e") as c:
            created = await c.create("a tiny lighthouse", steps=2, upscale=False, preview=True, seed=11)
            return created, await c.until_status(created["job_id"], "completed", "failed")

    created, messages = run(body())
    assert created["status"] == "pending"
    kinds = [m["type"] for m in messages]
    assert messages[-1]["status"] == "completed", messages[-1]
    assert [m["progress"]["current_step"] for m in messages if m["type"] == "job_progress"] == [1, 2]
    assert "job_preview" in kinds and "generated" not in [m.get("status") for m in messages]
    status, headers, data = http_get(tiny_server, messages[-1]["result"]["url"])
    assert status == 200 and headers["content-type"] == "image/png" and data.startswith(b"\x89PNG")
