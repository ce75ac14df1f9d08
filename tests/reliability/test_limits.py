"""Every input limit answers with a clear error naming the limit, over HTTP and WebSocket:
prompt length, size range and multiple, steps range, n, request body size (413), WebSocket
frame size, jobs per client and the total queue (429 / queue_full)."""

from __future__ import annotations

import http.client
import json
import threading

import httpx
import pytest

from server.testing.fakes import FakeGenerator
from tests.reliability.helpers import TIMEOUT, live, run, ws_client

URL = "/v1/images/generations"
# (body fields, param the error names, words the message must contain)
HTTP_LIMITS = [
    ({"prompt": "x" * 4001}, "prompt", "4000 characters"),
    ({"prompt": "ok", "negative_prompt": "x" * 4001}, "negative_prompt", "4000 characters"),
    ({"prompt": "ok", "size": "32x32"}, "size", "between 64 and 1024"),
    ({"prompt": "ok", "size": "2048x2048"}, "size", "between 64 and 1024"),
    ({"prompt": "ok", "size": "100x64"}, "size", "multiple of 16"),
    ({"prompt": "ok", "size": "big"}, "size", "WIDTHxHEIGHT"),
    # ASCII digits only: '²' passed str.isdigit() and crashed int() (500); fullwidth and Arabic-Indic
    # digits were silently read as 256.
    ({"prompt": "ok", "size": "\u00b2x256"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "ok", "size": "\uff12\uff15\uff16x256"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "ok", "size": "\u0662\u0665\u0666x\u0662\u0665\u0666"}, "size", "WIDTHxHEIGHT"),
    ({"prompt": "ok", "num_inference_steps": 0}, "num_inference_steps", "greater than or equal to 1"),
    ({"prompt": "ok", "num_inference_steps": 101}, "num_inference_steps", "between 1 and 100"),
    ({"prompt": "ok", "n": 0}, "n", "greater than or equal to 1"),
    ({"prompt": "ok", "n": 5}, "n", "between 1 and 4"),
    ({"prompt": "ok", "seed": -1}, "seed", "greater than or equal to 0"),
    ({"prompt": "ok", "guidance_scale": 31}, "guidance_scale", "between 0 and 30"),
    # Strict types (found by schemathesis): no silent bool/str coercion into numbers.
    ({"prompt": "ok", "guidance_scale": True}, "guidance_scale", "valid number"),
    ({"prompt": "ok", "n": "2"}, "n", "valid integer"),
    ({"prompt": "ok", "num_inference_steps": True}, "num_inference_steps", "valid integer"),
]
WS_LIMITS = [
    ({"prompt": "x" * 4001}, "prompt", "4000 characters"),
    ({"prompt": "ok", "width": 32}, "width", "between 64 and 1024"),
    ({"prompt": "ok", "width": 64, "height": 72}, "height", "multiple of 16"),
    ({"prompt": "ok", "steps": 0}, "steps", "between 1 and 100"),
    ({"prompt": "ok", "steps": 101}, "steps", "between 1 and 100"),
    ({"prompt": "ok", "width": "\u00b2", "height": 256}, "width", "valid integer"),
    ({"prompt": "ok", "width": "\uff12\uff15\uff16", "height": 256}, "width", "valid integer"),
]


@pytest.mark.parametrize("fields,param,words", HTTP_LIMITS, ids=[p for _, p, _ in HTTP_LIMITS])
def test_http_limits_are_400_naming_the_param(fake_server, fields, param, words):
    response = httpx.post(fake_server.url + URL, json=fields, timeout=TIMEOUT)
    error = response.json()["error"]
    assert response.status_code == 400 and error["param"] == param, error
    assert words in error["message"], error
    assert fake_server.generator.calls == []


def test_ws_limits_are_error_frames_naming_the_param(fake_server):
    async def body():
        async with ws_client(fake_server, "limits") as client:
            return [await client.request(type="create_job", params=params) for params, _, _ in WS_LIMITS]

    for reply, (_, param, words) in zip(run(body()), WS_LIMITS):
        assert reply["type"] == "error" and reply["param"] == param and words in reply["message"], reply
    assert fake_server.generator.calls == []


