"""kill -9 with work in every unfinished state, then a restart on the same directory: nothing that
was accepted is lost (issue 15 item 1). Real server processes (``server.testing.serve``), a real
WebSocket client that reconnects with its client_id, a real resumed SSE stream."""

from __future__ import annotations

import asyncio
import json
import sqlite3

import httpx

from tests.conftest import SHARED_CACHE, ServerProcess, run_async
from tests.reliability.helpers import WsClient, ws_client

TERMINAL = {"completed", "failed", "cancelled"}


def fake_server(out, *flags: str, module: str = "server.testing.serve") -> ServerProcess:
    server = ServerProcess("--output-dir", str(out), "--cache-dir", str(SHARED_CACHE), *flags)
    server.args[2] = module  # the real entry point over the fake generator
    return server


async def statuses_until(ws: WsClient, done, timeout: float = 60.0) -> list[dict]:
    """Every job_status message, in arrival order, until ``done(latest status per job)`` holds."""
    seen: list[dict] = []
    async with asyncio.timeout(timeout):
        while not done({message["job_id"]: message["status"] for message in seen}):
            message = ws.backlog.popleft() if ws.backlog else await ws.recv(timeout)
            if message.get("type") == "job_status":
                seen.append(message)
    return seen


def test_sigkill_with_work_in_every_state_then_restart(tmp_path):
    out = tmp_path / "out"

    async def before_the_kill(server) -> dict[str, str]:
        async with ws_client(server, client_id="alice") as ws:
            jobs = {}
            for name, params in [("generated", {"seed": 1, "steps": 2, "upscale": True}),
                                 ("processing", {"seed": 2, "steps": 100}),  # 5 s of steps
                                 ("first", {"seed": 3, "steps": 3}), ("second", {"seed": 4, "steps": 3})]:
                jobs[name] = (await ws.create(f"requeue {name}", **params))["job_id"]
            # The generated job waits for the GPU to upscale while the long one holds it.
            await statuses_until(ws, lambda latest: latest.get(jobs["generated"]) == "generated"
                                 and latest.get(jobs["processing"]) == "processing")
            for name, expected in [("generated", "generated"), ("processing", "processing"),
                                   ("first", "pending"), ("second", "pending")]:
                reply = await ws.request(type="get_status", job_id=jobs[name])
                assert reply["status"] == expected, (name, reply)
            jobs["generated image"] = (await ws.request(type="get_status", job_id=jobs["generated"]))["result"]["filename"]
            return jobs

    first = fake_server(out, "--fake-step-s", "0.05").start()
    try:
        jobs = run_async(before_the_kill(first))
        first.proc.kill()
        first.proc.wait(30)
    finally:
        first.stop()

    async def after_the_restart(server) -> list[dict]:
        async with ws_client(server, client_id="alice") as ws:  # no request: the session follows them
            ids = {jobs[name] for name in ("generated", "processing", "first", "second")}
            return await statuses_until(ws, lambda latest: ids <= set(latest) and
                                        all(latest[job] in TERMINAL for job in ids))

    with fake_server(out, "--fake-step-s", "0.05") as second:
        # An SSE client resumes the long job's stream on the new process and sees it finish.
        with httpx.Client(timeout=60) as client:
            with client.stream("GET", f"{second.url}/v1/images/jobs/{jobs['processing']}/events") as stream:
                seen = run_async(after_the_restart(second))
                data = [line[5:].strip() for line in stream.iter_lines() if line.startswith("data:")]
        assert data[-1] == "[DONE]"
    finals = [event for event in map(json.loads, data[:-1]) if event["is_final"]]
    assert [event["job_id"] for event in finals] == [jobs["processing"]] and finals[0]["image"]

    final = {name: [m for m in seen if m["job_id"] == jobs[name]][-1]
             for name in ("generated", "processing", "first", "second")}
    assert {name: message["status"] for name, message in final.items()} == dict.fromkeys(final, "completed")
    generated = final["generated"]["result"]
    assert generated["filename"] == jobs["generated image"], "the saved image was kept, not generated again"
    assert generated["upscaled_filename"] and generated["upscale_error"] is None
    assert (out / generated["upscaled_filename"]).is_file()
    # The queue's order is the order jobs take the GPU (completions may interleave: one job's PNG
    # encode overlaps the next one's steps).
    order = [m["job_id"] for m in seen if m["status"] == "processing"]
    assert order.index(jobs["first"]) < order.index(jobs["second"]), "pending jobs keep their order"
    with sqlite3.connect(out / "jobs.sqlite3") as db:
        attempts = dict(db.execute("SELECT job_id, attempt FROM jobs").fetchall())
    assert attempts[jobs["processing"]] == 2, "the interrupted job ran again as a new attempt"
    assert attempts[jobs["first"]] == attempts[jobs["second"]] == attempts[jobs["generated"]] == 1


