import asyncio
import pytest
from server.engine import EngineConfig, JobEngine
from server.fake_generator import FakeGenerator, FakeUpscaler
from server.store import SQLiteJobStore
from server.spec import SpecInput, normalize, Limits
from server.profiles import get_profile

async def _events(sub, until_terminal=True):
    out = []
    while True:
        ev = await sub.get(timeout=10)
        out.append(ev)
        if ev.is_terminal:
            return out

def test_flow(tmp_path):
    async def main():
        store = await SQLiteJobStore(tmp_path / "db.sqlite3").open()
        eng = JobEngine(EngineConfig(output_dir=tmp_path / "out"), FakeGenerator(0.001), FakeUpscaler(), store)
        await eng.start()
        spec = normalize(SpecInput(prompt="a cat", model="tiny-z-image", seed=1, upscale=True), get_profile("tiny-z-image"), Limits())
        sub = await eng.submit(spec, interest="a", client_id="c1")
        evs = await _events(sub.subscriber)
        kinds = [(e.kind.value, e.record.status.value if e.record else None) for e in evs]
        print(kinds)
        assert evs[-1].record.status.value == "completed"
        assert evs[-1].record.result.images[0].upscaled_filename
        sub2 = await eng.submit(spec, interest="b", client_id="c1")
        assert not sub2.created and sub2.record.status.value == "completed"
        await eng.stop(1)
        await store.close()
    asyncio.run(main())
