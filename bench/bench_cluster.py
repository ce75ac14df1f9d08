"""Scale-out (issue 9): API nodes and GPU workers as separate processes over one Redis.

One ``redis-server`` (loopback, no persistence) holds two deployments side by side (key prefixes
``a:`` and ``b:``), each a real ``--role api`` node plus ``--role worker`` processes over the
FakeGenerator (``python -m server.testing.serve --fake-step-s``: the ``python -m server`` entry with
the fake injected): deployment A has 1 worker, B has 2. Measures, every repeat running each
variant (interleaved, alternating order):

- step event -> SSE client latency across nodes: the client's receive time of each step event
  (``bench/_common.sse_post``: raw h11, stamped when ``read`` returns) minus the event's
  ``timestamp`` (``time.time()`` in the worker's step callback, carried through Redis). Covers
  preview encoding, the worker's flush (STEP script), Redis, the API node's XREAD, fan-out, SSE.
- submit latency: ``POST`` with ``stream: true`` until the response headers (the route returns
  them once the SUBMIT script answered), each a new job, while the worker is busy.
- throughput: ``--jobs`` concurrent non-streamed jobs of fixed time, 1 worker (A) vs 2 (B).

    .venv/bin/python bench/bench_cluster.py [--repeats 3] [--step-ms 50] [--jobs 12]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import RESULTS, ServerProc, free_port, machine, med, pct, r, save, sse_post  # noqa: E402

import httpx  # noqa: E402

PATH = "/v1/images/generations"
MODEL = "tiny-z-image"


class Redis:
    def __init__(self, workdir: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                     "--save", "", "--appendonly", "no", "--dir", str(workdir)]

    def __enter__(self) -> "Redis":
        import redis

        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        for _ in range(500):
            try:
                client.ping()
                self.version = client.info("server")["redis_version"]
                return self
            except redis.RedisError:
                time.sleep(0.02)
        raise RuntimeError("redis did not start")

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait(10)


def node(redis_url: str, role: str, prefix: str, node_id: str, shared: Path, step_s: float) -> ServerProc:
    return ServerProc("--backend", redis_url, "--role", role, "--key-prefix", prefix, "--node-id", node_id,
                      "--model", MODEL, "--output-dir", str(shared), "--preview-percent", "5", "--max-queue", "512",
                      "--log-level", "WARNING", module=True,
                      launcher=("-m", "server.testing.serve", "--fake-step-s", str(step_s)))


def payload(prompt: str, steps: int, stream: bool) -> dict:
    body = {"prompt": prompt, "model": MODEL, "size": "64x64", "num_inference_steps": steps,
            "seed": random.randrange(1 << 40), "stream": stream}
    if not stream:
        body["response_format"] = "url"
    return body


async def step_latency(api: ServerProc, jobs: int, steps: int) -> list[float]:
    """ms from each step event's timestamp to its arrival at the client, over ``jobs`` sequential jobs."""
    out = []
    for j in range(jobs):
        result = await sse_post("127.0.0.1", api.port, PATH, payload(f"latency {j}", steps, True))
        assert result.status == 200, result.tail
        out += [(received - data["timestamp"]) * 1000 for received, data in result.data() if not data["is_final"]]
    return out


async def submit_latency(api: ServerProc, count: int, steps: int) -> list[float]:
    """ms from sending the request to the response headers; a long job keeps the worker busy."""
    async with httpx.AsyncClient(timeout=120) as client:
        blocker = asyncio.ensure_future(client.post(api.url + PATH, json=payload("blocker", 100, False)))
        await asyncio.sleep(0.3)  # let the blocker reach the worker (only its presence matters)
        out = []
        for i in range(count):
            result = await sse_post("127.0.0.1", api.port, PATH, payload(f"submit {i}", steps, True), until_headers=True)
            assert result.status == 200
            out.append((result.headers_at - result.sent_at) * 1000)
        blocker.cancel()  # the client goes away: the job is cancelled at its next step
        await asyncio.gather(blocker, return_exceptions=True)
    return out


async def throughput(api: ServerProc, jobs: int, steps: int) -> float:
    """Jobs per second for ``jobs`` concurrent non-streamed jobs."""
    async with httpx.AsyncClient(timeout=300) as client:
        started = time.monotonic()
        responses = await asyncio.gather(*(client.post(api.url + PATH, json=payload(f"throughput {i}", steps, False))
                                           for i in range(jobs)))
        elapsed = time.monotonic() - started
    assert all(resp.status_code == 200 for resp in responses), [resp.text for resp in responses if resp.status_code != 200]
    return jobs / elapsed


