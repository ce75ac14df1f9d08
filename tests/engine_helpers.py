"""Helpers for driving the job engine directly (its public Python interface)."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from server.core.engine import EngineConfig, JobEngine
from server.testing.fakes import FakeGenerator, FakeUpscaler
from server.core.profiles import get_profile
from server.core.spec import Limits, SpecInput, normalize
from server.core.store import SQLiteJobStore


def spec(prompt="a red fox", seed=1, **fields):
    return normalize(SpecInput(prompt=prompt, model="tiny-z-image", seed=seed, **fields),
                     get_profile("tiny-z-image"), Limits())


@contextlib.asynccontextmanager
async def running_engine(tmp_path: Path, generator=None, upscaler=None, **config):
    store = await SQLiteJobStore(tmp_path / "jobs.sqlite3").open()
    engine = JobEngine(EngineConfig(output_dir=tmp_path / "outputs", **config),
                       generator or FakeGenerator(), upscaler or FakeUpscaler(), store)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop(2.0)
        await store.close()


async def until_terminal(subscriber, timeout=20.0):
    """All events up to and including the terminal status."""
    events = []
    while True:
        event = await subscriber.get(timeout=timeout)
        events.append(event)
        if event.is_terminal:
            return events


def statuses(events):
    return [e.record.status.value for e in events if e.record is not None]


class CancelHeldGenerator(FakeGenerator):
    """Holds the GPU thread at the moment it has seen the cancel flag, before it stops: the window
    in which an HTTP retry could join a job that is already stopping."""

    def __init__(self, step_s: float = 0.0):
        super().__init__(step_s=step_s)
        self.saw_cancel = threading.Event()
        self.stop = threading.Event()
        self.step_gate = threading.Event()

    def generate(self, request, on_step, is_cancelled):
        def cancelled() -> bool:
            self.step_gate.wait(30)
            if is_cancelled():
                self.saw_cancel.set()
                self.stop.wait(30)
                return True
            return False
        return super().generate(request, on_step, cancelled)