def test_request_body_over_the_limit_is_413_in_the_envelope(tmp_path):
    with live(tmp_path, max_body_bytes=4096) as server:
        big = {"prompt": "ok", "user": "u" * 5000}
        declared = httpx.post(server.url + URL, json=big, timeout=TIMEOUT)

        def chunks():  # no Content-Length: chunked transfer encoding
            yield b'{"prompt": "ok", "user": "'
            for _ in range(50):
                yield b"u" * 1000
            yield b'"}'

        chunked = httpx.post(server.url + URL, content=chunks(), headers={"content-type": "application/json"},
                             timeout=TIMEOUT)
        small_chunked = httpx.post(server.url + URL, content=iter([b'{"prompt": "ok", ', b'"size": "64x64"}']),
                                   headers={"content-type": "application/json"}, timeout=TIMEOUT)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=TIMEOUT)
        conn.putrequest("POST", URL)  # a lying client: declares 10 MB, sends nothing
        conn.putheader("Content-Length", str(10 * 2**20))
        conn.putheader("Content-Type", "application/json")
        conn.endheaders()
        lying = conn.getresponse()
        lying_status, lying_body = lying.status, json.loads(lying.read())
        conn.close()
        preflight_ok = server.engine.accepting
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and "4096 bytes" in error["message"]
        assert error["type"] == "invalid_request_error"
    assert lying_status == 413 and lying_body["error"]["code"] == "request_too_large"
    assert small_chunked.status_code == 200, small_chunked.text  # chunked bodies under the limit pass
    assert preflight_ok and server.generator.calls.__len__() == 1


def test_ws_frame_over_the_protocol_limit_is_an_error_frame(tmp_path):
    with live(tmp_path, ws_max_frame_bytes=10_000) as server:
        async def body():
            async with ws_client(server, "frames") as client:
                await client.ws.send(json.dumps({"type": "create_job", "params": {"prompt": "x" * 10_001}}))
                too_big = await client.recv()
                still_usable = await client.create("after a big frame", upscale=False)
                return too_big, still_usable

        too_big, still_usable = run(body())
    assert too_big["code"] == "frame_too_large" and "10000 bytes" in too_big["message"]
    assert still_usable["type"] == "job_status"


def test_jobs_per_client_and_total_queue_limits(tmp_path):
    gate = threading.Event()
    with live(tmp_path, generator=FakeGenerator(gate=gate), max_queue=3, max_queue_per_client=2) as server:
        async def body():
            async with ws_client(server, "greedy") as greedy:
                own = [await greedy.create(f"mine {i}", upscale=False) for i in range(3)]
                # Another client address: the per-client limit is per address (or API key) too.
                async with ws_client(server, "other", local_addr=("127.0.0.2", 0)) as other:
                    others = [await other.create(f"theirs {i}", upscale=False) for i in range(2)]
                    # 2 pending + 1 processing from 'greedy'... the queue holds 3 pending at most
                    http_full = httpx.post(server.url + URL, json={"prompt": "over the top", "size": "64x64"},
                                           timeout=TIMEOUT)
                    extra = await other.create("one more", upscale=False)
                gate.set()
                return own, others, http_full, extra

        own, others, http_full, extra = run(body())
    assert [m.get("code", m["type"]) for m in own] == ["job_status", "job_status", "client_queue_full"]
    assert "2 unfinished jobs" in own[2]["message"]
    assert [m.get("code", m["type"]) for m in others] == ["job_status", "job_status"]
    assert http_full.status_code == 429 and http_full.headers["retry-after"].isdigit()
    assert http_full.json()["error"]["code"] == "queue_full" and "retry in" in http_full.json()["error"]["message"]
    assert extra["code"] in ("queue_full", "client_queue_full")


def test_default_body_limit_fits_the_largest_request_but_not_padding(tmp_path):
    """1 MiB of ``{}`` in an ignored field was ~19 MB of parsed JSON per waiting request (150 of
    them held 3.3 GB): the default limit is 128 KiB, which still fits the largest valid request
    (two 4000-character prompts of emoji, sent with every character escaped)."""
    with live(tmp_path) as server:
        padded = json.dumps({"prompt": "padded", "size": "64x64", "junk": [{}] * 260_000}).encode()
        refused = httpx.post(server.url + URL, content=padded, headers={"content-type": "application/json"},
                             timeout=TIMEOUT)
        largest = json.dumps({"prompt": "\U0001F338" * 4000, "negative_prompt": "\U0001F30A" * 4000,
                              "size": "64x64", "num_inference_steps": 1}, ensure_ascii=True).encode()
        accepted = httpx.post(server.url + URL, content=largest, headers={"content-type": "application/json"},
                              timeout=TIMEOUT)
    assert len(padded) > 1_000_000 and refused.status_code == 413
    assert refused.json()["error"]["code"] == "request_too_large"
    assert len(largest) > 90_000 and accepted.status_code == 200, accepted.text[:300]
