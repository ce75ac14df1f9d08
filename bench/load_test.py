"""Bounded load test on loopback: dozens of concurrent clients mixing SSE streams, plain JSON
requests and WebSocket jobs, with duplicates (several requests for one spec), cancels, client
aborts and simulated out-of-memory failures. Checks that every request gets exactly one terminal
outcome (nothing lost, nothing duplicated) and reports the server's RSS over the run.

    .venv/bin/python bench/load_test.py --requests 2000 --clients 48           # the long run
    .venv/bin/python bench/load_test.py --requests 200 --clients 24 --json     # a quick one

The server runs as a child process (the real app over a FakeGenerator with --step-ms steps, and a
FakeUpscaler), so its RSS is its own. ``run_load`` is also used in-process by
tests/reliability/test_load.py against a LiveServer. Exit status 1 when an invariant is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from websockets.asyncio.client import connect

REPO = Path(__file__).resolve().parent.parent
TERMINAL = ("completed", "failed", "cancelled")
TIMEOUT = 60.0


@dataclass
class Report:
    requests: int = 0
    outcomes: Counter = field(default_factory=Counter)  # kind:outcome -> count
    lost: list[str] = field(default_factory=list)  # requests without a terminal outcome
    duplicated: list[str] = field(default_factory=list)  # more than one terminal outcome
    wrong: list[str] = field(default_factory=list)  # an outcome that contradicts the request
    rss_mb: list[tuple[int, float]] = field(default_factory=list)  # (requests done, server RSS)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.wrong)

    def summary(self) -> dict:
        rss = [mb for _, mb in self.rss_mb]
        return {"requests": self.requests, "elapsed_s": round(self.elapsed_s, 1), "outcomes": dict(sorted(self.outcomes.items())),
                "lost": len(self.lost), "duplicated": len(self.duplicated), "wrong": len(self.wrong),
                "examples": (self.lost + self.duplicated + self.wrong)[:5],
                "rss_mb_first": rss[0] if rss else None, "rss_mb_last": rss[-1] if rss else None,
                "rss_mb_max": max(rss) if rss else None, "rss_samples": self.rss_mb}


@dataclass(frozen=True)
class Plan:
    """One request: how it is sent and what is done to it."""

    index: int
    kind: str  # sse | json | ws
    prompt: str
    seed: int | None
    action: str = "wait"  # wait | cancel (ws) | abort (sse: drop the stream after the first event)

    def body(self) -> dict:
        return {"prompt": self.prompt, "size": "64x64", "num_inference_steps": 4, "seed": self.seed, "upscale": False}


def make_plans(count: int, seed: int) -> list[Plan]:
    rng = random.Random(seed)
    plans = []
    for index in range(count):
        kind = rng.choice(["sse", "json", "ws", "ws"])
        roll = rng.random()
        if roll < 0.25:  # a duplicate: groups of consecutive requests share one spec
            prompt, spec_seed, action = f"dup {index // 6}", index // 6, "wait"
        elif roll < 0.30:
            prompt, spec_seed, action = f"fail:oom {index}", index, "wait"
        elif roll < 0.42 and kind == "ws":
            prompt, spec_seed, action = f"cancel me {index}", index, "cancel"
        elif roll < 0.48 and kind == "sse":
            prompt, spec_seed, action = f"abort me {index}", index, "abort"
        else:
            prompt, spec_seed, action = f"load {index}", index, "wait"
        plans.append(Plan(index, kind, prompt, spec_seed, action))
    return plans


# -- HTTP ---------------------------------------------------------------------------------------------

async def do_sse(http: httpx.AsyncClient, url: str, plan: Plan, report: Report) -> None:
    terminals, finals = [], 0
    async with http.stream("POST", url + "/v1/images/generations", json={**plan.body(), "stream": True}) as response:
        if response.status_code != 200:
            report.outcomes[f"sse:http_{response.status_code}"] += 1
            return
        event = None
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
                if plan.action == "abort":
                    report.outcomes["sse:aborted"] += 1
                    return  # leaving the block drops the connection mid-stream
                if data == "[DONE]":
                    terminals.append("done")
                elif event == "error":
                    terminals.append("error:" + json.loads(data)["error"]["code"])
                elif json.loads(data).get("is_final"):
                    finals += 1
                event = None
    _account(report, plan, "sse", terminals)
    if terminals == ["done"] and finals != 1:
        report.wrong.append(f"#{plan.index} sse: {finals} final images for n=1")


async def do_json(http: httpx.AsyncClient, url: str, plan: Plan, report: Report) -> None:
    response = await http.post(url + "/v1/images/generations", json=plan.body())
    if response.status_code == 200:
        outcome = "completed" if response.json()["data"][0].get("b64_json") else "empty"
    else:
        outcome = "error:" + response.json()["error"]["code"]
    _account(report, plan, "json", [outcome])


def _account(report: Report, plan: Plan, kind: str, terminals: list[str]) -> None:
    if not terminals:
        report.lost.append(f"#{plan.index} {kind} {plan.prompt}: no terminal event")
        return
    if len(terminals) > 1:
        report.duplicated.append(f"#{plan.index} {kind} {plan.prompt}: {terminals}")
    outcome = terminals[0]
    report.outcomes[f"{kind}:{outcome}"] += 1
    expected_failure = "fail:oom" in plan.prompt
    if expected_failure != outcome.startswith(("error:out_of_memory", "failed")) and not outcome.startswith("error:queue"):
        report.wrong.append(f"#{plan.index} {kind} {plan.prompt}: {outcome}")


# -- WebSocket ----------------------------------------------------------------------------------------

class WsWorker:
    """One client connection; many requests on it. A reader task routes replies by request_id and
    terminal statuses to every request of this connection waiting on that job."""

    def __init__(self, ws, report: Report):
        self.ws, self.report = ws, report
        self.replies: dict[str, asyncio.Future] = {}
        self.waiting: dict[str, list[tuple[Plan, asyncio.Future]]] = {}
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            message = json.loads(raw)
            request_id = message.get("request_id")
            if request_id is not None and request_id in self.replies:
                self.replies.pop(request_id).set_result(message)
            elif message.get("type") == "job_status" and message["status"] in TERMINAL:
                waiters = self.waiting.pop(message["job_id"], [])
                if not waiters:
                    self.report.duplicated.append(f"ws: terminal {message['status']} for {message['job_id'][:12]} "
                                                  "that no request was waiting for")
                for _, future in waiters:
                    future.set_result(message["status"])

    async def ask(self, message: dict) -> dict:
        future = asyncio.get_running_loop().create_future()
        self.replies[message["request_id"]] = future
        await self.ws.send(json.dumps(message))
        return await asyncio.wait_for(future, TIMEOUT)

    async def run(self, plan: Plan) -> None:
        params = {**plan.body(), "width": 64, "height": 64, "steps": 4}
        reply = await self.ask({"type": "create_job", "request_id": f"c{plan.index}", "params": params})
        if reply["type"] == "error":
            _account(self.report, plan, "ws", ["error:" + reply["code"]])
            return
        job_id = reply["job_id"]
        if reply["status"] in TERMINAL:  # answered from the cache: the reply is the terminal status
            _account(self.report, plan, "ws", [reply["status"]])
            return
        future = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(job_id, []).append((plan, future))
        if plan.action == "cancel":
            result = await self.ask({"type": "cancel_job", "request_id": f"x{plan.index}", "job_id": job_id})
            if result.get("withdrawn"):  # others still want it: this client is out, and told so
                self.waiting.pop(job_id, None)
                _account(self.report, plan, "ws", ["withdrawn"])
                return
        try:
            status = await asyncio.wait_for(future, TIMEOUT)
        except TimeoutError:
            status = None
        _account(self.report, plan, "ws", [status] if status else [])


# -- driver -------------------------------------------------------------------------------------------

async def run_load(url: str, ws_url: str, requests: int = 200, clients: int = 24, seed: int = 1,
                   sample_rss=None, sample_every: int = 100) -> Report:
    """Send ``requests`` requests from ``clients`` concurrent clients; the report of what came back."""
    report = Report(requests=requests)
    plans = make_plans(requests, seed)
    queue: asyncio.Queue[Plan] = asyncio.Queue()
    for plan in plans:
        queue.put_nowait(plan)
    done = 0
    started = time.monotonic()
    if sample_rss:
        report.rss_mb.append((0, sample_rss()))

    async def client(number: int) -> None:
        nonlocal done
        limits = httpx.Limits(max_connections=4)
        async with httpx.AsyncClient(timeout=TIMEOUT, limits=limits) as http, \
                connect(f"{ws_url}/api/ws?client_id=load-{number}", max_size=2**24) as ws:
            worker = WsWorker(ws, report)
            while not queue.empty():
                plan = queue.get_nowait()
                try:
                    if plan.kind == "sse":
                        await do_sse(http, url, plan, report)
                    elif plan.kind == "json":
                        await do_json(http, url, plan, report)
                    else:
                        await worker.run(plan)
                except Exception as exc:  # a transport failure is a lost request, reported
                    report.lost.append(f"#{plan.index} {plan.kind}: {type(exc).__name__}: {exc}")
                done += 1
                if sample_rss and done % sample_every == 0:
                    report.rss_mb.append((done, sample_rss()))
            worker.reader.cancel()

    await asyncio.gather(*(client(n) for n in range(clients)))
    report.elapsed_s = time.monotonic() - started
    return report


def rss_of(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def serve(port: int, output_dir: str, step_ms: float, finished_cache: int | None = None) -> None:
    """The child process: the real app over fake generator and upscaler. ``finished_cache``
    shrinks the engine's bounded cache of finished job records (default 10,000), to show that RSS
    growth over a long run is that cache filling up, not a leak."""
    sys.path.insert(0, str(REPO))
    import functools

    import uvicorn

    from server import app as app_module
    from server.app import create_app

    if finished_cache is not None:
        app_module.EngineConfig = functools.partial(app_module.EngineConfig, finished_cache_size=finished_cache)
    from server.config import Settings
    from server.testing.fakes import FakeGenerator, FakeUpscaler

    settings = Settings(output_dir=Path(output_dir), model="tiny-z-image", max_queue=512, max_queue_per_client=512,
                        log_level="WARNING")
    app = create_app(settings, generator=FakeGenerator(step_s=step_ms / 1000), upscaler=FakeUpscaler(),
                     default_model="tiny-z-image")
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--step-ms", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the full report as JSON")
    parser.add_argument("--finished-cache", type=int, help="the server's cache of finished job records "
                        "(default 10000): a small one shows where RSS levels off")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.output_dir, args.step_ms, args.finished_cache)
        return 0
    sys.path.insert(0, str(REPO))
    from tests.conftest import free_port

    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        extra = ["--finished-cache", str(args.finished_cache)] if args.finished_cache else []
        child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--output-dir", out,
                                  "--step-ms", str(args.step_ms), *extra], env={**os.environ, "HF_HUB_OFFLINE": "1"})
        try:
            url = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)  # the child is still starting
            report = asyncio.run(run_load(url, f"ws://127.0.0.1:{port}", args.requests, args.clients, args.seed,
                                          sample_rss=lambda: round(rss_of(child.pid), 1),
                                          sample_every=max(1, args.requests // 20)))
            health = httpx.get(url + "/health", timeout=5).json()
        finally:
            child.terminate()
            child.wait(30)
    summary = report.summary()
    summary["server_jobs_after"] = health["jobs"]
    if not args.json:
        summary.pop("rss_samples")
    print(json.dumps(summary, indent=2))
    return 0 if report.ok and not health["jobs"] else 1


if __name__ == "__main__":
    sys.exit(main())
