"""Goal 7 - scale on one process: 1000 idle WebSocket clients connected, then 200 concurrent SSE
streams (200 different jobs) while the server's event-loop lag is sampled (5 ms ticker in the
server process). Generator: FakeGenerator (10 ms/step, 9 steps, 256x256 noise images) - the tiny
diffusers model would need ~0.35-0.6 s a job on this 2-core machine, i.e. 1-2 minutes for 200 jobs.
The queue limit is raised to 256 (the default 64 would answer 429 to most of the 200).

    .venv/bin/python bench/bench_scale.py [--streams 200] [--websockets 1000] [--step-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ServerProc, machine, med, pct, r, raise_fd_limit, rss_mb, save, sse_post  # noqa: E402

import httpx  # noqa: E402
import websockets  # noqa: E402
from websockets.protocol import State  # noqa: E402

PATH = "/v1/images/generations"


async def connect_all(url: str, count: int) -> list:
    sockets = []
    for start in range(0, count, 100):  # batches: a connect storm is not what is measured here
        batch = await asyncio.gather(*(websockets.connect(f"{url}/api/ws?client_id=idle-{i}", open_timeout=60)
                                       for i in range(start, min(count, start + 100))))
        sockets.extend(batch)
    return sockets


async def run(args) -> dict:
    raise_fd_limit()
    rng = random.Random()
    with ServerProc("--step-ms", str(args.step_ms), "--max-queue", "256") as server:
        pid = server.proc.pid
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            body = {"prompt": "scale", "model": "tiny-z-image", "size": f"{args.size}x{args.size}", "num_inference_steps": 9}
            (await client.post(PATH, json={**body, "response_format": "url"})).raise_for_status()  # warm-up
            await asyncio.sleep(1.0)
            rss_before = rss_mb(pid)
            sockets = await connect_all(server.ws_url, args.websockets)
            await asyncio.sleep(1.0)
            rss_after = rss_mb(pid)
            (await client.post("/_bench/lag/start")).raise_for_status()
            started = time.time()
            results = await asyncio.gather(*(sse_post("127.0.0.1", server.port, PATH,
                                                      {**body, "seed": rng.randrange(1 << 40), "stream": True})
                                             for _ in range(args.streams)), return_exceptions=True)
            wall = time.time() - started
            lag = (await client.post("/_bench/lag/stop")).json()
            rss_peak = rss_mb(pid)
            ok = [x for x in results if not isinstance(x, BaseException) and x.status == 200
                  and x.events and x.events[-1][2] == "[DONE]"]
            errors = sorted({type(x).__name__ if isinstance(x, BaseException) else f"HTTP {x.status}"
                             for x in results if x not in ok})
            ws_open = sum(1 for ws in sockets if ws.state is State.OPEN)
            ttfb = [(x.headers_at - x.sent_at) * 1000 for x in ok]
            await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    return {"streams": args.streams, "streams_completed": len(ok), "errors": errors,
            "websockets": args.websockets, "websockets_open_at_end": ws_open, "wall_s": r(wall, 2),
            "jobs_per_s": r(len(ok) / wall, 2), "sse_headers_p50_ms": r(med(ttfb), 1), "sse_headers_p99_ms": r(pct(ttfb, 99), 1),
            "event_loop_lag": lag, "rss_mb_before_ws": r(rss_before, 1), "rss_mb_after_ws": r(rss_after, 1),
            "rss_kb_per_idle_ws": r((rss_after - rss_before) * 1024 / args.websockets, 1), "rss_mb_peak_after_streams": r(rss_peak, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--websockets", type=int, default=1000)
    parser.add_argument("--step-ms", type=float, default=10)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    save("scale", {"machine": machine(), "model": f"FakeGenerator ({args.step_ms:g} ms/step, 9 steps, noise images)",
                   "size": args.size, **result})


if __name__ == "__main__":
    main()
