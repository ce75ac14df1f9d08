"""Queue fairness by who the client is (issue 16 item 4): the per-client limit counts the jobs a
client *address* (or API key) created, whatever ``client_id``s or connections it uses, on both
protocols; ``Retry-After`` is the queue's expected drain time; ``X-Forwarded-For`` counts only
from a trusted proxy. 127.0.0.2 and up stand in for other machines."""

from __future__ import annotations

import threading

import httpx

from server.core.fairness import DrainEstimate
from server.testing.fakes import FakeGenerator
from tests.conftest import SHARED_CACHE, ServerProcess
from tests.reliability.helpers import TIMEOUT, live, run, ws_client

URL = "/v1/images/generations"


def post_from(server_url: str, address: str, body: dict, headers: dict | None = None) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=TIMEOUT) as client:
        return client.post(server_url + URL, json=body, headers=headers)


def test_made_up_client_ids_share_one_address_limit_on_both_protocols(tmp_path):
    """Five client ids from one address get the address's 3 slots between them, not 3 each; HTTP
    from that address is refused too; another address still gets in. Retry-After counts the jobs
    ahead of the address's first job (no job has finished: 2 s each, the initial estimate)."""
    gate = threading.Event()
    with live(tmp_path, generator=FakeGenerator(gate=gate), max_queue=20, max_queue_per_client=3) as server:
        async def body():
            async with ws_client(server, "early", local_addr=("127.0.0.2", 0)) as early:
                ahead = [await early.create(f"first {i}", upscale=False) for i in range(2)]
                replies = []
                for name in ("id-a", "id-b", "id-c", "id-d", "id-e"):
                    async with ws_client(server, name) as client:  # 127.0.0.1, a fresh id each time
                        replies.append(await client.create(f"greedy {name}", upscale=False))
                http = post_from(server.url, "127.0.0.1", {"prompt": "greedy over http", "size": "64x64"})
                async with ws_client(server, "id-a", local_addr=("127.0.0.3", 0)) as elsewhere:
                    other = await elsewhere.create("from another machine", upscale=False)
                gate.set()
                return ahead, replies, http, other

        ahead, replies, http, other = run(body())
    assert [r["type"] for r in ahead] == ["job_status"] * 2
    codes = [r.get("code", r.get("status")) for r in replies]
    assert codes == ["pending", "pending", "pending", "client_queue_full", "client_queue_full"], codes
    refused = replies[3]
    assert "3 unfinished jobs" in refused["message"] and refused["retry_after_s"] == 2 * (2 + 1)
    assert http.status_code == 429 and http.json()["error"]["code"] == "client_queue_full"
    assert http.headers["retry-after"] == "6"  # 2 jobs of 127.0.0.2 run first, then its own: 3 x 2 s
    assert other["type"] == "job_status" and other["status"] == "pending"


def test_api_keys_are_the_identity_when_keys_are_on(tmp_path):
    """With keys, the limit follows the key across addresses, and two keys on one address each
    have their own share."""
    gate = threading.Event()
    keys = ["key-one", "key-two"]
    with live(tmp_path, generator=FakeGenerator(gate=gate), api_keys=keys, max_queue=20,
              max_queue_per_client=2) as server:
        async def body():
            results = []
            for address, key, prompt in [("127.0.0.1", "key-one", "a"), ("127.0.0.2", "key-one", "b"),
                                         ("127.0.0.3", "key-one", "c"), ("127.0.0.1", "key-two", "d")]:
                async with ws_client(server, f"c-{prompt}", query=f"api_key={key}", local_addr=(address, 0)) as client:
                    reply = await client.create(prompt, upscale=False)
                    results.append(reply.get("code", reply.get("status")))
            gate.set()
            return results

        assert run(body()) == ["pending", "pending", "client_queue_full", "pending"]


def test_retry_after_follows_observed_run_times():
    estimate = DrainEstimate(initial_s=2.0, weight=0.5)
    assert estimate.retry_after(0) == 2 and estimate.retry_after(4) == 10
    for _ in range(20):
        estimate.observe(0.5)
    assert abs(estimate.seconds_per_job - 0.5) < 1e-3 and estimate.retry_after(0) == 1
    assert estimate.retry_after(19) == 11  # 20 jobs x 0.5000x s, rounded up
    queue = DrainEstimate(initial_s=10.0, weight=1.0)  # an API node: from snapshots of the queue
    queue.observe_queue([], ["a", "b", "c"], now=100.0)
    queue.observe_queue(["a", "b", "c"], ["b", "c"], now=103.0)  # one job left after 3 s
    queue.observe_queue(["b", "c"], [], now=105.0)  # two more after 2 s
    assert queue.seconds_per_job == 1.0 and queue.retry_after(3) == 4


def forwarded_requests(tmp_path, *flags: str) -> list[int]:
    """Three streaming requests with X-Forwarded-For 10.0.0.1, 10.0.0.1, 10.0.0.2 held open at
    once against a server process (per-client limit 1, slow fake jobs)."""
    server = ServerProcess("--output-dir", str(tmp_path / "out"), "--cache-dir", str(SHARED_CACHE),
                           "--max-queue-per-client", "1", *flags)
    server.args[1:3] = ["-m", "server.testing.serve"]
    server.args.extend(["--fake-step-s", "0.5"])
    statuses = []
    body = {"prompt": "held", "size": "64x64", "num_inference_steps": 100, "stream": True}
    with server, httpx.Client(timeout=TIMEOUT) as client:
        streams = []
        for n, forwarded in enumerate(["10.0.0.1", "10.0.0.1", "10.0.0.2"]):
            stream = client.stream("POST", server.url + URL, json={**body, "seed": n},
                                   headers={"X-Forwarded-For": forwarded})
            response = stream.__enter__()
            streams.append(stream)
            statuses.append(response.status_code)
        for stream in streams:
            stream.__exit__(None, None, None)
    return statuses


def test_x_forwarded_for_counts_only_from_a_trusted_proxy(tmp_path):
    trusted = forwarded_requests(tmp_path / "trusted", "--forwarded-allow-ips", "127.0.0.1")
    untrusted = forwarded_requests(tmp_path / "untrusted")  # default: no proxy is trusted
    assert trusted == [200, 429, 200]  # two forwarded clients, one slot each
    assert untrusted == [200, 429, 429]  # the header is ignored: one address, 127.0.0.1
