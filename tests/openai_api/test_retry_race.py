"""An SDK retry after a network blip (issue 15 item 2): client A streams, drops its connection (its
interest is withdrawn and the job's cancel is requested, the job still processing), and B - the
real ``openai`` client - sends the identical request before the next step. B gets its image, not a
500 ``job_cancelled``. The generator is gated step by step, so the race is the same every run."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from server.testing.fakes import FakeGenerator
from tests.conftest import live, wait_until


class StepGate:
    """A FakeGenerator gate that lets through exactly as many steps as were allowed, and tells when
    the generator is held at it (it polls the cancel flag before each step, so once held there it
    has not seen a cancel requested since)."""

    def __init__(self) -> None:
        self._steps = threading.Semaphore(0)
        self._held = threading.Condition()
        self._waiting = 0

    def allow(self, steps: int = 1) -> None:
        for _ in range(steps):
            self._steps.release()

    def wait(self, timeout: float) -> bool:
        with self._held:
            self._waiting += 1
            self._held.notify_all()
        try:
            return self._steps.acquire(timeout=timeout)
        finally:
            with self._held:
                self._waiting -= 1

    def wait_held(self, timeout: float = 15.0) -> bool:
        """Wait until the generator is blocked at the gate (no permit left for it)."""
        with self._held:
            return self._held.wait_for(lambda: self._waiting > 0, timeout)


def drop_after_first_event(server, body: dict, gate: StepGate) -> str:
    """Client A: stream, read the first event (the job is processing), hang up once the generator
    is held before step 2. Returns the job id.

    Hanging up earlier races the generator: it could see the cancel at step 2's check and stop
    within the moment the test polls for the requested cancel (CI failed so, 1 run in many)."""
    with httpx.Client(timeout=30) as client, client.stream("POST", server.url + "/v1/images/generations",
                                                           json={**body, "stream": True}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data:"):
                assert gate.wait_held(), "the generator reached step 2's gate"
                return json.loads(line[5:])["job_id"]
    raise AssertionError("the stream ended without an event")


def retry_race(server, gate: StepGate, pool: ThreadPoolExecutor, seed: int):
    body = {"prompt": "a retried request", "size": "64x64", "seed": seed, "num_inference_steps": 4}
    gate.allow(1)  # step 1: a preview reaches A
    job_id = drop_after_first_event(server, body, gate)
    assert wait_until(lambda: server.engine.cancel_requested(job_id)), "A's drop requested the cancel"
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    retry = pool.submit(sdk.images.generate, prompt=body["prompt"], size="64x64",
                        extra_body={"seed": seed, "num_inference_steps": 4})
    # B joined: the cancel request is withdrawn before the generator reaches its next step.
    assert wait_until(lambda: not server.engine.cancel_requested(job_id)), "B's request kept the job"
    gate.allow(3)  # steps 2-4: exactly the rest of the job, so no permit is left for the next round
    return job_id, retry.result(30)


def test_a_retry_before_the_next_step_gets_the_image(tmp_path):
    gate = StepGate()
    with live(tmp_path, generator=FakeGenerator(gate=gate)) as server, ThreadPoolExecutor(1) as pool:
        job_id, result = retry_race(server, gate, pool, seed=1)
        assert result.data[0].b64_json
        assert len(server.generator.calls) == 1, "the same job went on; nothing ran twice"


def test_twenty_retries_all_get_their_image(tmp_path):
    gate = StepGate()
    with live(tmp_path, generator=FakeGenerator(gate=gate)) as server, ThreadPoolExecutor(1) as pool:
        images = [retry_race(server, gate, pool, seed=100 + i)[1].data[0].b64_json for i in range(20)]
        assert all(images) and len(images) == 20
