"""A WebSocket client whose API node went away reconnects to another node with its client_id and,
without asking, follows its unfinished job there to the end (issue 15 item 1: clients reconnecting
by client_id see their jobs continue)."""

from __future__ import annotations

import json

from websockets.sync.client import connect

from tests.cluster.conftest import Cluster, KVServer


def test_a_named_client_follows_its_job_on_another_node(tmp_path):
    kv = KVServer("redis", tmp_path / "kv").start()
    cluster = Cluster(kv, tmp_path, step_s=0.05)
    try:
        api1, api2, _ = cluster.start(("api", "api-1"), ("api", "api-2"), ("worker", "w-1"))
        create = {"type": "create_job", "request_id": 1,
                  "params": {"prompt": "followed across nodes", "width": 64, "height": 64, "steps": 40, "seed": 3}}
        with connect(f"{api1.ws_url}/api/ws?client_id=roamer", open_timeout=10) as ws:
            ws.send(json.dumps(create))
            job_id = json.loads(ws.recv(timeout=20))["job_id"]
        api1.stop()  # the node the client used is gone (kill -9); the job runs on the worker
        with connect(f"{api2.ws_url}/api/ws?client_id=roamer", open_timeout=10) as ws:
            seen = []
            while not seen or seen[-1] not in ("completed", "failed", "cancelled"):
                message = json.loads(ws.recv(timeout=20))
                if message.get("type") == "job_status" and message["job_id"] == job_id:
                    seen.append(message["status"])
        assert seen[0] in ("pending", "processing") and seen[-1] == "completed", seen
    finally:
        cluster.stop()
        kv.stop()
