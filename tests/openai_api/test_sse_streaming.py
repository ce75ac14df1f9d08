"""The SSE streams of POST /v1/images/generations on the wire (raw httpx), plus disconnects."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from server.core.profiles import get_profile
from server.core.spec import Limits, SpecInput, normalize

from tests.conftest import terminal_record
from tests.openai_api.test_routes_openai import StepGate, client, serve  # noqa: F401  (serve is a fixture)

PATH = "/v1/images/generations"


def sse_events(response: httpx.Response, comments: list[str] | None = None, lines=None):
    """Parse an SSE body into {"event", "data"} dicts; comment lines go to ``comments``.

    Keep the returned generator while the stream should stay open: dropping a half-read one
    closes the connection (httpcore closes a stream whose iterator is discarded)."""
    event, data = None, []
    for line in lines if lines is not None else response.iter_lines():
        if line.startswith(":"):
            if comments is not None:
                comments.append(line)
        elif line.startswith("event:"):
            event = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].strip())
        elif line == "":
            if data:
                yield {"event": event, "data": "\n".join(data)}
            event, data = None, []
        else:
            raise AssertionError(f"not an SSE line: {line!r}")


def image(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def job_status(server, job_id: str) -> str:
    return server.call(server.engine.get(job_id)).status.value


def wait_terminal(server, job_id: str, timeout: float = 10.0):
    """The job's terminal record, waiting on the engine's events (not on a clock)."""
    return server.call(terminal_record(server.engine, job_id, timeout))


def wait_subscribers(server, job_id: str, count: int, timeout: float = 10.0) -> None:
    """Bounded wait until ``count`` streams follow the job. A stream releases its interest before
    unsubscribing, so a drop in this count means the release has happened."""

    async def current() -> int:
        return server.engine.hub.subscriber_count(job_id)

    deadline, tick = time.monotonic() + timeout, threading.Event()
    while server.call(current()) != count:
        assert time.monotonic() < deadline, f"still {server.call(current())} subscribers, wanted {count}"
        tick.wait(0.01)


def test_step_dialect_field_by_field(serve):
    gate = StepGate(free=4)  # steps 1-4 run, step 5 waits: previews of steps 2 and 4 exist
    server = serve(gate=gate)
    body = {"prompt": "a step stream", "size": "96x64", "stream": True, "num_inference_steps": 20, "seed": 9}
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + PATH, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache" and response.headers["x-accel-buffering"] == "no"
        events = sse_events(response)
        first = json.loads(next(events)["data"])
        # The first preview is here while the GPU is still held: it was sent before generation ended.
        assert first["is_final"] is False and job_status(server, first["job_id"]) == "processing"
        gate.open()
        rest = list(events)
    assert rest[-1] == {"event": None, "data": "[DONE]"}
    steps = [first, *[json.loads(e["data"]) for e in rest[:-1]]]
    previews, final = steps[:-1], steps[-1]
    assert [p["step"] for p in previews] == list(range(2, 21, 2))  # every 10% of 20 steps
    assert [p["progress"] for p in previews] == [10.0 * i for i in range(1, 11)]
    for preview in previews:
        assert preview["total_steps"] == 20 and preview["index"] == 0 and preview["job_id"] == first["job_id"]
        assert isinstance(preview["timestamp"], float) and image(preview["image"]).format == "PNG"
    assert all(a["timestamp"] <= b["timestamp"] for a, b in zip(steps, steps[1:]))
    assert final["is_final"] is True and final["step"] == 20 and final["progress"] == 100.0
    assert image(final["image"]).size == (96, 64) and final["seed"] == 9


def test_step_dialect_n2_has_an_index_and_a_final_per_image(fake_server):
    body = {"prompt": "two", "size": "64x64", "stream": True, "n": 2, "num_inference_steps": 4, "output_format": "jpeg"}
    with httpx.stream("POST", fake_server.url + PATH, json=body, timeout=30) as response:
        events = list(sse_events(response))
    assert events[-1]["data"] == "[DONE]"
    data = [json.loads(e["data"]) for e in events[:-1]]
    assert [(d["index"], d["step"], d["is_final"]) for d in data] == [
        (0, 1, False), (0, 2, False), (0, 3, False), (0, 4, False),
        (1, 1, False), (1, 2, False), (1, 3, False), (1, 4, False), (0, 4, True), (1, 4, True)]
    assert [d["progress"] for d in data[:8]] == [12.5, 25.0, 37.5, 50.0, 62.5, 75.0, 87.5, 100.0]
    assert {image(d["image"]).format for d in data} == {"JPEG"}  # previews re-encoded too


def test_openai_dialect_on_the_wire(fake_server):
    body = {"prompt": "partials", "size": "64x64", "stream": True, "n": 2, "partial_images": 2,
            "num_inference_steps": 10, "output_format": "webp", "quality": "medium"}
    with httpx.stream("POST", fake_server.url + PATH, json=body, timeout=30) as response:
        events = list(sse_events(response))
    data = [json.loads(e["data"]) for e in events]
    assert [e["event"] for e in events] == [d["type"] for d in data]  # the event line and the JSON type agree
    assert [(d["type"].rsplit(".", 1)[1], d["image_index"], d.get("partial_image_index")) for d in data] == [
        ("partial_image", 0, 0), ("partial_image", 0, 1), ("partial_image", 1, 0), ("partial_image", 1, 1),
        ("completed", 0, None), ("completed", 1, None)]
    assert all(image(d["b64_json"]).format == "WEBP" for d in data)
    for d in data:
        assert (d["size"], d["quality"], d["background"], d["output_format"]) == ("64x64", "medium", "opaque", "webp")
        assert isinstance(d["created_at"], int)
    assert data[-1]["usage"]["input_tokens"] == 1 and "[DONE]" not in [e["data"] for e in events]


def test_partial_images_zero_sends_only_completed(fake_server):
    body = {"prompt": "no partials", "size": "64x64", "stream": True, "partial_images": 0}
    with httpx.stream("POST", fake_server.url + PATH, json=body, timeout=30) as response:
        events = list(sse_events(response))
    assert [e["event"] for e in events] == ["image_generation.completed"]


def test_validation_error_on_a_stream_is_plain_400(fake_server):
    response = httpx.post(fake_server.url + PATH, json={"prompt": "x", "stream": True, "partial_images": 9})
    assert response.status_code == 400 and response.json()["error"]["param"] == "partial_images"


def test_failing_job_sends_one_in_band_error(fake_server):
    body = {"prompt": "fail:error now", "size": "64x64", "stream": True}
    with httpx.stream("POST", fake_server.url + PATH, json=body, timeout=30) as response:
        assert response.status_code == 200
        events = list(sse_events(response))
    assert len(events) == 1 and events[0]["event"] == "error"
    error = json.loads(events[0]["data"])
    assert error["type"] == "error"
    assert error["error"] == {"message": "the generator failed", "type": "server_error", "param": None,
                              "code": "generation_failed"}
    with pytest.raises(openai.APIError, match="the generator failed"):  # the SDK raises on it, both dialects
        list(client(fake_server).images.generate(prompt="fail:error again", size="64x64", stream=True))
    with pytest.raises(openai.APIError, match="the generator failed"):
        list(client(fake_server).images.generate(prompt="fail:error again", size="64x64", stream=True,
                                                 partial_images=1))


def test_heartbeats_are_comments(serve):
    gate = StepGate()
    server = serve(gate=gate, sse_ping_s=0.05)
    body = {"prompt": "slow", "size": "64x64", "stream": True, "num_inference_steps": 2}
    comments: list[str] = []
    with httpx.stream("POST", server.url + PATH, json=body, timeout=30) as response:
        lines = response.iter_lines()
        while len(comments) < 3:  # the job is held: only the opening comment and heartbeats arrive
            line = next(lines)
            assert line == "" or line.startswith(":"), line
            if line:
                comments.append(line)
        gate.open()
        events = list(sse_events(response, comments, lines))
    assert comments[0].startswith(": job ")  # sent at once, before the job reaches the GPU
    assert comments[1:3] == [": ping", ": ping"] and all(c == ": ping" for c in comments[1:])
    assert events[-1]["data"] == "[DONE]" and json.loads(events[-2]["data"])["is_final"] is True


def _first_event(response: httpx.Response):
    """The first event's data, and the event iterator to read on (or drop, closing the stream)."""
    events = sse_events(response)
    return json.loads(next(events)["data"]), events


