"""The short version of ``bench/load_test.py`` (the long run and its RSS figure are in
RELIABILITY.md), and the Prometheus ``/metrics`` endpoint: format, and gauges that move."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server.testing.fakes import FakeGenerator
from tests.reliability.helpers import TIMEOUT, live, resources, run, wait_until, ws_client

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from load_test import run_load  # noqa: E402


def test_200_mixed_requests_each_get_exactly_one_terminal_outcome(tmp_path):
    with live(tmp_path, generator=FakeGenerator(step_s=0.001), max_queue=512, max_queue_per_client=512) as server:
        report = run(run_load(server.url, server.ws_url, requests=200, clients=24, seed=7), limit=120)
        drained = wait_until(lambda: not server.engine.counts())
        after = resources(server)
    summary = report.summary()
    print(f"\nload: {summary['outcomes']} in {summary['elapsed_s']} s")
    assert report.ok, summary["examples"]
    assert sum(report.outcomes.values()) == 200
    kinds = {key.split(":")[0] for key in report.outcomes}
    assert kinds == {"sse", "json", "ws"}
    for outcome in ("sse:aborted", "ws:cancelled", "json:error:out_of_memory", "ws:completed", "sse:done"):
        assert report.outcomes[outcome] > 0, outcome
    assert drained and after.subscribers == 0


def _samples(text: str) -> dict[str, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def test_metrics_are_prometheus_text_and_the_gauges_move(tmp_path):
    import threading

    gate = threading.Event()
    with live(tmp_path, generator=FakeGenerator(gate=gate)) as server:
        scrape = lambda: _samples(httpx.get(server.url + "/metrics", timeout=TIMEOUT).text)  # noqa: E731
        idle = scrape()
        response = httpx.get(server.url + "/metrics", timeout=TIMEOUT)

        async def body():
            async with contextlib.AsyncExitStack() as stack:
                clients = [await stack.enter_async_context(ws_client(server, f"m{i}")) for i in range(3)]
                for i, client in enumerate(clients):
                    await client.create(f"metrics {i}", upscale=False)
                async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                    async with http.stream("POST", server.url + "/v1/images/generations",
                                           json={"prompt": "streamed", "size": "64x64", "stream": True}) as stream:
                        assert stream.status_code == 200  # headers sent: the stream's body is being produced
                        await asyncio.to_thread(wait_until, lambda: scrape()["t2i_active_sse_streams"] == 1)
                        busy = await asyncio.to_thread(scrape)
                gate.set()
                for i, client in enumerate(clients):
                    await client.until_status((await client.request(type="get_client_jobs"))["jobs"][0]["job_id"],
                                              "completed", "cancelled")
            return busy

        busy = run(body())
        assert wait_until(lambda: scrape()["t2i_websocket_connections"] == 0)
        done = scrape()
    assert response.headers["content-type"].startswith("text/plain")
    assert re.search(r"^# TYPE t2i_step_seconds histogram$", response.text, re.M)
    assert idle["t2i_active_sse_streams"] == 0 and idle["t2i_websocket_connections"] == 0
    assert busy["t2i_active_sse_streams"] == 1 and busy["t2i_websocket_connections"] == 3
    assert busy["t2i_queue_depth"] == 3 and busy["t2i_jobs{status=processing}"] == 1
    assert done["t2i_active_sse_streams"] == 0 and done["t2i_queue_depth"] == 0
    assert done["t2i_jobs_finished_total{status=completed}"] == 3  # the stream's job was cancelled on leave
    assert done["t2i_jobs_finished_total{status=cancelled}"] == 1
    assert done["t2i_step_seconds_count"] > 0 and done["t2i_preview_latency_seconds_count"] > 0
