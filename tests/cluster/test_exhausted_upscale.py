"""A generated job (image saved, upscale pending) whose upscale took down ``max_deliveries`` Redis
workers: the next worker completes it with its image and an ``upscale_error``, running nothing, as a
single node does after ``max_deliveries`` process deaths (``states.RECOVERY_EXHAUSTED``); before, it
ended ``failed`` and the image was dropped (issue 15)."""

from __future__ import annotations

import pytest

from server.core.jobs import JobStatus
from server.testing.fakes import FakeGenerator, FakeUpscaler
from tests.cluster.lua import RESULT
from tests.cluster.takeover import generated_job, stop_beating, take_over


@pytest.mark.parametrize("backend", ["redis", "valkey"])
def test_generated_job_whose_upscale_stopped_max_deliveries_workers_completes_with_its_image(backend, tmp_path):
    with generated_job(backend, tmp_path) as (kv, lua, msg):
        assert lua.claim(msg, "w2", max_deliveries=2)[0] == "upscale"  # w1 died upscaling, and so does w2
        stop_beating(lua, msg, "w2")
        generator, upscaler = FakeGenerator(), FakeUpscaler()
        kinds, final = take_over(kv, tmp_path, generator, upscaler, node_id="w3", max_deliveries=2)
        fields = lua.job()
    assert kinds == ["generated", "completed"]
    assert final.status is JobStatus.COMPLETED and final.failure is None and final.error is None
    assert final.result.images == RESULT.images and final.result.seeds == RESULT.seeds
    assert final.result.upscale_error == "upscaling stopped 2 workers; it is not retried"
    assert fields["worker"] == "w3" and fields["deliveries"] == "3"
    assert generator.calls == [] and upscaler.calls == 0, "nothing ran again"
