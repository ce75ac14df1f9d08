#!/usr/bin/env python3
"""Measure streaming against a t2i server: real-time vs batch, per-step timing, concurrent streams.

    python test_streaming.py --url http://127.0.0.1:8000 [--steps 20] [--size 256x256] [--concurrent 3]
    python test_streaming.py --spawn --json        # starts `python -m server --model tiny-z-image` itself

Not a pytest module (pytest collects ``tests/`` only): a measuring tool. It runs

1. one streamed request (step dialect), timing every event on arrival;
2. the same parameters without streaming (with another seed: equal requests are one cached job
   on the server, and a cache hit would measure nothing);
3. with ``--concurrent N``, N streams at once (distinct seeds);

then prints a step table and a summary: total time, steps received, average interval, time to
first preview, and whether updates arrived before completion. ``--json`` also prints the summary
as one JSON line (the last line of stdout). Exit code: 0 when every stream delivered previews
before its final image; 1 when one did not (everything arrived at the end, or no previews); 2 when
the run itself failed (server unreachable, error response).

"Before completion" means: at least one preview arrived before the final image, and the previews
were spread over time on arrival as they were on the server (a buffering proxy that releases the
whole stream at the end collapses the arrival spread to ~0 while the server's timestamps still
span the generation).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from client_example import T2IClient, T2IError

REPO = Path(__file__).resolve().parent
MIN_SPREAD_RATIO = 0.25  # arrival spread / server spread below this: the stream was buffered


@dataclass
class Arrival:
    t: float  # seconds since the request was sent
    step: int
    total_steps: int
    is_final: bool
    server_ts: float


@dataclass
class StreamRun:
    seed: int
    arrivals: list[Arrival] = field(default_factory=list)
    total_s: float = 0.0

    def summary(self) -> dict:
        previews = [a for a in self.arrivals if not a.is_final]
        finals = [a for a in self.arrivals if a.is_final]
        first, final = (previews[0] if previews else None), (finals[0] if finals else None)
        intervals = [b.t - a.t for a, b in zip(previews, previews[1:])]
        before = bool(first and final and first.t < final.t)
        client_span = server_span = 0.0
        if before:
            client_span, server_span = final.t - first.t, final.server_ts - first.server_ts
            before = server_span < 0.02 or client_span >= MIN_SPREAD_RATIO * server_span
        return {
            "seed": self.seed,
            "total_time_s": round(self.total_s, 4),
            "steps_received": len(previews),
            "finals_received": len(finals),
            "time_to_first_preview_s": round(first.t, 4) if first else None,
            "time_to_final_s": round(final.t, 4) if final else None,
            "average_interval_s": round(sum(intervals) / len(intervals), 4) if intervals else None,
            "arrival_span_s": round(client_span, 4),
            "server_span_s": round(server_span, 4),
            "updates_before_completion": before,
        }


async def stream_once(client: T2IClient, prompt: str, params: dict, seed: int) -> StreamRun:
    run = StreamRun(seed)
    started = time.monotonic()
    async for event in client.generate_image(prompt, stream=True, seed=seed, **params):
        run.arrivals.append(Arrival(time.monotonic() - started, int(event.get("step", 0)),
                                    int(event.get("total_steps", 0)), bool(event.get("is_final")),
                                    float(event.get("timestamp") or 0.0)))
    run.total_s = time.monotonic() - started
    return run


async def batch_once(client: T2IClient, prompt: str, params: dict, seed: int) -> float:
    started = time.monotonic()
    async for _ in client.generate_image(prompt, stream=False, seed=seed, **params):
        pass
    return time.monotonic() - started


def print_steps(run: StreamRun) -> None:
    print(f"{'event':<14}{'since start (s)':>16}{'interval (s)':>14}{'server dt (s)':>15}")
    last_t, first_ts = 0.0, run.arrivals[0].server_ts if run.arrivals else 0.0
    for a in run.arrivals:
        label = "final" if a.is_final else f"step {a.step}/{a.total_steps}"
        print(f"{label:<14}{a.t:>16.4f}{a.t - last_t:>14.4f}{a.server_ts - first_ts:>15.4f}")
        last_t = a.t


def print_summary(title: str, s: dict) -> None:
    print(f"\n== {title}")
    for key, value in s.items():
        print(f"  {key:<28} {value}")


async def measure(args: argparse.Namespace, url: str) -> dict:
    width, _, height = args.size.lower().partition("x")
    params = {"num_inference_steps": args.steps, "width": int(width), "height": int(height), "model": args.model_name}
    seeds = iter(random.Random(args.seed).sample(range(1, 2**31), 3 + args.concurrent))
    async with T2IClient(url, args.api_key, timeout=args.timeout) as client:
        if args.warmup:  # the first generation pays one-off costs (weights to device, kernels)
            await batch_once(client, args.prompt, {**params, "num_inference_steps": 1}, next(seeds))
        stream = await stream_once(client, args.prompt, params, next(seeds))
        print(f"-- streamed {args.steps} steps at {args.size}:")
        print_steps(stream)
        batch_s = await batch_once(client, args.prompt, params, next(seeds))
        summary = {"url": url, "steps": args.steps, "size": args.size, **stream.summary(), "batch_total_time_s": round(batch_s, 4)}
        first = summary["time_to_first_preview_s"]
        summary["first_picture_speedup"] = round(batch_s / first, 2) if first else None
        if args.concurrent:
            started = time.monotonic()
            runs = await asyncio.gather(*(stream_once(client, args.prompt, params, next(seeds)) for _ in range(args.concurrent)))
            per_stream = [r.summary() for r in runs]
            summary["concurrent"] = {
                "streams": args.concurrent, "wall_time_s": round(time.monotonic() - started, 4),
                "all_updates_before_completion": all(s["updates_before_completion"] for s in per_stream),
                "per_stream": per_stream,
            }
    return summary


def report(summary: dict) -> None:
    main_keys = [k for k in summary if k not in ("concurrent", "url")]
    print_summary(f"streaming vs batch ({summary['url']})", {k: summary[k] for k in main_keys})
    conc = summary.get("concurrent")
    if conc:
        print(f"\n== {conc['streams']} concurrent streams: wall {conc['wall_time_s']} s, "
              f"all updates before completion: {conc['all_updates_before_completion']}")
        for i, s in enumerate(conc["per_stream"]):
            print(f"  #{i}: total {s['total_time_s']} s, {s['steps_received']} previews, first after "
                  f"{s['time_to_first_preview_s']} s, avg interval {s['average_interval_s']} s, "
                  f"before completion: {s['updates_before_completion']}")


# -- spawning a server ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def spawned_server(model: str, timeout: float):
    """``python -m server`` on a free port with a temporary output dir; killed on exit."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="t2i-measure-") as tmp:
        log_path = Path(tmp) / "server.log"
        cmd = [sys.executable, "-m", "server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
               "--output-dir", str(Path(tmp) / "outputs")]
        env = {"HF_HUB_OFFLINE": "1", "SDNQ_USE_TORCH_COMPILE": "0", **os.environ}
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(proc, url, timeout, log_path)
            print(f"-- spawned {' '.join(cmd[1:])} (pid {proc.pid})", flush=True)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(15)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log_path: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)  # polling a child process that is still importing torch
    raise RuntimeError(f"server not healthy after {timeout:.0f} s:\n{log_path.read_text()[-2000:]}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8000", help="a running server")
    where.add_argument("--spawn", action="store_true", help="start `python -m server` on a free port")
    p.add_argument("--spawn-model", default="tiny-z-image", help="--model for the spawned server")
    p.add_argument("--model-name", default=None, help="model field of each request (default: the server's)")
    p.add_argument("--prompt", default="a red fox in fresh snow, morning light")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", default="256x256")
    p.add_argument("--concurrent", type=int, default=0, metavar="N", help="also run N streams at once")
    p.add_argument("--seed", type=int, default=None, help="seeds the seeds (runs always use distinct ones)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false")
    p.add_argument("--api-key")
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--spawn-timeout", type=float, default=300.0)
    p.add_argument("--json", action="store_true", help="also print the summary as one JSON line, last")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.spawn:
            with spawned_server(args.spawn_model, args.spawn_timeout) as url:
                summary = asyncio.run(measure(args, url))
        else:
            summary = asyncio.run(measure(args, args.url))
    except (T2IError, httpx.HTTPError, RuntimeError, OSError) as exc:
        print(f"error: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
        return 2
    report(summary)
    ok = summary["updates_before_completion"] and summary.get("concurrent", {}).get("all_updates_before_completion", True)
    summary["ok"] = bool(ok)
    print("\nRESULT:", "streaming delivered updates before completion" if ok
          else "FAIL: streaming delivered nothing before completion")
    if args.json:
        print(json.dumps(summary), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
