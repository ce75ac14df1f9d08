"""Issue 16 probes against a real server process (FakeGenerator), for RELIABILITY.md figures.

    python bench/abuse_probe.py half-open --count 800 --wait 45      # connections left open
    python bench/abuse_probe.py client-ids --ids 5 --per-id 13       # jobs one address can queue
    python bench/abuse_probe.py create-cancel --pairs 10000          # job database after create/cancel
    python bench/abuse_probe.py non-reading --count 40 --wait 45     # server RSS, clients of a 16 MB answer
    python bench/abuse_probe.py reencode --count 6                   # CPU of lossless webp re-encodes
    python bench/abuse_probe.py padded --count 50 --junk 32000       # RSS of waiting requests padded with {}
    python bench/abuse_probe.py ... --repo /path/to/other/checkout   # the same probe, another version
    python bench/abuse_probe.py ... --flags="--retention-unstarted-s 5" # extra server flags

Loopback only. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARTIAL = b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(repo: Path, port: int, out: str, *flags: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(repo)}
    proc = subprocess.Popen([sys.executable, "-m", "server.testing.serve", "--host", "127.0.0.1", "--port", str(port),
                             "--output-dir", out, "--cache-dir", str(REPO / ".cache"), "--log-level", "WARNING", *flags],
                            cwd=repo, env=env, stdout=subprocess.DEVNULL,
                            stderr=open(Path(out) / "server.log", "w"))  # noqa: SIM115 (lives with the process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("server did not start")


def still_open(sock: socket.socket) -> bool:
    """False once the server closed it (after an answer such as a 408, or none)."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
        return False  # end of stream
    except BlockingIOError:
        return True
    except OSError:
        return False


def half_open(port: int, count: int, wait: float) -> dict:
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(PARTIAL)
        socks.append(sock)
    time.sleep(wait)  # a probe of wall-clock behaviour: the figure *is* what is left after this long
    left = sum(1 for s in socks if still_open(s))
    for s in socks:
        s.close()
    return {"probe": "half-open", "count": count, "wait_s": wait, "still_open": left}


async def client_ids(port: int, ids: int, per_id: int) -> dict:
    from websockets.asyncio.client import connect

    accepted = refused = 0
    for i in range(ids):
        async with connect(f"ws://127.0.0.1:{port}/api/ws?client_id=made-up-{i}") as ws:
            for j in range(per_id):
                await ws.send(json.dumps({"type": "create_job", "request_id": j, "params": {
                    "prompt": f"probe {i} {j}", "width": 64, "height": 64, "steps": 100, "upscale": True}}))
                while True:
                    reply = json.loads(await ws.recv())
                    if reply.get("request_id") == j:
                        break
                accepted += reply["type"] == "job_status"
                refused += reply["type"] == "error"
    return {"probe": "client-ids", "ids": ids, "per_id": per_id, "accepted": accepted, "refused": refused}


async def create_cancel(port: int, pairs: int, db: Path, settle_s: float) -> dict:
    """``pairs`` x (create_job with a 4000-character prompt, cancel_job while pending) from one
    socket while one job holds the GPU; the database's size and rows at the end and ``settle_s``
    later (a retention run)."""
    import sqlite3

    from websockets.asyncio.client import connect

    def db_state() -> dict:
        size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*"))
        with sqlite3.connect(db) as conn:
            return {"bytes": size, "jobs": conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0],
                    "links": conn.execute("SELECT COUNT(*) FROM client_jobs").fetchone()[0]}

    started = time.monotonic()
    async with connect(f"ws://127.0.0.1:{port}/api/ws?client_id=churn", max_size=2**24) as ws:
        async def call(message: dict) -> dict:
            await ws.send(json.dumps(message))
            while True:
                reply = json.loads(await ws.recv())
                if reply.get("request_id") == message["request_id"]:
                    return reply

        params = {"width": 64, "height": 64, "steps": 100, "upscale": False}
        await call({"type": "create_job", "request_id": "hold", "params": {"prompt": "hold", **params}})
        for i in range(pairs):
            created = await call({"type": "create_job", "request_id": f"c{i}",
                                  "params": {"prompt": "x" * 4000, "seed": i, **params}})
            await call({"type": "cancel_job", "request_id": f"x{i}", "job_id": created["job_id"]})
        elapsed = time.monotonic() - started
        at_end = db_state()
        time.sleep(settle_s)  # the figure is what a retention run leaves after this long
        return {"probe": "create-cancel", "pairs": pairs, "seconds": round(elapsed, 1),
                "pairs_per_s": round(pairs / elapsed), "at_end": at_end, "after_settle": db_state(),
                "settle_s": settle_s}


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return -1.0


