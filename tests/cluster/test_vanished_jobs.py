"""Redis restarted without persistence under an open stream (issue 15, item 6): the job's record is
gone, so its stream would never get another event. The API node notices and ends the stream with
an in-band error that says so; and an idle API node's blocked read does not time out and reconnect
(its socket timeout is above the XREAD block)."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest

from server.cluster.codec import READ_BLOCK_MS
from server.core.jobs import JobStatus
from server.core.states import FailureCode
from tests.cluster.conftest import Cluster, KVServer
from tests.cluster.test_conformance import spec
from tests.cluster.test_restart import run_against

ENDED_WITHIN_S = 20  # reconnect + the existence check (at most every 5 s) + slack on 2 shared cores


def test_idle_reader_keeps_its_connection_and_a_vanished_job_ends_its_subscriber(tmp_path, caplog):
    from server.cluster.redis_engine import ClusterOptions, RedisEngine
    from server.core.engine import EngineConfig

    kv = KVServer("redis", tmp_path / "kv").start()

    async def scenario():
        config = EngineConfig(output_dir=tmp_path / "out")
        config.output_dir.mkdir(parents=True, exist_ok=True)
        engine = RedisEngine(config, ClusterOptions(url=kv.url, node_id="api"))  # no worker: stays pending
        await engine.start()
        try:
            submission = await engine.submit(spec("orphaned by a restart"), interest="a")
            subscriber = submission.subscriber
            assert (await subscriber.get(timeout=10)).record.status is JobStatus.PENDING
            with caplog.at_level(logging.WARNING, logger="server.cluster.streams"):
                # Nothing happens to the job for longer than one whole XREAD block: the reader's
                # socket must not time out (it did, with redis-py's 5 s default, and reconnected).
                with pytest.raises(TimeoutError):
                    await subscriber.get(timeout=READ_BLOCK_MS / 1000 + 2)
                assert not [r.message for r in caplog.records if "redis unavailable" in r.message]
            await asyncio.to_thread(kv.restart)
            assert not kv.client().exists(f"t2i:job:{submission.record.job_id}")  # the record is gone
            restarted = asyncio.get_running_loop().time()
            event = await subscriber.get(timeout=ENDED_WITHIN_S)
            print(f"subscriber ended {asyncio.get_running_loop().time() - restarted:.2f} s after Redis was back")
            assert event.is_terminal and event.record.status is JobStatus.FAILED
            assert event.record.failure is FailureCode.INTERRUPTED
            assert "no longer exists" in event.record.error and "submit the request again" in event.record.error
            subscriber.close()
        finally:
            await engine.stop(2)
    run_against(kv, scenario)


def test_sse_stream_of_a_vanished_job_ends_with_an_in_band_error(tmp_path):
    kv = KVServer("redis", tmp_path / "kv").start()
    cluster = Cluster(kv, tmp_path, sse_ping_s=1)  # a ping a second: the deadline below is checked often
    try:
        (api,) = cluster.start(("api", "api-1"))  # no worker: the job waits in the queue
        lines, deadline = [], time.monotonic() + 60
        request = {"prompt": "lost with redis", "size": "64x64", "seed": 7, "num_inference_steps": 2, "stream": True}
        with httpx.Client(timeout=httpx.Timeout(10, read=ENDED_WITHIN_S)) as client, \
                client.stream("POST", api.url + "/v1/images/generations", json=request) as stream:
            assert stream.status_code == 200
            for line in stream.iter_lines():
                lines.append(line)
                if line.startswith(": job"):  # the stream is open and the job accepted
                    kv.restart()
                    deadline = time.monotonic() + ENDED_WITHIN_S
                assert time.monotonic() < deadline, "the stream did not end (pings only)"
        print(f"stream ended {time.monotonic() - deadline + ENDED_WITHIN_S:.2f} s after Redis was back")
        errors = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
        assert "event: error" in lines, lines
        assert len(errors) == 1 and "no longer exists" in errors[0]["error"]["message"], errors
        assert "Traceback" not in api.output()
    finally:
        cluster.stop()
        kv.stop()
