"""Goals 3-6 on one server process (bench/_server.py: the real app over a FakeGenerator with a fixed
step time and noise images, so final PNGs cost real CPU); the clients run in this process.

3. preview latency: step callback (the step event's ``timestamp``: ``time.time()`` taken in the
   step callback on the GPU thread) -> the event's last byte read from the client socket (same
   clock), with 1 stream, 16 streams of 16 different jobs, and 16 streams of one job (fan-out).
4. time to first byte while another job holds the GPU: SSE response headers; WebSocket
   ``create_job`` reply (the job's 'pending' status, the first event of that protocol).
5. cache hit: a completed job requested again - HTTP with a seed (url, b64_json, streamed) and
   WebSocket ``create_job``.
6. throughput: 8 closed-loop clients; the fraction of wall time the generator is busy.
Variants of one goal are interleaved within each repeat; medians over repeats.

    .venv/bin/python bench/bench_latency.py [--step-ms 50] [--size 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ServerProc, machine, med, pct, r, save, sse_post  # noqa: E402

import httpx  # noqa: E402
import websockets  # noqa: E402

PATH = "/v1/images/generations"
rng = random.Random()


def body(size: int, steps: int, seed: int | None = None, **extra) -> dict:
    return {"prompt": "bench", "model": "tiny-z-image", "size": f"{size}x{size}", "num_inference_steps": steps,
            "seed": rng.randrange(1 << 40) if seed is None else seed, **extra}


def latencies(result) -> list[float]:
    """ms from each intermediate's step callback to its arrival at the client socket."""
    return [(t - d["timestamp"]) * 1000 for t, d in result.data() if not d.get("is_final")]


async def streams(port: int, bodies: list[dict]):
    return await asyncio.gather(*(sse_post("127.0.0.1", port, PATH, b) for b in bodies))


# -- 3 ------------------------------------------------------------------------------------------

async def preview_latency(server: ServerProc, args) -> dict:
    variants = {
        "1_stream": lambda: [body(args.size, args.steps, stream=True)],
        "16_streams_16_jobs": lambda: [body(args.size, args.steps, stream=True) for _ in range(16)],
        "16_streams_1_job": lambda: [body(args.size, args.steps, seed=s, stream=True) for s in [rng.randrange(1 << 40)] * 16],
    }
    lat = {name: [] for name in variants}
    first = {name: [] for name in variants}
    for rep in range(args.repeats):
        for name, make in (list(variants.items()) if rep % 2 == 0 else list(variants.items())[::-1]):
            for res in await streams(server.port, make()):
                assert res.status == 200 and res.events and res.events[-1][2] == "[DONE]", res.tail[:200]
                lat[name].extend(latencies(res))
                partials = [t for t, d in res.data() if not d.get("is_final")]
                first[name].append((partials[0] - res.sent_at) * 1000)
    return {name: {"events": len(v), "p50_ms": r(pct(v, 50), 2), "p99_ms": r(pct(v, 99), 2), "max_ms": r(max(v), 2),
                   "first_intermediate_after_request_p50_ms": r(med(first[name]), 1)}
            for name, v in lat.items()}


# -- 4 ------------------------------------------------------------------------------------------

async def ttfb_while_busy(server: ServerProc, args) -> dict:
    blocker = asyncio.ensure_future(sse_post("127.0.0.1", server.port, PATH, body(256, 100, stream=True)))
    await asyncio.sleep(0.3)  # the blocker is on the GPU (100 steps x step time)
    sse_ms, sse_body_ms, ws_ms = [], [], []
    async with websockets.connect(server.ws_url + "/api/ws") as ws:
        for i in range(args.samples):
            res = await sse_post("127.0.0.1", server.port, PATH, body(256, 9, stream=True), until_first_body=True)
            assert res.status == 200
            sse_ms.append((res.headers_at - res.sent_at) * 1000)
            sse_body_ms.append((res.first_body_at - res.sent_at) * 1000)
            message = {"type": "create_job", "request_id": i, "params": {
                "prompt": "bench", "model": "tiny-z-image", "width": 256, "height": 256, "steps": 9,
                "seed": rng.randrange(1 << 40), "upscale": False}}
            sent = time.perf_counter()
            await ws.send(json.dumps(message))
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("request_id") == i:
                    break
            ws_ms.append((time.perf_counter() - sent) * 1000)
            assert reply.get("status") == "pending", reply
    still_busy = not blocker.done()
    blocker.cancel()
    await asyncio.gather(blocker, return_exceptions=True)
    return {"gpu_held_throughout": still_busy, "samples": args.samples,
            "sse_headers_p50_ms": r(med(sse_ms), 2), "sse_headers_p99_ms": r(pct(sse_ms, 99), 2),
            "sse_first_body_p50_ms": r(med(sse_body_ms), 2), "sse_first_body_p99_ms": r(pct(sse_body_ms, 99), 2),
            "ws_create_job_reply_p50_ms": r(med(ws_ms), 2), "ws_create_job_reply_p99_ms": r(pct(ws_ms, 99), 2),
            "note": "an SSE stream's first body bytes are the ': job <id>' comment, sent at once; its first data "
                    "event is the first preview, once the job reaches the GPU; the WebSocket reply is immediate"}


