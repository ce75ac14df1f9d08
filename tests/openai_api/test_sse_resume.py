"""``GET /v1/images/jobs/{job_id}/events`` in single-node mode (no event ids): it replays from the
job's current status. The cross-node resume with Last-Event-ID is in tests/cluster/test_sse_nodes.py."""

from __future__ import annotations

import json

import httpx


def blocks(text: str) -> list[dict]:
    out = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if "data" in fields:
            out.append(fields)
    return out


def test_single_node_resume_replays_a_finished_job_and_ignores_last_event_id(fake_server):
    request = {"prompt": "resume single node", "model": "tiny-z-image", "size": "64x64", "num_inference_steps": 3,
               "stream": True}
    first = blocks(httpx.post(fake_server.url + "/v1/images/generations", json=request, timeout=30).text)
    assert all("id" not in b for b in first)  # no shared event log: no ids to resume after
    job_id = json.loads(first[0]["data"])["job_id"]
    for headers in ({}, {"Last-Event-ID": "1-0"}):
        resumed = blocks(httpx.get(f"{fake_server.url}/v1/images/jobs/{job_id}/events", headers=headers,
                                   timeout=30).text)
        assert [b["data"] for b in resumed][-1] == "[DONE]"
        final = json.loads(resumed[0]["data"])
        assert final["is_final"] and final["job_id"] == job_id and final["image"]
    assert httpx.get(f"{fake_server.url}/v1/images/jobs/{'f' * 64}/events", timeout=10).status_code == 404
