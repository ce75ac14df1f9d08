"""kill -9 during a job, then a restart on the same directory, over the real model: completed work
survives, the interrupted job runs again (issue 15), and the database is consistent."""

from __future__ import annotations

import json
import sqlite3

import httpx

from tests.conftest import SHARED_CACHE, ServerProcess

KEPT = {"prompt": "kept across restarts", "size": "64x64", "seed": 7, "response_format": "url",
        "num_inference_steps": 2}
LONG = {"prompt": "interrupted by kill -9", "size": "256x256", "seed": 8, "num_inference_steps": 100, "stream": True}


def first_sse_event(client: httpx.Client, url: str, body: dict) -> dict:
    with client.stream("POST", url, json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                return json.loads(line[5:])
    raise AssertionError("stream ended without an event")


def test_sigkill_mid_job_then_restart(tmp_path):
    out = tmp_path / "outputs"
    args = ("--model", "tiny-z-image", "--output-dir", str(out), "--cache-dir", str(SHARED_CACHE))
    with httpx.Client(timeout=120) as client:
        with ServerProcess(*args) as first:
            done = client.post(first.url + "/v1/images/generations", json=KEPT).json()
            kept_bytes = client.get(done["data"][0]["url"]).content
            # A preview has arrived, so the long job is processing when the process is killed.
            interrupted_id = first_sse_event(client, first.url + "/v1/images/generations", LONG)["job_id"]
            first.proc.kill()
            first.proc.wait(30)

        with ServerProcess(*args) as second:
            again = client.post(second.url + "/v1/images/generations", json=KEPT).json()
            assert again["job_id"] == done["job_id"]  # found by dedup, not generated again
            assert client.get(again["data"][0]["url"]).content == kept_bytes  # served by the new process
            # The interrupted job was queued again: the identical request joins it and gets the image.
            retried = client.post(second.url + "/v1/images/generations", json={**LONG, "stream": False}).json()
            assert retried["job_id"] == interrupted_id and retried["data"][0]["b64_json"]
            health = client.get(second.url + "/health").json()
            assert health["jobs"] == {}  # nothing left half-done in memory

    with sqlite3.connect(out / "jobs.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        row = db.execute("SELECT status, error, attempt FROM jobs WHERE job_id = ?", (interrupted_id,)).fetchone()
        assert row == ("completed", None, 2)  # run again from the start, as a new attempt
        assert db.execute("SELECT status FROM jobs WHERE job_id = ?", (done["job_id"],)).fetchone() == ("completed",)
    assert not list(out.glob(".tmp-*")), "no partial file may remain visible"