# -- 5 ------------------------------------------------------------------------------------------

async def cache_hit(server: ServerProc, args) -> dict:
    seed = rng.randrange(1 << 40)
    spec = body(args.cache_size, args.steps, seed=seed)
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        (await client.post(PATH, json={**spec, "response_format": "url"})).raise_for_status()  # completes the job
        async with websockets.connect(server.ws_url + "/api/ws?client_id=bench-cache", max_size=2**24) as ws:
            async def http(fmt: str) -> None:
                response = await client.post(PATH, json={**spec, "response_format": fmt})
                response.raise_for_status()

            async def stream() -> None:
                res = await sse_post("127.0.0.1", server.port, PATH, {**spec, "stream": True})
                assert res.events[-1][2] == "[DONE]"

            async def ws_create(i=[0]) -> None:
                i[0] += 1
                await ws.send(json.dumps({"type": "create_job", "request_id": i[0], "params": {
                    "prompt": "bench", "model": "tiny-z-image", "width": args.cache_size, "height": args.cache_size,
                    "steps": args.steps, "seed": seed, "upscale": False}}))
                while True:
                    reply = json.loads(await ws.recv())
                    if reply.get("request_id") == i[0]:
                        assert reply["status"] == "completed", reply
                        return

            variants = {"http_url": lambda: http("url"), "http_b64_json": lambda: http("b64_json"),
                        "http_stream": stream, "ws_create_job": ws_create}
            samples = {name: [] for name in variants}
            for fn in variants.values():
                await fn()  # warm-up
            for rep in range(args.samples):
                for name, fn in (list(variants.items()) if rep % 2 == 0 else list(variants.items())[::-1]):
                    started = time.perf_counter()
                    await fn()
                    samples[name].append((time.perf_counter() - started) * 1000)
    return {"size": args.cache_size, "samples": args.samples,
            **{name: {"p50_ms": r(med(v), 2), "p99_ms": r(pct(v, 99), 2)} for name, v in samples.items()}}


# -- 6 ------------------------------------------------------------------------------------------

async def throughput(server: ServerProc, args) -> dict:
    runs = {"url": [], "b64_json": []}
    async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                 limits=httpx.Limits(max_connections=16)) as client:
        async def client_loop(fmt: str) -> None:
            for _ in range(args.per_client):
                response = await client.post(PATH, json=body(args.size, args.steps, response_format=fmt))
                response.raise_for_status()

        for rep in range(args.throughput_repeats):
            for fmt in (list(runs) if rep % 2 == 0 else list(runs)[::-1]):
                before = (await client.get("/_bench/stats")).json()
                started = time.time()
                await asyncio.gather(*(client_loop(fmt) for _ in range(8)))
                wall = time.time() - started
                after = (await client.get("/_bench/stats")).json()
                intervals = [iv for iv in after["intervals"] if iv[0] >= started]
                busy = after["busy_s"] - before["busy_s"]
                window = max(e for _, e in intervals) - min(s for s, _ in intervals)
                runs[fmt].append({"jobs": len(intervals), "wall_s": wall, "busy_s": busy, "busy_fraction": busy / wall,
                                  "busy_fraction_first_start_to_last_end": busy / window})
    return {"clients": 8, "requests_per_client": args.per_client, "size": args.size,
            **{fmt: {k: r(med([x[k] for x in v]), 3) for k in v[0]} for fmt, v in runs.items()}}


async def run_all(args) -> dict:
    with ServerProc("--step-ms", str(args.step_ms), "--max-queue", "256", "--max-queue-per-client", "256") as server:
        await asyncio.gather(*(sse_post("127.0.0.1", server.port, PATH, body(args.size, args.steps, stream=True))
                               for _ in range(2)))  # warm-up
        out = {"preview_latency": await preview_latency(server, args)}
        out["ttfb_while_busy"] = await ttfb_while_busy(server, args)
        out["cache_hit"] = await cache_hit(server, args)
        out["throughput"] = await throughput(server, args)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--step-ms", type=float, default=50)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--cache-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--per-client", type=int, default=2)
    parser.add_argument("--throughput-repeats", type=int, default=2)
    args = parser.parse_args()
    results = asyncio.run(run_all(args))
    save("latency", {"machine": machine(), "model": f"FakeGenerator ({args.step_ms:g} ms/step, noise images)",
                     "size": args.size, "steps": args.steps, "repeats": args.repeats, **results})


if __name__ == "__main__":
    main()