async def run(args, api_a: ServerProc, api_b: ServerProc) -> dict:
    await throughput(api_a, 2, 2)  # warm-up: imports, connections, first files
    await throughput(api_b, 2, 2)
    lat, sub, tput = [], [], {"1 worker": [], "2 workers": []}
    for rep in range(args.repeats):
        variants = [("1 worker", api_a), ("2 workers", api_b)]
        for name, api in variants if rep % 2 == 0 else variants[::-1]:
            tput[name].append(await throughput(api, args.jobs, args.steps))
        lat.append(await step_latency(api_a if rep % 2 == 0 else api_b, args.latency_jobs, args.latency_steps))
        sub.append(await submit_latency(api_a, args.submits, args.latency_steps))
        print(f"repeat {rep}: tput {[(k, r(v[-1])) for k, v in tput.items()]} step p50 {r(pct(lat[-1], 50))} "
              f"p99 {r(pct(lat[-1], 99))} submit p50 {r(pct(sub[-1], 50))} p99 {r(pct(sub[-1], 99))}", flush=True)
    ratios = [b / a for a, b in zip(tput["1 worker"], tput["2 workers"])]
    return {
        "step_latency_ms": {"p50": r(med([pct(x, 50) for x in lat])), "p99": r(med([pct(x, 99) for x in lat])),
                            "max": r(med([max(x) for x in lat])), "events_per_repeat": len(lat[0]),
                            "per_repeat_p99": [r(pct(x, 99)) for x in lat]},
        "submit_latency_ms": {"p50": r(med([pct(x, 50) for x in sub])), "p99": r(med([pct(x, 99) for x in sub])),
                              "requests_per_repeat": len(sub[0])},
        "throughput_jobs_per_s": {k: r(med(v)) for k, v in tput.items()},
        "throughput_ratio": r(med(ratios)), "throughput_ratios": [r(x) for x in ratios],
        "nominal_job_s": r(args.steps * args.step_ms / 1000),
    }


def report(data: dict) -> str:
    m, lat, sub, tput = data["machine"], data["step_latency_ms"], data["submit_latency_ms"], data["throughput_jobs_per_s"]
    verdict = lambda ok: "**met**" if ok else "**not met**"  # noqa: E731
    rows = [
        ("step event -> SSE client across nodes", "p99 < 5 ms",
         f"p50 {lat['p50']}, p99 {lat['p99']} ms ({lat['events_per_repeat']} events/repeat; p99 per repeat "
         f"{lat['per_repeat_p99']})", verdict(lat["p99"] < 5)),
        ("submit (POST stream:true -> headers)", "(report)", f"p50 {sub['p50']}, p99 {sub['p99']} ms "
         f"({sub['requests_per_repeat']} requests/repeat)", "n/a"),
        ("throughput, 2 workers / 1 worker", ">= 1.9x",
         f"{data['throughput_ratio']}x ({tput['1 worker']} vs {tput['2 workers']} jobs/s; per repeat "
         f"{data['throughput_ratios']})", verdict(data["throughput_ratio"] >= 1.9)),
    ]
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, Python {m['python']}, "
             f"{data['redis']}; load average {r(m['loadavg_at_start'][0], 2)} at start, "
             f"{r(data['loadavg_at_end'][0], 2)} at end. {data['repeats']} repeats, medians over repeats, variants "
             f"interleaved. Generator: FakeGenerator {data['step_ms']:g} ms/step, 64x64; throughput jobs "
             f"{data['steps']} steps ({data['nominal_job_s']} s nominal), {data['jobs']} at once.", "",
             "| measure | goal | measured (median over repeats) | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-ms", type=float, default=50)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--latency-jobs", type=int, default=8)
    parser.add_argument("--latency-steps", type=int, default=20)
    parser.add_argument("--submits", type=int, default=100)
    args = parser.parse_args()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="t2i-bench-cluster-") as tmp, Redis(Path(tmp)) as redis:
        shared_a, shared_b = Path(tmp) / "a", Path(tmp) / "b"
        step_s = args.step_ms / 1000  # the workers' FakeGenerator
        procs = [node(redis.url, "api", "a:", "api-a", shared_a, step_s),
                 node(redis.url, "worker", "a:", "wa-1", shared_a, step_s),
                 node(redis.url, "api", "b:", "api-b", shared_b, step_s),
                 node(redis.url, "worker", "b:", "wb-1", shared_b, step_s),
                 node(redis.url, "worker", "b:", "wb-2", shared_b, step_s)]
        for proc in procs:
            proc.__enter__()
        try:
            result = asyncio.run(run(args, procs[0], procs[2]))
        finally:
            for proc in procs:
                proc.__exit__(None, None, None)
    data = {"machine": info, "redis": f"Redis {redis.version}", "repeats": args.repeats, "step_ms": args.step_ms,
            "steps": args.steps, "jobs": args.jobs, **result}
    save("cluster", data)
    data["loadavg_at_end"] = os.getloadavg()
    text = "# Scale-out benchmark (issue 9)\n\nGenerated by `bench/bench_cluster.py`; JSON in `cluster.json`.\n\n"
    (RESULTS / "cluster.md").write_text(text + report(data))
    print(report(data))


if __name__ == "__main__":
    main()
