"""Cached answers in another format (issue 16 item 5): a finished image re-encoded as webp/jpeg
is encoded once and then served from a bounded cache, over the JSON route and the stream resume
alike; ``/metrics`` counts the lookups."""

from __future__ import annotations

import json
import re

import httpx

from server.testing.fakes import FakeGenerator
from tests.reliability.helpers import TIMEOUT, live

URL = "/v1/images/generations"
SPEC = {"prompt": "re-encoded", "size": "64x64", "seed": 3, "num_inference_steps": 2, "upscale": False}


def lookups(server, outcome: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    match = re.search(rf'^t2i_image_variant_lookups_total{{outcome="{outcome}"}} ([0-9.]+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


def resumed_image(server, job_id: str) -> str:
    with httpx.stream("GET", f"{server.url}/v1/images/jobs/{job_id}/events",
                      params={"output_format": "webp", "output_compression": 100}, timeout=TIMEOUT) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:") and line[5:].strip() != "[DONE]":
                event = json.loads(line[5:])
                if event.get("is_final"):
                    return event["image"]
    raise AssertionError("no final image in the resumed stream")


def test_a_finished_image_is_re_encoded_once(tmp_path):
    with live(tmp_path, generator=FakeGenerator(noise=True)) as server:
        first = httpx.post(server.url + URL, json=SPEC, timeout=TIMEOUT).json()  # the PNG: no variant
        webp = [httpx.post(server.url + URL, json={**SPEC, "output_format": "webp", "output_compression": 100},
                           timeout=TIMEOUT).json()["data"][0]["b64_json"] for _ in range(3)]
        resumed = [resumed_image(server, first["job_id"]) for _ in range(2)]
        misses, hits = lookups(server, "miss"), lookups(server, "hit")
        jpeg = httpx.post(server.url + URL, json={**SPEC, "output_format": "jpeg", "output_compression": 80},
                          timeout=TIMEOUT)
        misses_after_jpeg = lookups(server, "miss")
    assert len(set(webp + resumed)) == 1 and webp[0] != first["data"][0]["b64_json"]
    assert (misses, hits) == (1, 4)  # one encode, then four answers from the cache
    assert jpeg.status_code == 200 and misses_after_jpeg == 2  # another format is another variant
