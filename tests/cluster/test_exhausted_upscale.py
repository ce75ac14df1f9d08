"""A generated job (image saved, upscale pending) whose upscale took down ``max_deliveries`` Redis
workers: the next worker completes it with its image and an ``upscale_error``, running nothing, as a
single node does after ``max_deliveries`` process deaths (``states.RECOVERY_EXHAUSTED``); before, it
ended ``failed`` and the image was dropped (issue 15)."""

from __future__ import annotations

import json

import pytest

from server.cluster.codec import GROUP
from server.core.jobs import JobStatus
from server.testing.fakes import FakeGenerator, FakeUpscaler
from tests.cluster.conftest import KVServer
from tests.cluster.lua import RESULT, Lua
from tests.cluster.takeover import take_over


@pytest.mark.parametrize("backend", ["redis", "valkey"])
def test_generated_job_whose_upscale_stopped_max_deliveries_workers_completes_with_its_image(backend, tmp_path):

    kv = KVServer(backend, tmp_path / "kv").start()
    client = kv.client()
    lua = Lua(client)
    msg, fence = lua.running_job(worker="w1")
    assert lua.move(fence, JobStatus.GENERATED, worker="w1", result=json.dumps(RESULT.to_dict())) == ["ok", "0"]
    assert lua.claim(msg, "w2", max_deliveries=2)[0] == "upscale"  # w1 died upscaling, and so does w2
    client.xclaim(lua.keys.queue, GROUP, "w2", 0, [msg], idle=100_000, justid=True)  # w2 stopped beating
    generator, upscaler = FakeGenerator(), FakeUpscaler()


    try:
        kinds, final = take_over(kv, tmp_path, generator, upscaler, node_id="w3", max_deliveries=2)
        fields = lua.job()
    finally:
        client.close()
        kv.stop()
    assert kinds == ["generated", "completed"]
    assert final.status is JobStatus.COMPLETED and final.failure is None and final.error is None
    assert final.result.images == RESULT.images and final.result.seeds == RESULT.seeds
    assert final.result.upscale_error == "upscaling stopped 2 workers; it is not retried"
    assert fields["worker"] == "w3" and fields["deliveries"] == "3"
    assert generator.calls == [] and upscaler.calls == 0, "nothing ran again"
