"""A/B of the SSE encoding fix (server.streaming.JsonEvent), side by side in one run.

Two bench servers (FakeGenerator, 50 ms/step, 1024x1024 noise images): ``fixed`` (the code as it
is) and ``legacy`` (``--legacy-sse-encode``: sse-starlette's generic encoder, as before the fix).
Interleaved per repeat: 16 concurrent streams of 16 jobs (preview latency p50/p99), then a cached
job streamed again (time to ``[DONE]``).

    .venv/bin/python bench/bench_fix_sse.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ServerProc, machine, med, pct, r, save, sse_post  # noqa: E402
from bench_latency import PATH, body, latencies, rng  # noqa: E402


async def run(args) -> dict:
    with ServerProc("--step-ms", "50", "--max-queue", "256") as fixed, \
            ServerProc("--step-ms", "50", "--max-queue", "256", "--legacy-sse-encode") as legacy:
        servers = {"fixed": fixed, "legacy": legacy}
        lat = {n: [] for n in servers}
        hit = {n: [] for n in servers}
        seed = rng.randrange(1 << 40)
        for server in servers.values():  # the cached job, and a warm-up
            await sse_post("127.0.0.1", server.port, PATH, body(args.size, 9, seed=seed, stream=True))
        for rep in range(args.repeats):
            for name in (["fixed", "legacy"] if rep % 2 == 0 else ["legacy", "fixed"]):
                port = servers[name].port
                results = await asyncio.gather(*(sse_post("127.0.0.1", port, PATH, body(args.size, 9, stream=True))
                                                 for _ in range(16)))
                for res in results:
                    lat[name].extend(latencies(res))
                for _ in range(10):
                    started = time.perf_counter()
                    res = await sse_post("127.0.0.1", port, PATH, body(args.size, 9, seed=seed, stream=True))
                    assert res.events[-1][2] == "[DONE]"
                    hit[name].append((time.perf_counter() - started) * 1000)
    return {name: {"preview_p50_ms": r(pct(lat[name], 50), 2), "preview_p99_ms": r(pct(lat[name], 99), 2),
                   "preview_max_ms": r(max(lat[name]), 2), "cache_hit_stream_p50_ms": r(med(hit[name]), 2)}
            for name in lat}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    save("fix_sse", {"machine": machine(), "model": "FakeGenerator (50 ms/step, noise images)", "size": args.size,
                     "repeats": args.repeats, "ab": asyncio.run(run(args))})


if __name__ == "__main__":
    main()
