"""Answers with whole images (issue 16 item 1): the base64 is made from the stored files while the
answer is sent, so the bytes must be exactly those of the answer built in one piece (the pydantic
serialization of the same values); SSE heartbeats never land inside such an event; and image
requests are capped in total and per address, cached answers included. 127.0.0.2 and up stand in
for other machines."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx

from server.openai_api.schemas import CompletedEvent, ImagesResponse, StepEvent
from server.testing.fakes import FakeGenerator
from tests.conftest import wait_until
from tests.reliability.helpers import TIMEOUT, live

URL = "/v1/images/generations"
SPEC = {"prompt": "streamed answer", "size": "256x256", "seed": 5, "num_inference_steps": 2, "n": 2, "upscale": True}


def stored_pngs(tmp_path) -> set[bytes]:
    return {path.read_bytes() for path in tmp_path.rglob("*.png")}


def sse_data(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]


def test_answers_are_byte_identical_to_the_whole_answer(tmp_path):
    """JSON (fresh and cached), both SSE dialects and a webp answer: every body re-serialises to
    the same bytes, and every image is its stored file."""
    with live(tmp_path, generator=FakeGenerator(noise=True)) as server:
        fresh = httpx.post(server.url + URL, json=SPEC, timeout=TIMEOUT)
        cached = httpx.post(server.url + URL, json=SPEC, timeout=TIMEOUT)
        steps = httpx.post(server.url + URL, json={**SPEC, "stream": True}, timeout=TIMEOUT).text
        openai = httpx.post(server.url + URL, json={**SPEC, "stream": True, "partial_images": 1}, timeout=TIMEOUT).text
        webp = httpx.post(server.url + URL, json={**SPEC, "output_format": "webp"}, timeout=TIMEOUT)
        pngs = stored_pngs(tmp_path)
    assert len(pngs) == 4  # two images, two upscaled
    for answer in (fresh, cached, webp):
        assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
        assert int(answer.headers["content-length"]) == len(answer.content)
        rebuilt = ImagesResponse.model_validate_json(answer.content).model_dump_json(exclude_none=True)
        assert answer.content == rebuilt.encode()
    assert fresh.content == cached.content
    images = [d[key] for d in fresh.json()["data"] for key in ("b64_json", "upscaled_b64_json")]
    assert {base64.b64decode(b) for b in images} == pngs
    assert all(d["b64_json"] not in images for d in webp.json()["data"])
    finals = [d for d in sse_data(steps) if d != "[DONE]" and json.loads(d)["is_final"]]
    assert [StepEvent.model_validate_json(d).model_dump_json(exclude_none=True) for d in finals] == finals
    assert {base64.b64decode(json.loads(d)[key]) for d in finals for key in ("image", "upscaled_image")} == pngs
    completed = [d for d in sse_data(openai) if json.loads(d)["type"].endswith(".completed")]
    assert [CompletedEvent.model_validate_json(d).model_dump_json(exclude_none=True) for d in completed] == completed
    assert {base64.b64decode(json.loads(d)["b64_json"]) for d in completed} <= pngs and len(completed) == 2


def slow_stream(server, body: dict) -> bytes:
    """The raw SSE body, read 16 KiB at a time at a pace far slower than the heartbeats."""
    address = urlparse(server.url)
    payload = json.dumps(body).encode()
    with socket.create_connection((address.hostname, address.port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16_384)
        sock.sendall(b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        received = bytearray()
        while chunk := sock.recv(16_384):
            received += chunk
            time.sleep(0.002)  # the slow reader itself, not a wait for an event
    return bytes(received)


def dechunk(body: bytes) -> bytes:
    """An HTTP/1.1 chunked body's content."""
    out, at = bytearray(), 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += body[end + 2:end + 2 + size]
        at = end + 2 + size + 2


def test_heartbeats_never_land_inside_an_event(tmp_path):
    """A 5.6 MB final event read slowly under a 10 ms heartbeat: heartbeats are sent around it,
    never in it (each one inside would break the event's JSON)."""
    with live(tmp_path, generator=FakeGenerator(noise=True), sse_ping_s=0.01) as server:
        raw = slow_stream(server, {**SPEC, "size": "1024x1024", "n": 1, "upscale": False, "stream": True})
        pngs = stored_pngs(tmp_path)
    text = dechunk(raw.split(b"\r\n\r\n", 1)[1]).decode()
    data = [d for d in sse_data(text) if d != "[DONE]"]
    events = [json.loads(d) for d in data]  # a heartbeat inside an event: not JSON
    final = [e for e in events if e["is_final"]]
    assert len(final) == 1 and base64.b64decode(final[0]["image"]) in pngs
    assert text.count(": ping") >= 1  # heartbeats were sent (around the events)
    assert text.rstrip("\n").endswith("data: [DONE]")


def post_from(server, address: str, body: dict) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=TIMEOUT) as client:
        return client.post(server.url + URL, json=body)


def test_image_requests_are_capped_per_address_and_in_total(tmp_path):
    """Per address 2, in total 3: two waiting requests fill 127.0.0.1's share (a third, even one
    answered from the cache, gets 429); 127.0.0.2 gets the last slot; 127.0.0.3 then gets 503. Once
    the job finishes, every address is served again."""
    gate = threading.Event()
    small = {"prompt": "capped", "size": "64x64", "num_inference_steps": 2, "upscale": False}
    with live(tmp_path, generator=FakeGenerator(gate=gate), max_image_requests=3,
              max_image_requests_per_address=2) as server:
        gate.set()
        cached = post_from(server, "127.0.0.1", {**small, "seed": 1})  # a finished job to answer from the cache
        gate.clear()
        waiting = [threading.Thread(target=post_from, args=(server, address, {**small, "seed": 2}))
                   for address in ("127.0.0.1", "127.0.0.1", "127.0.0.2")]
        for thread in waiting:
            thread.start()
        assert wait_for_requests(server, 3)
        over_address = post_from(server, "127.0.0.1", {**small, "seed": 1})
        over_total = post_from(server, "127.0.0.3", {**small, "seed": 1})
        gate.set()
        for thread in waiting:
            thread.join(TIMEOUT)
        after = [post_from(server, address, {**small, "seed": 1}) for address in ("127.0.0.1", "127.0.0.3")]
    assert cached.status_code == 200
    assert over_address.status_code == 429 and over_address.headers["retry-after"] == "2"
    assert over_address.json()["error"]["code"] == "too_many_requests"
    assert over_address.json()["error"]["type"] == "rate_limit_error"
    assert over_total.status_code == 503 and over_total.headers["retry-after"] == "2"
    assert over_total.json()["error"]["code"] == "server_busy"
    assert [r.status_code for r in after] == [200, 200]


def wait_for_requests(server, count: int) -> bool:
    """Until ``count`` requests wait on the held job (each subscribes once admitted, so its slot is
    held). Probing with requests instead would take a slot itself and could refuse a late arrival."""

    async def waiting() -> int:
        return server.engine.hub.subscriber_count()

    return wait_until(lambda: server.call(waiting()) == count, TIMEOUT)
