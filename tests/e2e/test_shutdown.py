"""SIGTERM: new work refused, the running job stopped after the grace period, its open stream ended
with one in-band error event, and the process exits 0. What the stop cut short is kept: the next
start on the same directory runs it, and a repeat of the request gets its image (issue 15)."""

from __future__ import annotations

import json
import signal
import sqlite3

import httpx
import openai

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
    assert events[-1]["error"]["code"] == "shutting_down"
    assert events[-1]["error"]["message"].startswith("server shutting down; the job is kept")
    assert sum(1 for event in events if event.get("type") == "error") == 1


def open_stream(client: httpx.Client, url: str, body: dict):
    """A streamed request, entered: (its context, its lines, its job id from the first comment)."""
    stream = client.stream("POST", url + "/v1/images/generations", json={**body, "stream": True})
    response = stream.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    first = next(lines)
    assert first.startswith(": job "), first
    return stream, lines, first.removeprefix(": job ").strip()


def errors_until_end(lines) -> list[dict]:
    events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    return [event for event in events if event.get("type") == "error"]


def test_sigterm_keeps_the_jobs_it_cut_short_for_the_next_start(tmp_path):
    out = tmp_path / "out"
    running = {"prompt": "running at SIGTERM", "size": "64x64", "seed": 1, "num_inference_steps": 100}
    queued = {"prompt": "queued at SIGTERM", "size": "64x64", "seed": 2, "num_inference_steps": 3}
    flags = ("--output-dir", str(out), "--cache-dir", str(SHARED_CACHE), "--shutdown-grace-s", "1")
    server = ServerProcess(*flags)
    server.args[2] = "server.testing.serve"  # the real entry point over the fake generator
    server.args[3:3] = ["--fake-step-s", "0.05"]  # 100 steps: 5 s, well past the grace period
    server.start()
    try:
        with httpx.Client(timeout=60) as client:
            a_stream, a, running_id = open_stream(client, server.url, running)
            b_stream, b, queued_id = open_stream(client, server.url, queued)  # accepted, behind A
            next(line for line in a if line.startswith("data:"))  # A is processing
            server.proc.send_signal(signal.SIGTERM)
            told = {"running": errors_until_end(a), "queued": errors_until_end(b)}
            a_stream.__exit__(None, None, None)
            b_stream.__exit__(None, None, None)
        assert server.proc.wait(30) == 0
    finally:
        server.stop()
    for name, errors in told.items():
        assert [error["error"]["code"] for error in errors] == ["shutting_down"], (name, errors)
        assert "the job is kept" in errors[0]["error"]["message"]

    restarted = ServerProcess(*flags)
    restarted.args[2] = "server.testing.serve"
    restarted.args[3:3] = ["--fake-step-s", "0.01"]
    with restarted:
        # Nobody asked again: the new process runs the kept jobs by itself; resumed streams see them end.
        with httpx.Client(timeout=60) as client:
            for job_id in (running_id, queued_id):
                with client.stream("GET", f"{restarted.url}/v1/images/jobs/{job_id}/events") as stream:
                    data = [line[5:].strip() for line in stream.iter_lines() if line.startswith("data:")]
                assert data[-1] == "[DONE]" and json.loads(data[-2])["is_final"], (job_id, data[-3:])
        # The repeat the error message asks for gets the kept job's image.
        sdk = openai.OpenAI(base_url=restarted.url + "/v1", api_key="x", max_retries=0, timeout=60)
        extra = {"seed": queued["seed"], "num_inference_steps": queued["num_inference_steps"]}
        image = sdk.images.generate(prompt=queued["prompt"], size="64x64", extra_body=extra)
        assert image.model_extra["job_id"] == queued_id and image.data[0].b64_json
    with sqlite3.connect(out / "jobs.sqlite3") as db:
        rows = {job_id: (status, attempt) for job_id, status, attempt in
                db.execute("SELECT job_id, status, attempt FROM jobs").fetchall()}
    # The queued job never ran before the stop: its one attempt; the cut one ran again.
    assert rows == {running_id: ("completed", 2), queued_id: ("completed", 1)}
