"""Several API nodes over one backend: dedup across nodes, the result cache and its expiry, cancel
from a node other than the one that took the job (pending, running, dead owner), per-job event
streams seen from any node."""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from websockets.sync.client import connect

from tests.cluster.conftest import IDLE_MS, Cluster, KVServer
from tests.cluster.helpers import (body, job_hash, job_id_of, post_in_background, statuses, wait_status, wait_step)

RESULT_TTL_S = 3


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-nodes")
    kv = KVServer("redis", tmp / "kv").start()
    cluster = Cluster(kv, tmp, step_s=0.05, result_ttl_s=RESULT_TTL_S)
    procs = cluster.start(("api", "api-1"), ("api", "api-2"), ("worker", "w-1"))
    try:
        yield cluster, procs, kv.client()
    finally:
        cluster.stop()
        kv.stop()


def ws_request(node, client_id: str, message: dict, want: str, timeout: float = 20.0) -> dict:
    with connect(f"{node.ws_url}/api/ws?client_id={client_id}", open_timeout=10) as ws:
        ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = json.loads(ws.recv(timeout=timeout))
            if reply.get("type") == want:
                return reply
    raise TimeoutError(want)


def test_identical_submissions_through_two_api_nodes_make_one_generation(nodes):
    cluster, (api1, api2, worker), client = nodes
    payload = body("two nodes one job", steps=6)
    job_id = job_id_of(payload)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: httpx.post((api1, api2)[i % 2].url + "/v1/images/generations",
                                                       json=payload, timeout=30), range(8)))
    assert all(r.status_code == 200 for r in responses)
    assert len({r.json()["data"][0]["url"].rsplit("/", 1)[1] for r in responses}) == 1
    assert statuses(client, job_id).count("processing") == 1  # one generation
    assert job_hash(client, job_id)["deliveries"] == "1"
    image = httpx.get(api2.url + "/api/image/" + responses[0].json()["data"][0]["url"].rsplit("/", 1)[1])
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"  # shared output dir


def test_completed_job_is_a_cache_hit_on_another_node_until_it_expires(nodes):
    cluster, (api1, api2, worker), client = nodes
    payload = body("cache me", steps=4)
    job_id = job_id_of(payload)
    assert httpx.post(api1.url + "/v1/images/generations", json=payload, timeout=30).status_code == 200
    started = time.monotonic()
    again = httpx.post(api2.url + "/v1/images/generations", json=payload, timeout=30)
    assert again.status_code == 200
    assert statuses(client, job_id).count("processing") == 1  # answered from the cache
    ttl = client.ttl(f"t2i:job:{job_id}")
    assert 0 < ttl <= RESULT_TTL_S
    deadline = started + RESULT_TTL_S + 2
    while client.exists(f"t2i:job:{job_id}") and time.monotonic() < deadline:
        client.xread({"t2i:never": "$"}, block=100)  # wait for Redis to expire the record
    assert not client.exists(f"t2i:job:{job_id}")
    assert httpx.post(api2.url + "/v1/images/generations", json=payload, timeout=30).status_code == 200
    assert statuses(client, job_id).count("processing") == 1  # a fresh run after expiry
    assert job_hash(client, job_id)["attempt"] == "1"


def occupy(api, client, prompt: str, steps: int = 60):
    """Keep the single worker busy with a long job; returns (future, job_id)."""
    payload = body(prompt, steps=steps)
    job_id = job_id_of(payload)
    future = post_in_background(api.url, payload)
    wait_status(client, job_id, "processing")
    return future, job_id


def ws_create(node, client_id: str, prompt: str, steps: int) -> str:
    message = {"type": "create_job", "request_id": 1,
               "params": {"prompt": prompt, "model": "tiny-z-image", "width": 64, "height": 64, "steps": steps,
                          "upscale": False}}
    with connect(f"{node.ws_url}/api/ws?client_id={client_id}", open_timeout=10) as ws:
        ws.send(json.dumps(message))
        while True:
            reply = json.loads(ws.recv(timeout=20))
            assert reply.get("type") != "error", reply
            if reply.get("job_id"):
                return reply["job_id"]


def test_cancel_pending_job_from_another_node(nodes):
    cluster, (api1, api2, worker), client = nodes
    blocker, blocker_id = occupy(api1, client, "blocker for pending cancel")
    job_id = ws_create(api1, "client-pending", "pending then cancelled", 10)
    assert job_hash(client, job_id)["status"] == "pending"
    reply = ws_request(api2, "client-pending", {"type": "cancel_job", "job_id": job_id}, "cancel_result")
    assert reply["cancelled"] is True
    assert statuses(client, job_id) == ["pending", "cancelled"]
    assert blocker.result(30).status_code == 200
    wait_status(client, blocker_id, "completed")
    assert "processing" not in statuses(client, job_id)  # a cancelled pending job never runs


def test_cancel_running_job_from_another_node_stops_within_a_step(nodes):
    cluster, (api1, api2, worker), client = nodes
    job_id = ws_create(api1, "client-running", "running then cancelled", 100)
    wait_step(client, job_id, 2)
    asked = time.monotonic()
    reply = ws_request(api2, "client-running", {"type": "cancel_job", "job_id": job_id}, "cancel_result")
    assert reply["cancelled"] is True
    wait_status(client, job_id, "cancelled", timeout=5)
    assert time.monotonic() - asked < 1.0  # 50 ms steps: the worker stopped at its next step
    assert statuses(client, job_id)[-1] == "cancelled"


def test_cancel_job_of_a_dead_worker_from_another_node(nodes):
    cluster, (api1, api2, worker), client = nodes
    (spare,) = cluster.start(("worker", "w-spare"))
    occupy(api1, client, "blocker for dead owner", steps=60)  # one worker busy: the next job goes to the other
    job_id = ws_create(api1, "client-dead", "owner dies", 100)
    wait_step(client, job_id, 2)
    owner = next(p for p in (worker, spare) if p.node_id == job_hash(client, job_id)["worker"])
    owner.proc.send_signal(signal.SIGKILL)
    owner.proc.wait(10)
    reply = ws_request(api2, "client-dead", {"type": "cancel_job", "job_id": job_id}, "cancel_result")
    assert reply["cancelled"] is True
    wait_status(client, job_id, "cancelled", timeout=IDLE_MS / 1000 + 3)
    assert statuses(client, job_id).count("processing") == 1  # never taken over and run again
