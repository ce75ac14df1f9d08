"""Worker failures with real API and worker processes, each scenario over Redis and over Valkey: a
killed worker's job is reclaimed and completed once, a frozen worker is fenced, a healthy long job
is never reclaimed, a job that kills workers ends failed while others flow."""

from __future__ import annotations

import signal
import time

import httpx

from tests.cluster.conftest import IDLE_MS
from tests.cluster.helpers import (body, job_hash, job_id_of, post_in_background, statuses, wait_status, wait_step)


def owner_of(cluster_procs, client, job_id):
    node = job_hash(client, job_id)["worker"]
    return next(p for p in cluster_procs if p.node_id == node)


def test_killed_worker_job_is_reclaimed_within_the_idle_bound_and_completed_once(kv, cluster_factory):
    cluster = cluster_factory(kv)
    api, *workers = cluster.start(("api", "api-1"), ("worker", "w-1"), ("worker", "w-2"))
    client = kv.client()
    payload = body("killed worker", steps=30)  # 1.5 s of steps
    job_id = job_id_of(payload)
    response = post_in_background(api.url, payload)
    wait_step(client, job_id, 3)
    victim = owner_of(workers, client, job_id)
    victim.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    result = response.result(30)
    assert result.status_code == 200, result.text
    # reclaimed after IDLE_MS of silence, then 30 steps of 50 ms (+ start-up slack)
    assert time.monotonic() - killed_at < IDLE_MS / 1000 + 1.5 + 2.0
    assert statuses(client, job_id).count("completed") == 1
    record = job_hash(client, job_id)
    assert record["deliveries"] == "2"
    assert record["worker"] != victim.node_id
    survivor = next(w for w in workers if w is not victim)
    assert httpx.get(survivor.url + "/health").json()["completed"] == 1


def test_frozen_worker_woken_after_reclaim_is_fenced_out(kv, cluster_factory):
    cluster = cluster_factory(kv)
    api, *workers = cluster.start(("api", "api-1"), ("worker", "w-1"), ("worker", "w-2"))
    client = kv.client()
    payload = body("frozen worker", steps=30)
    job_id = job_id_of(payload)
    response = post_in_background(api.url, payload)
    wait_step(client, job_id, 3)
    frozen = owner_of(workers, client, job_id)
    frozen.proc.send_signal(signal.SIGSTOP)
    try:
        # another worker takes it over once IDLE_MS passed without progress
        wait_step_by_other = wait_status_after(client, job_id, "processing", 2)
        assert wait_step_by_other
        frozen.proc.send_signal(signal.SIGCONT)  # wakes up mid-job, believing it still owns it
    finally:
        frozen.proc.send_signal(signal.SIGCONT)
    assert response.result(30).status_code == 200
    assert statuses(client, job_id).count("completed") == 1
    health = httpx.get(frozen.url + "/health").json()
    assert health["completed"] == 0
    assert "fenced out" in frozen.output()


def wait_status_after(client, job_id, status, nth, timeout=15.0):
    """Wait until the job's stream holds ``nth`` events of ``status``."""
    deadline = time.monotonic() + timeout
    cursor, seen = "0-0", 0
    while time.monotonic() < deadline:
        for _, entries in client.xread({f"t2i:ev:{job_id}": cursor}, block=200) or []:
            for entry_id, fields in entries:
                cursor = entry_id
                seen += fields.get("k") == "status" and fields.get("status") == status
                if seen >= nth:
                    return True
    return False


def test_healthy_long_job_is_never_reclaimed(kv, cluster_factory):
    cluster = cluster_factory(kv, step_s=0.1)
    api, *workers = cluster.start(("api", "api-1"), ("worker", "w-1"), ("worker", "w-2"))
    client = kv.client()
    payload = body("long healthy job", steps=40)  # 4 s: well past the 1.5 s idle bound
    job_id = job_id_of(payload)
    result = post_in_background(api.url, payload).result(30)
    assert result.status_code == 200
    assert job_hash(client, job_id)["deliveries"] == "1"
    assert statuses(client, job_id) == ["pending", "processing", "completed"]
    assert sum(httpx.get(w.url + "/health").json()["completed"] for w in workers) == 1


def test_poison_job_ends_failed_after_bounded_deliveries_while_others_flow(kv, cluster_factory):
    cluster = cluster_factory(kv, max_deliveries=2)
    api, *workers = cluster.start(("api", "api-1"), ("worker", "w-1"), ("worker", "w-2"), ("worker", "w-3"))
    client = kv.client()
    poison = body("crash:worker poison", steps=10)
    poison_id = job_id_of(poison)
    poisoned = post_in_background(api.url, poison)
    wait_status(client, poison_id, "processing")
    good = [post_in_background(api.url, body(f"good job {i}", steps=4)) for i in range(4)]
    assert all(f.result(30).status_code == 200 for f in good)
    failed = poisoned.result(30)
    assert failed.status_code == 500
    assert "not retried" in failed.json()["error"]["message"]
    assert sum(w.proc.poll() is not None for w in workers) == 2  # it took down exactly max_deliveries workers
    assert statuses(client, poison_id)[-1] == "failed"