def test_disconnect_of_the_only_client_cancels_the_job(serve):
    gate = StepGate(free=2)
    server = serve(gate=gate)
    body = {"prompt": "abandoned", "size": "64x64", "stream": True, "num_inference_steps": 20, "seed": 1}
    with httpx.stream("POST", server.url + PATH, json=body, timeout=30) as response:
        job_id = _first_event(response)[0]["job_id"]
    wait_subscribers(server, job_id, 0)  # the server noticed the disconnect and released the job
    gate.open()
    assert wait_terminal(server, job_id).status.value == "cancelled"
    assert job_status(server, job_id) == "cancelled"


def test_disconnect_of_one_of_two_clients_keeps_the_job(serve):
    gate = StepGate(free=2)
    server = serve(gate=gate)
    body = {"prompt": "shared", "size": "64x64", "stream": True, "num_inference_steps": 20, "seed": 1}
    with httpx.Client(timeout=30) as http, http.stream("POST", server.url + PATH, json=body) as staying:
        with http.stream("POST", server.url + PATH, json=body) as leaving:
            job_id = _first_event(leaving)[0]["job_id"]
        first, events = _first_event(staying)
        assert first["job_id"] == job_id  # the same seed joined the same job
        wait_subscribers(server, job_id, 1)
        gate.open()
        rest = list(events)
    assert rest[-1]["data"] == "[DONE]" and json.loads(rest[-2]["data"])["is_final"] is True
    assert wait_terminal(server, job_id).status.value == "completed"


def test_non_streaming_client_that_leaves_releases_the_job(serve):
    gate = StepGate()
    server = serve(gate=gate)
    settings = server.app.state.settings
    limits = Limits(settings.max_prompt_chars, settings.max_n, settings.preview_method, settings.preview_percent)
    job_id = normalize(SpecInput(prompt="impatient", model="tiny-z-image", width=64, height=64, seed=4),
                       get_profile("tiny-z-image"), limits).job_id
    body = json.dumps({"prompt": "impatient", "size": "64x64", "seed": 4}).encode()
    head = f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # a client that will not wait
        sock.sendall(head.encode() + body)
        wait_subscribers(server, job_id, 1)  # the request is waiting on its job
        # Pending or already on the (gated) GPU, depending on how fast the worker picked it up.
        assert job_status(server, job_id) in ("pending", "processing")
    wait_subscribers(server, job_id, 0)  # closing the socket released the job
    gate.open()
    assert wait_terminal(server, job_id).status.value == "cancelled"