def non_reading(port: int, pid: int, count: int, wait: float) -> dict:
    """``count`` clients ask for one cached 4 x 1024^2 noise answer (~16 MB of base64) and read
    nothing; the server's RSS before, at its peak, and ``wait`` s later; connections it dropped."""
    import urllib.request

    body = json.dumps({"prompt": "large answer", "size": "1024x1024", "n": 4, "seed": 5,
                       "num_inference_steps": 1, "upscale": False}).encode()
    warm = urllib.request.Request(f"http://127.0.0.1:{port}/v1/images/generations", data=body,
                                  headers={"Content-Type": "application/json"})
    answer_bytes = len(urllib.request.urlopen(warm, timeout=300).read())
    before = rss_mb(pid)
    request = (b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    socks, peak = [], before
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(request)
        socks.append(sock)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        peak = max(peak, rss_mb(pid))
        time.sleep(0.5)  # sampling RSS over the wait: the figure is the curve, not an event
    after = rss_mb(pid)
    dropped = sum(1 for s in socks if not still_open(s))
    for s in socks:
        s.close()
    return {"probe": "non-reading", "clients": count, "answer_bytes": answer_bytes, "rss_before_mb": before,
            "rss_peak_mb": peak, "rss_after_wait_mb": after, "wait_s": wait, "dropped_by_server": dropped}


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reencode(port: int, pid: int, count: int) -> dict:
    """``count`` concurrent resumes of a finished 4 x 1024^2 job as lossless webp; the server's CPU
    seconds for them and the latency of an unrelated small request sent meanwhile."""
    import threading
    import urllib.request

    base = f"http://127.0.0.1:{port}"

    def post(body: dict) -> bytes:
        request = urllib.request.Request(base + "/v1/images/generations", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        return urllib.request.urlopen(request, timeout=600).read()

    big = json.loads(post({"prompt": "large answer", "size": "1024x1024", "n": 4, "seed": 5,
                           "num_inference_steps": 1, "upscale": False}))
    small = {"prompt": "small", "size": "64x64", "seed": 1, "num_inference_steps": 1, "upscale": False}
    post(small)

    def timed_small() -> float:
        started = time.monotonic()
        post(small)
        return time.monotonic() - started

    idle = min(timed_small() for _ in range(3))
    url = f"{base}/v1/images/jobs/{big['job_id']}/events?output_format=webp&output_compression=100"
    cpu_before, started = cpu_s(pid), time.monotonic()
    threads = [threading.Thread(target=lambda: urllib.request.urlopen(url, timeout=600).read()) for _ in range(count)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)  # let the re-encodes begin: the figure is a request's latency *during* them
    busy = timed_small()
    for thread in threads:
        thread.join()
    return {"probe": "reencode", "concurrent_gets": count, "server_cpu_s": round(cpu_s(pid) - cpu_before, 1),
            "wall_s": round(time.monotonic() - started, 1), "small_request_idle_s": round(idle, 3),
            "small_request_during_s": round(busy, 3)}


def padded(port: int, pid: int, count: int, junk: int, wait: float) -> dict:
    """``count`` identical requests for a slow job, each padded with ``junk`` empty objects in an
    ignored field, left waiting; the server's RSS before and ``wait`` s later."""
    body = json.dumps({"prompt": "p", "size": "64x64", "seed": 1, "num_inference_steps": 100,
                       "junk": [{}] * junk}).encode()
    request = (b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    before = rss_mb(pid)
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port))
        try:
            sock.sendall(request)
        except OSError:
            pass  # refused (413) while still sending
        socks.append(sock)
    time.sleep(wait)  # the figure is the RSS while they wait
    after = rss_mb(pid)
    for sock in socks:
        sock.close()
    return {"probe": "padded", "requests": count, "body_bytes": len(body), "rss_before_mb": before,
            "rss_waiting_mb": after, "wait_s": wait}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("probe", choices=["half-open", "client-ids", "create-cancel", "non-reading", "reencode", "padded"])
    parser.add_argument("--repo", type=Path, default=REPO)
    parser.add_argument("--count", type=int, default=800)
    parser.add_argument("--wait", type=float, default=45.0)
    parser.add_argument("--ids", type=int, default=5)
    parser.add_argument("--per-id", type=int, default=13)
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--junk", type=int, default=32_000)
    parser.add_argument("--settle", type=float, default=10.0)
    parser.add_argument("--flags", default="", help="extra server flags, space-separated")
    args = parser.parse_args()
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        noise = ["--fake-noise"] if args.probe in ("non-reading", "reencode") else []
        proc = start(args.repo, port, out, "--fake-step-s", "0" if noise else "1", *noise, "--max-queue", "100000",
                     "--max-queue-per-client", "100000", *args.flags.split())
        try:
            if args.probe == "half-open":
                result = half_open(port, args.count, args.wait)
            elif args.probe == "padded":
                result = padded(port, proc.pid, args.count, args.junk, min(args.wait, 8.0))
            elif args.probe == "reencode":
                result = reencode(port, proc.pid, args.count)
            elif args.probe == "non-reading":
                result = non_reading(port, proc.pid, args.count, args.wait)
            elif args.probe == "create-cancel":
                result = asyncio.run(create_cancel(port, args.pairs, Path(out) / "jobs.sqlite3", args.settle))
            else:
                result = asyncio.run(client_ids(port, args.ids, args.per_id))
        finally:
            proc.kill()
            proc.wait()
            log_text = (Path(out) / "server.log").read_text()
            result_log = {"aborted_in_log": log_text.count("aborted a response")}
    print(json.dumps({**result, **result_log, "repo": str(args.repo)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
