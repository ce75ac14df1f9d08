"""WebSocket fuzzing: thousands of hostile frames (invalid JSON, wrong types, huge strings, deep
nesting, binary frames, unknown types, floods of create_job). Each frame gets exactly one reply -
an ``error`` frame with a documented code, or the reply its valid request deserves - or, above the
transport's frame limit, the documented close code 1009; the server and every other client carry on.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from server.testing.fakes import FakeGenerator
from tests.conftest import finished_by_status
from tests.reliability.helpers import (TIMEOUT, assert_no_leak, live, resources, run, settle, wait_until,
                                       ws_client)

FRAMES_PER_CLIENT = 400
ROUNDS = 2  # resources are compared after round 1 (pools warmed up) and after round 2
HOSTILE_CLIENTS = 3
ERROR_CODES = {"invalid_json", "missing_type", "unknown_type", "invalid_value", "missing_required_parameter",
               "binary_frame", "frame_too_large", "job_not_found", "model_not_found", "client_queue_full",
               "queue_full", "client_id_required", "job_not_cancellable"}
TYPES = ["create_job", "get_status", "cancel_job", "get_client_jobs"]


def _junk(rng: random.Random, depth: int = 0):
    """A random JSON value of any type (the 'wrong type' for nearly every field)."""
    makers = [lambda: None, lambda: True, lambda: rng.randint(-2**70, 2**70), lambda: rng.random() * 1e6,
              lambda: "".join(map(chr, rng.sample(range(32, 0x2FFF), 5))), lambda: "",
              lambda: [_junk(rng, depth + 1)], lambda: {"k": _junk(rng, depth + 1)}, lambda: [1, "two", None]]
    return makers[rng.randrange(len(makers) if depth < 3 else 6)]()


def hostile_frame(rng: random.Random, index: int) -> tuple[str | bytes, str | None]:
    """(frame, request_id to expect on the reply, or None when the reply cannot echo one)."""
    rid = f"f{index}"
    kind = rng.randrange(12)
    if kind == 0:  # not JSON at all
        return rng.choice(["{", "nul", "{'type': 'create_job'}", "\x00\x01", "[1,2", '{"type": "create_job",}',
                           "".join(chr(rng.randrange(1, 0xD7FF)) for _ in range(50))]), None
    if kind == 1:  # JSON, but not an object
        return json.dumps(_junk(rng) if rng.random() < .5 else [{"type": "create_job"}]), None
    if kind == 2:  # binary frame
        return rng.randbytes(rng.randrange(1, 2048)), None
    if kind == 3:  # deep nesting, alone or inside a message
        depth = rng.choice([1000, 10_000, 100_000])
        nested = "[" * depth + "]" * depth
        return (nested if rng.random() < .5 else f'{{"type": "create_job", "request_id": "{rid}", "params": {nested}}}'), None
    if kind == 4:  # unknown or non-string types
        return json.dumps({"type": rng.choice([_junk(rng), "delete_everything", "x" * 10_000, "CREATE_JOB"]),
                           "request_id": rid}), None
    if kind == 5:  # huge strings where short ones belong
        huge = "y" * rng.choice([4001, 50_000, 900_000])
        return json.dumps(rng.choice([{"type": "create_job", "request_id": rid, "params": {"prompt": huge}},
                                      {"type": "get_status", "request_id": rid, "job_id": huge},
                                      {"type": "create_job", "request_id": rid, "params": {"prompt": "p", "model": huge}}])), None
    if kind == 6:  # larger than the protocol's frame limit, below the transport's
        return "z" * 1_200_000, None
    if kind in (7, 8):  # the right type, wrong field types
        params = {"prompt": rng.choice(["a cat", _junk(rng)]), "width": _junk(rng), "steps": _junk(rng),
                  "seed": rng.choice([-1, 2**64, _junk(rng)]), "guidance_scale": _junk(rng), "upscale": _junk(rng)}
        return json.dumps({"type": rng.choice(TYPES), "request_id": rid, "params": rng.choice([params, _junk(rng)]),
                           "job_id": _junk(rng)}), None
    if kind == 9:  # a request_id that cannot be echoed, on a valid-looking message
        return json.dumps({"type": "get_status", "request_id": _junk(rng), "job_id": "0" * 64}), None
    if kind == 10:  # well-formed requests about jobs that do not exist
        return json.dumps({"type": rng.choice(["get_status", "cancel_job"]), "request_id": rid,
                           "job_id": rng.choice(["0" * 64, "../../etc/passwd", "' OR 1=1 --"])}), rid
    # a valid create_job (a small fast job, or a client_queue_full error for a flood)
    return json.dumps({"type": "create_job", "request_id": rid,
                       "params": {"prompt": f"fuzz {index}", "width": 64, "height": 64, "steps": 2,
                                  "upscale": False}}), rid


async def _reply(client, expected_rid) -> dict:
    """The reply to the frame just sent: an error, or a message carrying its request_id. Pushes of
    a job carry the request_id of the create_job it came from, which was answered already: a
    request_id seen on an earlier reply marks a push, skipped here."""
    answered = client.__dict__.setdefault("answered_rids", set())
    while True:
        message = await client.recv(timeout=TIMEOUT)
        if message.get("type") != "error" and message.get("request_id") in answered:
            continue
        if message.get("type") == "error" or message.get("request_id") is not None:
            if expected_rid is not None and message.get("type") != "error":
                assert message["request_id"] == expected_rid, message
            if message.get("request_id") is not None:
                answered.add(message["request_id"])
            return message


async def hostile(server, seed: int, stats: dict) -> None:
    rng = random.Random(seed)
    async with ws_client(server, max_size=2**24) as client:
        for index in range(FRAMES_PER_CLIENT):
            frame, rid = hostile_frame(rng, seed * 100_000 + index)
            await client.ws.send(frame)
            reply = await _reply(client, rid)
            stats["frames"] += 1
            if reply["type"] == "error":
                assert reply["code"] in ERROR_CODES, reply
                assert_no_leak(json.dumps(reply), reply["code"])
                stats["errors"][reply["code"]] = stats["errors"].get(reply["code"], 0) + 1
            else:
                stats["replies"] += 1
        assert (await client.request(type="get_status", job_id="0" * 64))["code"] == "job_not_found"


async def bystander(server, stop: asyncio.Event, stats: dict) -> None:
    """An ordinary client creating jobs while the others fuzz: every job completes."""
    async with ws_client(server, "bystander") as client:
        index = 0
        while not stop.is_set() or index < 3:
            created = await client.create(f"bystander {index}", steps=2, upscale=False, seed=None)
            done = await client.until_status(created["job_id"], "completed", "failed", "cancelled")
            assert done["status"] == "completed", done
            stats["bystander_jobs"] += 1
            index += 1


def test_thousands_of_hostile_frames_get_errors_and_others_carry_on(tmp_path):
    with live(tmp_path, generator=FakeGenerator(step_s=0.001)) as server:
        stats = {"frames": 0, "replies": 0, "errors": {}, "bystander_jobs": 0}
        snapshots = []

        async def round_(offset: int):
            stop = asyncio.Event()
            calm = asyncio.create_task(bystander(server, stop, stats))
            await asyncio.gather(*(hostile(server, offset + seed, stats) for seed in range(1, HOSTILE_CLIENTS + 1)))
            stop.set()
            await calm

        for number in range(ROUNDS):
            run(round_(number * HOSTILE_CLIENTS), limit=120)
            snapshots.append(settle(server, snapshots[0], slack=0) if snapshots else settle(server, resources(server)))
        health = httpx.get(server.url + "/health", timeout=TIMEOUT).json()
    base, after = snapshots[0], snapshots[-1]
    print(f"\nws fuzz: {stats['frames']} hostile frames, {sum(stats['errors'].values())} error replies "
          f"{dict(sorted(stats['errors'].items()))}, {stats['replies']} valid replies; "
          f"bystander completed {stats['bystander_jobs']} jobs; resources {base} -> {after}")
    assert stats["frames"] == FRAMES_PER_CLIENT * HOSTILE_CLIENTS * ROUNDS
    assert {"invalid_json", "binary_frame", "frame_too_large", "unknown_type", "invalid_value"} <= set(stats["errors"])
    assert stats["bystander_jobs"] >= 3 * ROUNDS and health["status"] == "ok"
    assert after.within(base, slack=0), (base, after)


def test_a_frame_above_the_transport_limit_closes_only_that_connection(fake_server):
    async def body():
        async with ws_client(fake_server, "neighbour") as neighbour:
            async with ws_client(fake_server, max_size=2**24) as big:
                await big.ws.send("x" * (2**21 + 1))  # LiveServer's ws_max_size is 2 MiB
                with pytest.raises(ConnectionClosed) as closed:
                    await big.recv()
            created = await neighbour.create("still here", upscale=False)
            done = await neighbour.until_status(created["job_id"], "completed", "failed")
            return closed.value.rcvd.code if closed.value.rcvd else None, done["status"]

    code, status = run(body())
    assert code == 1009 and status == "completed"


def test_create_job_floods_hit_the_per_client_and_global_limits(tmp_path):
    gate = threading.Event()
    with live(tmp_path, generator=FakeGenerator(gate=gate), max_queue=40, max_queue_per_client=16) as server:
        async def flood(client, tag: str, count: int) -> dict:
            codes: dict = {}
            for i in range(count):
                reply = await client.create(f"{tag} {i}", upscale=False)
                key = reply["status"] if reply["type"] == "job_status" else reply["code"]
                codes[key] = codes.get(key, 0) + 1
            return codes

        async def body():
            # Four client addresses: the per-client limit is per address (or key) as well.
            async with ws_client(server, local_addr=("127.0.0.1", 0)) as anonymous, \
                    ws_client(server, "named", local_addr=("127.0.0.2", 0)) as named, \
                    ws_client(server, "third", local_addr=("127.0.0.3", 0)) as third, \
                    ws_client(server, "fourth", local_addr=("127.0.0.4", 0)) as fourth:
                results = {"anonymous": await flood(anonymous, "anon", 60), "named": await flood(named, "named", 60),
                           "third": await flood(third, "third", 30)}
                results["fourth"] = await flood(fourth, "fourth", 5)
                full = dict(server.engine.counts())
            # The anonymous socket is gone: its jobs are withdrawn (cancelled, nobody else wants them).
            gate.set()
            return results, full

        results, counts_when_full = run(body(), limit=90)
        drained = wait_until(lambda: not server.engine.counts())
        statuses = finished_by_status(server.app.state.metrics)
    print(f"\nflood: {results}; engine when full: {counts_when_full}")
    # One of the 16 accepted jobs of each client went to the GPU (processing), the rest wait.
    assert results["anonymous"] == {"pending": 16, "client_queue_full": 44}
    assert results["named"] == {"pending": 16, "client_queue_full": 44}
    # 40 pending at most: 'third' got the room that was left, then the global limit.
    assert results["third"].get("queue_full", 0) > 0 and results["fourth"] == {"queue_full": 5}
    assert counts_when_full.get("pending", 0) == 40
    # Every accepted job ended: the anonymous client's 16 were cancelled when it left, the rest ran.
    assert drained and statuses == {"cancelled": 16, "completed": 16 + results["third"]["pending"]}, statuses
