"""SIGTERM: new work refused, the running job failed after the grace period, its open stream ended
with one in-band error event, and the process exits 0."""

from __future__ import annotations

import json
import signal

import httpx

from tests.conftest import SHARED_CACHE, ServerProcess

LONG = {"prompt": "still running at SIGTERM", "size": "512x512", "seed": 3, "num_inference_steps": 100, "stream": True}


def test_sigterm_ends_streams_with_an_error_event_and_exits_zero(tmp_path):
    server = ServerProcess("--model", "tiny-z-image", "--output-dir", str(tmp_path / "out"),
                           "--cache-dir", str(SHARED_CACHE), "--shutdown-grace-s", "1").start()
    try:
        events = []
        with httpx.Client(timeout=60) as client, client.stream("POST", server.url + "/v1/images/generations", json=LONG) as stream:
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                events.append(json.loads(line[5:]))
                if len(events) == 1:
                    server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
    assert events[0]["step"] >= 1
    assert events[-1]["type"] == "error"
    assert events[-1]["error"]["message"] == "server shutting down"
    assert sum(1 for event in events if event.get("type") == "error") == 1
