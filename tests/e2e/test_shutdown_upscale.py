"""Shutdown and cancel while a job is upscaling (issue 15, item 3).

SIGTERM mid-upscale: at the end of the grace period the upscale stops at its next tile, the job
completes with its image and ``upscale_error``, the open SSE stream gets its final event and ends
properly, and the process exits within grace + 5 s. A cancel during the upscale stops it within one
tile too; the job completes without the upscale (its image exists), it is not ``cancelled``."""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import threading
import time

import httpx

from server.testing.fakes import FakeUpscaler
from tests.conftest import live, run_async, terminal_record
from tests.conftest import ServerProcess
from tests.reliability.helpers import ws_client

GRACE_S = 2.0
TILE_S = 0.25  # the stand-in upscaler: 400 tiles of 0.25 s = 100 s per image, polling cancel per tile
GENERATED = re.compile(r'^t2i_jobs\{status="generated"\} 1\.0$', re.MULTILINE)


def serve_slow_upscaler(out) -> ServerProcess:
    server = ServerProcess("--fake-step-s", "0.01", "--fake-upscale-tiles", "400", "--fake-upscale-tile-s", str(TILE_S),
                           "--output-dir", str(out), "--shutdown-grace-s", str(GRACE_S))
    server.args[2] = "server.testing.serve"  # ``python -m server`` with the stand-ins injected
    return server.start()


def wait_until_upscaling(server: ServerProcess, timeout: float = 30.0) -> None:
    """Poll /metrics (another process: no event to wait on) until one job is ``generated``."""
    deadline = time.monotonic() + timeout
    while not GENERATED.search(httpx.get(server.url + "/metrics", timeout=5).text):
        assert time.monotonic() < deadline, "the job never reached generated"
        threading.Event().wait(0.05)


def test_sigterm_during_an_upscale_completes_the_job_without_it_and_ends_the_stream(tmp_path):
    out = tmp_path / "out"
    server = serve_slow_upscaler(out)
    lines: list[str] = []
    request = {"prompt": "upscaling at sigterm", "size": "64x64", "seed": 5, "num_inference_steps": 2,
               "stream": True, "upscale": True}

    def read_stream() -> None:
        with httpx.Client(timeout=60) as client, \
                client.stream("POST", server.url + "/v1/images/generations", json=request) as stream:
            lines.extend(stream.iter_lines())

    reader = threading.Thread(target=read_stream)
    try:
        reader.start()
        wait_until_upscaling(server)
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(GRACE_S + 5) == 0  # raises TimeoutExpired past grace + 5 s
        exited_after = time.monotonic() - signalled
        print(f"exited {exited_after:.1f} s after SIGTERM (grace {GRACE_S} s)")
        reader.join(10)
    finally:
        server.stop()
    assert not reader.is_alive()
    data = [line[5:].strip() for line in lines if line.startswith("data:")]
    assert data[-1] == "[DONE]", lines[-5:]
    final = json.loads(data[-2])
    assert final["is_final"] is True and final["image"] and final.get("upscaled_image") is None
    assert not any(line.startswith("event: error") for line in lines)
    assert exited_after >= GRACE_S  # the upscale had the grace period to finish
    with sqlite3.connect(out / "jobs.sqlite3") as db:
        status, result = db.execute("SELECT status, result FROM jobs").fetchone()
    assert status == "completed"
    assert json.loads(result)["upscale_error"] == "upscaling stopped: server shutting down"
    assert "ASGI callable returned without completing response" not in server.output()
    assert "Traceback" not in server.output()


def test_cancel_during_an_upscale_stops_it_within_one_tile(tmp_path):
    upscaler = FakeUpscaler(tile_s=0.1, tiles=1000)  # 100 s if nothing stopped it

    async def body(server):
        async with ws_client(server, "canceller") as client:
            created = await client.create("cancel me while upscaling", upscale=True)
            await client.until_status(created["job_id"], "generated")
            reply = await client.request(type="cancel_job", job_id=created["job_id"])
            tiles_at_cancel = upscaler.tiles_done
            asked = time.monotonic()
            final = await client.until_status(created["job_id"], "completed", "failed", "cancelled")
            return reply, final, tiles_at_cancel, time.monotonic() - asked

    with live(tmp_path, upscaler=upscaler) as server:
        reply, final, tiles_at_cancel, took = run_async(body(server))
    assert reply["type"] == "cancel_result" and reply["cancelled"] is True and reply["status"] == "generated"
    assert reply["message"] == "upscale stop requested; the job completes with its image without the upscale"
    assert final["status"] == "completed"  # its image exists: completed without the upscale
    assert final["result"]["upscale_error"] == "upscaling stopped: cancelled"
    assert final["result"]["filename"] and final["result"]["upscaled_filename"] is None
    print(f"cancel -> completed in {took:.2f} s, {upscaler.tiles_done - tiles_at_cancel} tile(s) after the cancel")
    assert upscaler.tiles_done - tiles_at_cancel <= 1 and took < 5  # one tile of 0.1 s, not 100 s


def test_the_last_http_client_leaving_during_an_upscale_stops_it(tmp_path):
    upscaler = FakeUpscaler(tile_s=0.1, tiles=1000)
    request = {"prompt": "left while upscaling", "size": "64x64", "seed": 9, "num_inference_steps": 2,
               "stream": True, "upscale": True}
    with live(tmp_path, upscaler=upscaler) as server:
        with httpx.Client(timeout=30) as client, \
                client.stream("POST", server.url + "/v1/images/generations", json=request) as stream:
            lines = stream.iter_lines()  # kept: a dropped iterator closes the response
            job_id = next(lines).removeprefix(": job ").strip()
            deadline = time.monotonic() + 30
            while server.engine.counts().get("generated") != 1:  # the server's own state, read in-process
                assert time.monotonic() < deadline, f"the job never reached generated: {server.engine.counts()}"
                threading.Event().wait(0.02)
        # The stream is closed: nobody wants the job any more.
        record = server.call(terminal_record(server.engine, job_id))
    assert record.status.value == "completed"
    assert record.result.upscale_error == "upscaling stopped: cancelled"
    assert upscaler.tiles_done < 100  # stopped at a tile boundary, long before the 1,000 tiles
