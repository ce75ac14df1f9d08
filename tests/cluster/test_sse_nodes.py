"""SSE streams across API nodes over real Redis: resuming on another node after the first one was
SIGKILLed (Last-Event-ID, no duplicate step), a subscriber that reads nothing (the worker is not
slowed, the API node's queue stays bounded), and 200 disconnects that leak neither Redis
connections nor file descriptors."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.cluster.codec import client_name
from server.routes_openai import plan_request
from server.openai_api.schemas import ImageGenerationRequest
from tests.cluster.conftest import Cluster, KVServer
from tests.cluster.helpers import body, events, job_id_of, post_in_background, statuses, wait_status, wait_step
from tests.conftest import LiveServer, make_settings

STEP_S = 0.05


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sse-nodes")
    kv = KVServer("redis", tmp / "kv").start()
    cluster = Cluster(kv, tmp, step_s=STEP_S)
    procs = cluster.start(("api", "api-a"), ("api", "api-b"), ("worker", "w-1"))
    try:
        yield cluster, procs, kv
    finally:
        cluster.stop()
        kv.stop()


def sse_blocks(lines):
    """SSE events of an iterator of lines, as dicts {"id", "event", "data"} (comments skipped)."""
    block: dict = {}
    for line in lines:
        if not line:
            if "data" in block:
                yield block
            block = {}
        elif not line.startswith(":"):
            field, _, value = line.partition(":")
            block[field] = value[1:] if value.startswith(" ") else value


def steps_of(blocks) -> list[tuple[int, int]]:
    out = []
    for block in blocks:
        if block["data"] != "[DONE]":
            data = json.loads(block["data"])
            if not data["is_final"]:
                out.append((data["index"], data["step"]))
    return out


def test_stream_resumes_on_another_api_node_after_sigkill_without_duplicates(nodes):
    cluster, (api_a, api_b, worker), kv = nodes
    payload = body("resume after a node died", steps=40, stream=True)  # previews every 4 steps
    payload.pop("response_format")
    job_id = job_id_of(payload)
    seen: list[dict] = []
    with httpx.stream("POST", api_a.url + "/v1/images/generations", json=payload, timeout=30) as response:
        assert response.status_code == 200
        for block in sse_blocks(response.iter_lines()):
            seen.append(block)
            if len(seen) == 3:
                break
        api_a.proc.send_signal(signal.SIGKILL)  # mid-stream, the job still running on the worker
        api_a.proc.wait(10)
    assert all("id" in b for b in seen)  # every step event names its place in the job's stream
    resumed: list[dict] = []
    headers = {"Last-Event-ID": seen[-1]["id"]}
    with httpx.stream("GET", f"{api_b.url}/v1/images/jobs/{job_id}/events", headers=headers, timeout=30) as response:
        assert response.status_code == 200
        resumed = list(sse_blocks(response.iter_lines()))
    assert resumed[-1]["data"] == "[DONE]"
    final = json.loads(resumed[-2]["data"])
    assert final["is_final"] and final["job_id"] == job_id and final["image"]
    before, after = steps_of(seen), steps_of(resumed)
    assert after, "node B sent no step event"
    assert before + after == sorted(set(before + after))  # no duplicate, none out of order
    assert after[0][1] > before[-1][1]
    ids = [tuple(map(int, b["id"].split("-"))) for b in seen + resumed if "id" in b]
    assert ids == sorted(set(ids))
    assert statuses(kv.client(), job_id).count("completed") == 1


def test_resume_route_answers_a_finished_job_and_rejects_bad_ids(nodes):
    cluster, (api_a, api_b, worker), kv = nodes
    payload = body("resume a finished job", steps=4)
    assert httpx.post(api_b.url + "/v1/images/generations", json=payload, timeout=30).status_code == 200
    job_id = job_id_of(payload)
    last = kv.client().xrevrange(f"t2i:ev:{job_id}", count=1)[0][0]
    for headers in ({}, {"Last-Event-ID": last}):  # from its status / after its very last event
        response = httpx.get(f"{api_b.url}/v1/images/jobs/{job_id}/events", headers=headers, timeout=10)
        blocks = list(sse_blocks(response.text.split("\n")))
        assert [b["data"] for b in blocks][-1] == "[DONE]" and json.loads(blocks[0]["data"])["is_final"]
    bad = httpx.get(f"{api_b.url}/v1/images/jobs/{job_id}/events", headers={"Last-Event-ID": "0-0; DROP"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"
    assert httpx.get(f"{api_b.url}/v1/images/jobs/{'0' * 64}/events", timeout=10).status_code == 404


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def worker_seconds(client, job_id: str) -> float:
    """processing -> completed, from the worker's own status timestamps in the job's stream."""
    times = {e["status"]: float(e["updated_at"]) for e in events(client, job_id) if e.get("k") == "status"}
    return times["completed"] - times["processing"]


def test_unread_subscriber_does_not_slow_the_worker_and_stays_bounded(nodes, tmp_path):
    cluster, procs, kv = nodes
    client = kv.client()
    settings = make_settings(tmp_path, backend=kv.url, role="api", node_id="api-inproc", preview_percent=1,
                             output_dir=cluster.tmp / "shared-out")  # the workers' output directory
    app = create_app(settings, default_model="tiny-z-image")
    steps = 40  # a preview and a progress event per step: 80 events for a queue of 32 per kind
    with LiveServer(app) as node:
        engine = app.state.engine
        loop = node.loop
        def job_id(payload: dict) -> str:  # this node's preview_percent is part of the spec
            return plan_request(ImageGenerationRequest(**payload), app.state.catalog, app.state.settings).spec.job_id

        unread_payload = body("nobody streams this", steps=steps, seed=11)
        assert httpx.post(node.url + "/v1/images/generations", json=unread_payload, timeout=60).status_code == 200
        unread_id = job_id(unread_payload)
        slow = body("slow readers", steps=steps, seed=12, stream=True)
        slow.pop("response_format")
        spec = plan_request(ImageGenerationRequest(**slow), app.state.catalog, app.state.settings).spec
        rss_before = rss_mb(os.getpid())
        submission = asyncio.run_coroutine_threadsafe(engine.submit(spec, interest="never-reads"), loop).result(10)
        subscriber = submission.subscriber
        try:
            with httpx.stream("POST", node.url + "/v1/images/generations", json=slow, timeout=60) as response:
                assert response.status_code == 200  # headers only: this client reads nothing for now
                wait_status(client, spec.job_id, "completed", timeout=30)
                peak = subscriber.pending()
                rss_after = rss_mb(os.getpid())
                blocks = list(sse_blocks(response.iter_lines()))  # now read it all
        finally:
            asyncio.run_coroutine_threadsafe(engine.release(spec.job_id, "never-reads"), loop).result(10)
            loop.call_soon_threadsafe(subscriber.close)
    nominal = steps * STEP_S
    unread_s, slow_s = worker_seconds(client, unread_id), worker_seconds(client, spec.job_id)
    assert slow_s <= unread_s * 1.25 + 0.25 and slow_s <= nominal * 1.5 + 0.5, (slow_s, unread_s)
    assert peak <= 2 * 32 + 8, peak  # previews and progress each coalesced to 32, plus status events
    assert subscriber.dropped >= 2 * steps - 2 * 32  # the bound was exercised, not just never reached
    assert rss_after - rss_before < 30, (rss_before, rss_after)
    assert blocks[-1]["data"] == "[DONE]"  # the slow client still gets the whole job, in order
    got = steps_of(blocks)
    assert got == sorted(set(got)) and len(got) >= 2


def api_connections(kv, node_id: str) -> int:
    name = client_name("api", node_id)
    return sum(1 for c in kv.client().client_list() if c.get("name") == name)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sse_streams_gauge(node) -> float:
    for line in httpx.get(node.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith("t2i_active_sse_streams "):
            return float(line.split()[1])
    raise AssertionError("no t2i_active_sse_streams metric")


def test_200_sse_disconnects_leak_no_redis_connections_or_fds(nodes):
    cluster, (api_a, api_b, worker), kv = nodes
    blocker_payload = body("held while others come and go", steps=100, seed=21)
    blocker = post_in_background(api_b.url, blocker_payload)
    blocker_id = job_id_of(blocker_payload)
    wait_step(kv.client(), blocker_id, 1)
    join = {**blocker_payload, "stream": True}
    join.pop("response_format")

    def disconnect(i: int) -> None:
        payload = join if i % 2 == 0 else {**join, "prompt": f"pending then dropped {i}"}
        with httpx.stream("POST", api_b.url + "/v1/images/generations", json=payload, timeout=30) as response:
            assert response.status_code == 200
            if i % 2 == 0:  # joined the running job: leave after its first event
                next(sse_blocks(response.iter_lines()))
        # leaving the block closes the connection mid-stream

    pid = api_b.proc.pid
    threads = 8
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(disconnect, range(16)))  # warm-up: imports, caches, first connections
        base_conns, base_fds = api_connections(kv, "api-b"), open_fds(pid)
        list(pool.map(disconnect, range(200)))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the node sees each disconnect asynchronously
        conns, fds, streams = api_connections(kv, "api-b"), open_fds(pid), sse_streams_gauge(api_b)
        # Sockets the Redis pool opened at peak concurrency are bounded by the check below; any
        # other descriptor must be back.
        if fds <= base_fds + 2 + max(0, conns - base_conns) and streams == 0:
            break
        kv.client().xread({"t2i:never": "$"}, block=100)  # wait a little, off the node under test
    assert base_conns >= 2  # the pool and the event reader: the names are right
    # The pool keeps the connections it needed at peak concurrency (at most one per request in
    # flight, plus the stats refresher, a wake-up write, the event reader and its check that watched
    # jobs still exist), never one per stream.
    assert conns <= threads + 4, (base_conns, conns)
    assert fds <= base_fds + 2 + max(0, conns - base_conns), (base_fds, fds, base_conns, conns)
    assert streams == 0
    assert blocker.result(30).status_code == 200
