"""Faults: client disconnect storms (no leaked tasks, threads, file descriptors, jobs or
subscribers), out-of-memory in generation and upscaling (that job fails or loses only its upscale,
the next succeeds), and a full or unusable disk (a clear failure, never a partial file, no hang)."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import socket
import struct
import threading
from pathlib import Path

import httpx
import pytest

from server.testing.fakes import FakeGenerator, FakeUpscaler
from tests.conftest import finished_by_status, tmpfs
from tests.reliability.helpers import (TIMEOUT, live, resources, run, settle, wait_until, ws_client)

URL = "/v1/images/generations"
STORM = 24


def raw_post(port: int, body: dict) -> socket.socket:
    """A request sent on a raw socket we can drop at any moment (RST on close)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = reset
    sock.sendall(b"POST " + URL.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def gauges(server) -> tuple[float, float]:
    metrics = server.app.state.metrics
    return (metrics.registry.get_sample_value("t2i_active_sse_streams"),
            metrics.registry.get_sample_value("t2i_websocket_connections"))


def storm(server, round_: int) -> dict:
    """Open STORM SSE streams, STORM plain requests and STORM WebSocket jobs, then drop them all
    mid-stream / mid-job. Returns what was seen while they were open."""
    engine = server.engine
    tag = f"r{round_}"
    server.generator.gate = gate = threading.Event()  # the GPU holds every job until all clients left
    streams = [raw_post(server.port, {"prompt": f"{tag} sse {i}", "size": "64x64", "stream": True,
                                      "num_inference_steps": 50}) for i in range(STORM)]
    for sock in streams:  # the 200 and headers came: the stream is open
        assert sock.recv(12) == b"HTTP/1.1 200"
    plain = [raw_post(server.port, {"prompt": f"{tag} plain {i}", "size": "64x64", "num_inference_steps": 50})
             for i in range(STORM)]
    assert wait_until(lambda: sum(engine.counts().values()) >= 2 * STORM), sum(engine.counts().values())

    async def sockets():
        async with contextlib.AsyncExitStack() as stack:
            opened = []
            for i in range(STORM):
                client = await stack.enter_async_context(ws_client(server, f"{tag}-ws-{i}" if i % 2 else None))
                await client.create(f"{tag} ws {i}", steps=50, upscale=False)
                opened.append(client)
            open_gauges = gauges(server)
            for client in opened:
                client.ws.transport.abort()  # no close frame: a vanished peer
            return open_gauges

    open_gauges = run(sockets())
    for sock in streams + plain:
        sock.close()
    jobs_open = sum(engine.counts().values())
    gate.set()
    return {"open_gauges": open_gauges, "jobs_open": jobs_open}


def test_disconnect_storms_leak_nothing(tmp_path):
    with live(tmp_path, generator=FakeGenerator(step_s=0.002), max_queue=200, max_queue_per_client=200) as server:
        seen = [storm(server, 0)]
        base = settle(server, resources(server))  # pools warmed up by the first storm
        wait_until(lambda: not server.engine.counts())
        base = settle(server, base)
        seen.append(storm(server, 1))
        drained = wait_until(lambda: not server.engine.counts(), timeout=30)
        after = settle(server, base)
        final_gauges = gauges(server)
        finished = finished_by_status(server.app.state.metrics)
        health = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    print(f"\nstorms: {seen}; finished jobs {finished}; resources {base} -> {after}")
    assert all(s["open_gauges"] == (STORM, STORM) for s in seen), seen  # the gauges did move
    assert drained and final_gauges == (0.0, 0.0)
    assert after.within(base), (base, after)
    assert after.active_jobs == 0 and after.subscribers == 0
    # Dropped HTTP clients and anonymous sockets withdrew their interest: those jobs were cancelled;
    # named WebSocket clients keep their jobs across a disconnect (they may reconnect), so those ran.
    assert finished.get("cancelled", 0) >= 2 * (2 * STORM + STORM // 2) - 4
    assert health["status"] == "ok" and health["jobs"] == {}


# -- out of memory ------------------------------------------------------------------------------------

def test_oom_in_generation_fails_that_job_and_the_next_succeeds(fake_server):
    url = fake_server.url + URL
    oom = httpx.post(url, json={"prompt": "fail:oom big", "size": "64x64"}, timeout=TIMEOUT)
    after_oom = httpx.post(url, json={"prompt": "normal after oom", "size": "64x64"}, timeout=TIMEOUT)
    with httpx.stream("POST", url, json={"prompt": "fail:oom streamed", "size": "64x64", "stream": True},
                      timeout=TIMEOUT) as stream:
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:") and "{" in line]
    streamed_after = httpx.post(url, json={"prompt": "stream after oom", "size": "64x64", "stream": True},
                                timeout=TIMEOUT)

    async def ws():
        async with ws_client(fake_server, "oom") as client:
            failed = await client.create("fail:oom ws", upscale=False)
            failed = await client.until_status(failed["job_id"], "failed", "completed")
            ok = await client.create("fine ws", upscale=False)
            return failed, await client.until_status(ok["job_id"], "completed", "failed")

    ws_failed, ws_ok = run(ws())
    assert oom.status_code == 500 and oom.json()["error"]["code"] == "out_of_memory"
    assert "out of GPU memory" in oom.json()["error"]["message"]
    assert after_oom.status_code == 200 and after_oom.json()["data"][0]["b64_json"]
    assert [e.get("type") for e in events] == ["error"] and events[0]["error"]["code"] == "out_of_memory"
    assert streamed_after.status_code == 200 and '"is_final": true' in streamed_after.text.replace('":true', '": true')
    assert ws_failed["status"] == "failed" and "out of GPU memory" in ws_failed["error"]
    assert ws_ok["status"] == "completed"


def test_oom_in_upscaling_keeps_the_image_and_the_next_upscale_succeeds(tmp_path):
    upscaler = FakeUpscaler(fail=True)
    with live(tmp_path, upscaler=upscaler) as server:
        url = server.url + URL
        failed = httpx.post(url, json={"prompt": "upscale oom", "size": "64x64", "upscale": True}, timeout=TIMEOUT)

        async def ws(prompt):
            async with ws_client(server, "up") as client:
                created = await client.create(prompt, upscale=True)
                return await client.until_status(created["job_id"], "completed", "failed")

        ws_failed = run(ws("ws upscale oom"))
        upscaler.fail = False  # the memory is back
        ok = httpx.post(url, json={"prompt": "upscale fine", "size": "64x64", "upscale": True}, timeout=TIMEOUT)
        ws_ok = run(ws("ws upscale fine"))
        kept = httpx.get(server.url + "/api/image/" + ws_failed["result"]["filename"], timeout=TIMEOUT)
    body = failed.json()
    assert failed.status_code == 200 and body["data"][0]["b64_json"] and "upscaled_b64_json" not in body["data"][0]
    assert "out of GPU memory while upscaling" in body["upscale_error"]
    assert ws_failed["status"] == "completed" and ws_failed["result"]["upscaled_filename"] is None
    assert kept.status_code == 200
    assert ok.status_code == 200 and ok.json()["data"][0]["upscaled_b64_json"] and "upscale_error" not in ok.json()
    assert ws_ok["result"]["upscaled_filename"] and not ws_ok["result"].get("upscale_error")


# -- disk ----------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 320 KiB tmpfs (root only): a real ENOSPC from the kernel on the real write path."""
    with tmpfs(tmp_path, "320k") as mount:
        yield mount


def _files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir() if p.name.endswith((".png", ".part"))}


def test_full_disk_fails_the_job_clearly_and_never_serves_a_partial_file(tmp_path, tiny_disk):
    # The free-space check off: jobs reach the write path (as an image larger than the margin does).
    with live(tmp_path, generator=FakeGenerator(noise=True), output_dir=tiny_disk, min_free_disk_bytes=0) as server:
        url = server.url + URL
        small = httpx.post(url, json={"prompt": "fits", "size": "64x64", "response_format": "url"}, timeout=TIMEOUT)
        before = _files(tiny_disk)
        big = httpx.post(url, json={"prompt": "does not fit", "size": "512x512", "response_format": "url"},
                         timeout=TIMEOUT)

        async def ws():
            async with ws_client(server, "disk") as client:
                created = await client.create("does not fit either", width=512, height=512, upscale=False)
                return await client.until_status(created["job_id"], "failed", "completed")

        ws_failed = run(ws())
        partials = _files(tiny_disk) - before
        guessed = httpx.get(server.url + "/api/image/" + small.json()["data"][0]["url"].rsplit("/", 1)[1]
                            .replace("fits", "does-not-fit"), timeout=TIMEOUT)
        # Keep writing until the job database itself cannot grow: every request still gets an answer.
        answers = [httpx.post(url, json={"prompt": f"filler {i}", "size": "64x64", "response_format": "url"},
                              timeout=TIMEOUT) for i in range(12)]
    assert small.status_code == 200
    assert big.status_code == 500 and big.json()["error"]["message"] == "could not write the image: No space left on device"
    assert ws_failed["status"] == "failed" and "No space left on device" in ws_failed["error"]
    assert partials == set() and guessed.status_code == 404
    codes = [a.status_code for a in answers]
    assert set(codes) <= {200, 500, 503}, codes
    assert 503 in codes, codes  # the store filled up: new jobs are refused with a clear reason
    refused = next(a for a in answers if a.status_code == 503).json()["error"]
    assert refused["code"] == "storage_unavailable" and "disk may be full" in refused["message"]


def test_a_nearly_full_disk_refuses_new_jobs_and_recovers_by_itself(tmp_path):
    seeds = itertools.count(100)  # every new request a new job (the free space is read at most once a second)
    with tmpfs(tmp_path, "4m") as disk, live(tmp_path, output_dir=disk, min_free_disk_bytes=2 * 1024**2) as server:
        url = server.url + URL
        body = {"prompt": "made before the disk filled", "size": "64x64", "response_format": "url", "seed": 1}

        def new_job() -> httpx.Response:
            return httpx.post(url, json={**body, "seed": next(seeds)}, timeout=TIMEOUT)

        first = httpx.post(url, json=body, timeout=TIMEOUT)
        (disk / "ballast").write_bytes(b"\0" * (3 * 1024**2))  # leaves less than the 2 MiB new jobs need
        refused = wait_until(lambda: new_job().status_code == 503)
        answer = new_job()
        cached = httpx.post(url, json=body, timeout=TIMEOUT)  # the same seed: the cached job, no disk

        async def ws():
            async with ws_client(server, "disk") as client:
                return await client.create("new over ws", seed=next(seeds))

        ws_refused = run(ws())
        (disk / "ballast").unlink()  # space is back (retention or the operator): no restart needed
        recovered = wait_until(lambda: new_job().status_code == 200)
    assert first.status_code == 200 and refused and answer.status_code == 503 and answer.headers["retry-after"]
    error = answer.json()["error"]
    assert error["code"] == "storage_unavailable" and "nearly full" in error["message"], error
    assert cached.status_code == 200, cached.text
    assert ws_refused["type"] == "error" and ws_refused.get("code") == "storage_unavailable", ws_refused
    assert recovered


def test_unusable_output_directory_fails_the_job_and_recovers(tmp_path):
    """Portable variant (no mount): the output directory is replaced by a file under the running
    server, so every image write fails in the real write path."""
    with live(tmp_path) as server:
        outputs = server.app.state.settings.output_dir
        url = server.url + URL
        assert httpx.post(url, json={"prompt": "warm", "size": "64x64"}, timeout=TIMEOUT).status_code == 200
        moved = outputs.with_name("outputs-moved")
        outputs.rename(moved)  # the job database stays open in the moved directory
        outputs.write_bytes(b"not a directory")
        failed = httpx.post(url, json={"prompt": "nowhere to write", "size": "64x64"}, timeout=TIMEOUT)
        outputs.unlink()
        moved.rename(outputs)
        recovered = httpx.post(url, json={"prompt": "somewhere again", "size": "64x64", "response_format": "url"},
                               timeout=TIMEOUT)
        served = httpx.get(recovered.json()["data"][0]["url"], timeout=TIMEOUT)
    assert failed.status_code == 500 and failed.json()["error"]["message"].startswith("could not write the image: ")
    assert recovered.status_code == 200 and served.status_code == 200
    assert base64.b64encode(served.content)  # a whole PNG
    assert served.content.startswith(b"\x89PNG")
