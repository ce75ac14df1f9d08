"""A Redis worker upscaling (issue 15, item 3, scale-out side). An upscale longer than the worker's
heartbeat period completes (the heartbeat, STEP, accepted only ``processing`` jobs, so the worker
fenced itself out of its own job mid-upscale and dropped it). SIGTERM mid-upscale: the job is left
queued for another worker, as before, and the process exits within grace + 5 s instead of waiting
for the upscale (its GPU thread stops at the next tile)."""

from __future__ import annotations

import signal
import threading
import time

import httpx

from tests.cluster.conftest import Cluster, KVServer

GRACE_S = 2  # the Cluster's --shutdown-grace-s


def test_sigterm_to_a_worker_mid_upscale_exits_within_grace_plus_5_s(tmp_path):
    kv = KVServer("redis", tmp_path / "kv").start()
    # 400 tiles x 0.25 s: 100 s of upscaling unless something stops it.
    cluster = Cluster(kv, tmp_path, step_s=0.01, fake_upscale_tiles=400, fake_upscale_tile_s=0.25)
    first_line: list[str] = []
    opened = threading.Event()

    def stream() -> None:
        request = {"prompt": "upscaling on a worker", "size": "64x64", "seed": 3, "num_inference_steps": 2,
                   "stream": True, "upscale": True}
        try:
            with httpx.Client(timeout=httpx.Timeout(10, read=60)) as client, \
                    client.stream("POST", api.url + "/v1/images/generations", json=request) as response:
                for line in response.iter_lines():
                    if not first_line:
                        first_line.append(line)
                        opened.set()
        except httpx.HTTPError:
            pass  # the API node is killed at the end of the test

    try:
        api, worker = cluster.start(("api", "api-1"), ("worker", "w-1"))
        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert opened.wait(30)
        job_key = "t2i:job:" + first_line[0].removeprefix(": job ").strip()
        redis = kv.client()
        deadline = time.monotonic() + 30
        while redis.hget(job_key, "status") != "generated":  # another process: poll its record
            assert time.monotonic() < deadline, "the job never reached generated"
            threading.Event().wait(0.05)
        signalled = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(GRACE_S + 5) == 0  # raises TimeoutExpired past grace + 5 s
        print(f"worker exited {time.monotonic() - signalled:.1f} s after SIGTERM (grace {GRACE_S} s)")
        assert redis.hget(job_key, "status") == "generated"  # left for another worker, as before
        assert "left for another worker" in worker.output(), worker.output()[-3000:]
        assert "fenced out" not in worker.output()
    finally:
        cluster.stop()
        kv.stop()


def test_an_upscale_longer_than_the_heartbeat_period_completes_on_a_worker(tmp_path):
    kv = KVServer("redis", tmp_path / "kv").start()
    # 8 tiles x 0.25 s = 2 s of upscaling; the worker beats every reclaim_idle_ms / 4 = 0.375 s.
    cluster = Cluster(kv, tmp_path, step_s=0.01, fake_upscale_tiles=8, fake_upscale_tile_s=0.25)
    try:
        api, worker = cluster.start(("api", "api-1"), ("worker", "w-1"))
        reply = httpx.post(api.url + "/v1/images/generations", timeout=60, json={
            "prompt": "a long upscale on a worker", "size": "64x64", "seed": 4, "num_inference_steps": 2,
            "upscale": True})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["data"][0]["upscaled_b64_json"] and "upscale_error" not in body
        assert "fenced out" not in worker.output()
    finally:
        cluster.stop()
        kv.stop()