def test_a_job_that_keeps_killing_the_process_ends_failed(tmp_path):
    out = tmp_path / "out"
    flags = ("--fake-step-s", "0.01", "--max-deliveries", "2")
    crash = {"prompt": "crash:worker every time", "size": "64x64", "seed": 5, "num_inference_steps": 4}

    def crashes(server: ServerProcess) -> None:
        try:
            httpx.post(server.url + "/v1/images/generations", json=crash, timeout=30)
        except httpx.HTTPError:
            pass  # the process died under the request
        assert server.proc.wait(30) == 17, "the job took the process down"

    # The first death happens under the request; the second when the restart runs the job again.
    crasher = fake_server(out, *flags, module="tests.cluster.fake_worker")
    crasher.start()
    crashes(crasher)
    restarted = fake_server(out, *flags, module="tests.cluster.fake_worker")
    try:
        restarted.start()
    except RuntimeError:  # it may die before it answers /health
        pass
    assert restarted.proc.wait(30) == 17, "the restart ran the interrupted job again"

    with sqlite3.connect(out / "jobs.sqlite3") as db:
        [(crashed_id,)] = db.execute("SELECT job_id FROM jobs").fetchall()

    async def status(server) -> dict:
        async with ws_client(server) as ws:
            return await ws.request(type="get_status", job_id=crashed_id)

    with fake_server(out, *flags, module="tests.cluster.fake_worker") as third:
        reply = run_async(status(third))
        assert reply["status"] == "failed"
        assert reply["error"] == "interrupted by server restart 2 times; it is not retried"
        assert httpx.get(third.url + "/health").json()["status"] == "ok" and third.proc.poll() is None


def test_an_upscale_cut_short_runs_on_a_repeat(tmp_path):
    """Item 5: a job that completed without its upscale (here: the upscale was cut short by a
    process death and --max-deliveries 1 allows no retry) gets the upscale when requested again;
    its image is not generated again."""
    out = tmp_path / "out"
    params = {"seed": 9, "steps": 2, "upscale": True}

    async def until_generated(server) -> dict:
        async with ws_client(server, client_id="bob") as ws:
            job_id = (await ws.create("upscale cut short", **params))["job_id"]
            return await ws.until_status(job_id, "generated")

    first = fake_server(out, "--fake-step-s", "0.01", "--fake-upscale-s", "60", "--max-deliveries", "1").start()
    try:
        generated = run_async(until_generated(first))  # the upscale now runs for a minute
        first.proc.kill()
        first.proc.wait(30)
    finally:
        first.stop()

    async def repeat(server) -> tuple[dict, dict, list[dict]]:
        async with ws_client(server, client_id="bob") as ws:
            before = await ws.request(type="get_status", job_id=generated["job_id"])
            reply = await ws.create("upscale cut short", **params)
            after = await statuses_until(ws, lambda latest: latest.get(reply["job_id"]) == "completed")
            return before, reply, after

    with fake_server(out, "--fake-step-s", "0.01", "--max-deliveries", "1") as second:
        before, reply, after = run_async(repeat(second))
    assert before["status"] == "completed"
    assert before["result"]["upscale_error"] == "upscaling interrupted by server restart 1 time; it is not retried"
    assert reply["job_id"] == generated["job_id"] and reply["status"] == "generated"
    assert {m["status"] for m in after} <= {"generated", "completed"}, "no generation, only the upscale"
    done = after[-1]["result"]
    assert done["upscale_error"] is None and (out / done["upscaled_filename"]).is_file()
    assert done["filename"] == generated["result"]["filename"], "the same image, upscaled"
    with sqlite3.connect(out / "jobs.sqlite3") as db:
        assert db.execute("SELECT attempt FROM jobs").fetchall() == [(2,)]
