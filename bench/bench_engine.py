"""Job-core overlap and event-loop lag, measured side by side in one run.

A FakeGenerator holds the 'GPU' for a fixed time per step (time.sleep on the GPU thread) and
returns noise images, so PNG encoding and file writes cost real CPU time. Variants:
  serial   - max_in_flight=1: each job's files are written before the next job starts
  overlap  - max_in_flight=4: the next job denoises while the previous one is encoded
Reported: wall time of N queued jobs / the sum of their GPU stages (1.0 = the GPU never waited),
and event-loop lag (a 5 ms ticker) p50/p99 while they run. Medians over repeats.

    .venv/bin/python bench/bench_engine.py [--jobs 4] [--size 1024] [--step-ms 50] [--steps 9] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.core.engine import EngineConfig, JobEngine  # noqa: E402
from server.testing.fakes import FakeGenerator  # noqa: E402
from server.core.profiles import get_profile  # noqa: E402
from server.core.spec import Limits, SpecInput, normalize  # noqa: E402
from server.core.store import SQLiteJobStore  # noqa: E402


async def run_once(in_flight: int, args, tmp: Path) -> dict:
    generator = FakeGenerator(step_s=args.step_ms / 1000, noise=True)
    store = await SQLiteJobStore(tmp / f"db-{in_flight}-{time.monotonic_ns()}.sqlite3").open()
    engine = JobEngine(EngineConfig(output_dir=tmp / "out", max_in_flight=in_flight), generator, None, store)
    await engine.start()
    profile = get_profile("tiny-z-image")
    specs = [normalize(SpecInput(prompt=f"bench {time.monotonic_ns()} {i}", model="tiny-z-image", seed=i,
                                 width=args.size, height=args.size, steps=args.steps), profile, Limits())
             for i in range(args.jobs)]
    started = time.perf_counter()
    subs = [(await engine.submit(s, interest="bench")).subscriber for s in specs]

    async def finish(sub):
        while not (await sub.get(timeout=120)).is_terminal:
            pass

    done = asyncio.gather(*(finish(s) for s in subs))
    lags = []
    while not done.done():
        tick = time.perf_counter()
        await asyncio.sleep(0.005)
        lags.append((time.perf_counter() - tick - 0.005) * 1000)
    await done
    wall = time.perf_counter() - started
    await engine.stop(5)
    await store.close()
    lags.sort()
    return {"wall_s": wall, "gpu_s": generator.busy_s, "ratio": wall / generator.busy_s,
            "lag_p50_ms": lags[len(lags) // 2], "lag_p99_ms": lags[int(len(lags) * 0.99)]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--step-ms", type=float, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = {"serial": [], "overlap": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved, so both variants see the same machine state
            for name, in_flight in (("serial", 1), ("overlap", 4)):
                results[name].append(asyncio.run(run_once(in_flight, args, Path(tmp))))
    summary = {name: {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}
               for name, runs in results.items()}
    print(json.dumps({"args": vars(args), "median": summary}, indent=2))


if __name__ == "__main__":
    main()
