"""Edits on every backend: the engine contract with an edit spec (SQLite, Redis, Valkey), and an
edit posted to an API node process that a separate worker process runs, streaming back."""

from __future__ import annotations

import asyncio
import base64
import io
import shutil

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from server.core import inputs
from server.core.jobs import JobStatus
from server.core.profiles import get_profile
from server.core.spec import TASK_IMAGE_TO_IMAGE, Limits, SpecInput, normalize
from server.testing.fakes import FakeGenerator
from tests.cluster.conftest import KVServer
from tests.cluster.test_conformance import BACKENDS, engine_for, until_terminal


def png(seed: int, size=(64, 64)) -> io.BytesIO:
    buffer = io.BytesIO()
    Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8")).save(buffer, "PNG")
    buffer.seek(0)
    return buffer


def edit_spec(stored: inputs.EditInputs, prompt: str = "edit"):
    given = SpecInput(prompt=prompt, model="tiny-z-image", width=64, height=64, steps=4, seed=1,
                      task_type=TASK_IMAGE_TO_IMAGE, image_sha=stored.image_sha, mask_sha=stored.mask_sha)
    return normalize(given, get_profile("tiny-z-image"), Limits())


@pytest.mark.parametrize("backend", BACKENDS)
def test_edit_jobs_run_from_the_shared_inputs_and_dedup(backend, tmp_path):
    async def scenario():
        generator = FakeGenerator(step_s=0.01)
        async with engine_for(backend, tmp_path, generator) as engine:
            out = tmp_path / "out"
            first = inputs.ingest(out, png(1), None, 10**6)
            submission = await engine.submit(edit_spec(first), interest="a")
            _, record = await until_terminal(submission.subscriber)
            assert record.status is JobStatus.COMPLETED and record.spec.image_sha == first.image_sha
            assert generator.calls[-1].image_path == str(inputs.input_path(out, first.image_sha))
            assert [c.steps_run for c in generator.calls] == [3]  # 4 steps at 0.6: diffusers runs 4 - int(1.6)
            again = await engine.submit(edit_spec(first), interest="b")
            assert not again.created and again.record.job_id == record.job_id
            again.subscriber.close()
            other = await engine.submit(edit_spec(inputs.ingest(out, png(2), None, 10**6)), interest="c")
            assert other.created and other.record.job_id != record.job_id
            await until_terminal(other.subscriber)
            assert len(generator.calls) == 2
    asyncio.run(scenario())


def test_edit_through_an_api_node_runs_on_a_worker_and_streams_back(cluster_factory, tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server not installed")
    kv = KVServer("redis", tmp_path / "kv").start()
    try:
        cluster = cluster_factory(kv, step_s=0.02)
        api, worker = cluster.start(("api", "api-1"), ("worker", "w-1"))
        sdk = openai.OpenAI(base_url=api.url + "/v1", api_key="x", max_retries=0)
        events = list(sdk.images.edit(image=("in.png", png(3).getvalue(), "image/png"), prompt="x", stream=True,
                                      partial_images=2, extra_body={"seed": 5}))
        assert [e.type for e in events] == ["image_edit.partial_image"] * 2 + ["image_edit.completed"]
        final = Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json)))
        assert final.size == (64, 64)
        assert httpx.get(api.url + "/health").json()["generator"]["device"] == "remote"  # the API node runs nothing
        assert httpx.get(worker.url + "/health").json()["completed"] == 1
        assert list((tmp_path / "shared-out" / "inputs").glob("*.png"))  # written by the API node, read by the worker
    finally:
        kv.stop()
