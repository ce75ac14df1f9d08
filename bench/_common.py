"""Shared pieces of the benchmarks: machine facts, percentiles, result files, servers, a raw SSE client.

The raw SSE client (``sse_post``) speaks HTTP/1.1 over an asyncio socket through h11 and stamps
every received chunk with ``time.time()`` the moment ``read`` returns, so an event's receive time is
when its last byte reached the client socket, not when a higher-level client got round to parsing it.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import h11
import httpx

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CACHE = REPO / ".cache"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


# -- numbers -------------------------------------------------------------------------------------

def pct(values, q: float) -> float:
    """The q-th percentile (0-100), nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * len(ordered) + 0.5)) - 1))
    return ordered[index]


def med(values) -> float:
    return statistics.median(values) if values else float("nan")


def r(value: float, digits: int = 3) -> float:
    return round(float(value), digits)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- machine and results ---------------------------------------------------------------------------

def machine() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "loadavg_at_start": os.getloadavg()}
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["ram_gb"] = round(int(mem) / 1e6, 1)
    except (OSError, IndexError, ValueError):
        pass
    return info


def save(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"benchmark": name, "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_at_end": os.getloadavg(), **data}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    print(json.dumps(data, indent=2))
    return path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- servers -------------------------------------------------------------------------------------

class ServerProc:
    """A server in a child process, ready when /health answers. ``args`` go to the launcher."""

    def __init__(self, *args: str, module: bool = False, launcher: tuple[str, ...] = ("-m", "server")):
        """``module``: the real entrypoint, ``launcher`` (e.g. ``-m server.testing.serve --fake-step-s 0.05``:
        the same entry over the FakeGenerator)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.tmp = tempfile.TemporaryDirectory(prefix="t2i-bench-")
        out = str(Path(self.tmp.name) / "outputs")
        if module:  # the real entrypoint
            base = [sys.executable, *launcher, "--cache-dir", str(CACHE), "--output-dir", out]
        else:  # bench/_server.py: a FakeGenerator and /_bench routes
            base = [sys.executable, str(REPO / "bench" / "_server.py"), "--output-dir", out]
        self.args = [*base, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ServerProc":
        self.log = open(Path(self.tmp.name) / "server.log", "w+")
        self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "T2I_LOG_LEVEL": "WARNING"})
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.log.close()
        self.tmp.cleanup()


class ThreadServer:
    """uvicorn in a thread of this process (for comparisons with in-process calls)."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "ThreadServer":
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


# -- a raw, timestamping SSE client --------------------------------------------------------------

@dataclass
class SSEResult:
    sent_at: float = 0.0
    headers_at: float = 0.0
    first_body_at: float = 0.0  # the first body bytes (an SSE comment or event) after the headers
    status: int = 0
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (received_at, event name, data)
    done_at: float = 0.0
    tail: str = ""  # body text after the last complete event (a non-SSE body: all of it)

    def data(self) -> list[tuple[float, dict]]:
        return [(t, json.loads(d)) for t, _, d in self.events if d and d != "[DONE]"]


async def sse_post(host: str, port: int, path: str, body: dict, *, until_headers: bool = False,
                   until_first_body: bool = False, stop_after_first_event: bool = False) -> SSEResult:
    """POST ``body`` and read the SSE response to its end, stamping each event with its arrival time."""
    payload = json.dumps(body).encode()
    conn = h11.Connection(h11.CLIENT)
    reader, writer = await asyncio.open_connection(host, port)
    result = SSEResult()
    try:
        request = h11.Request(method="POST", target=path, headers=[
            ("Host", f"{host}:{port}"), ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"), ("Content-Length", str(len(payload)))])
        result.sent_at = time.time()
        writer.write(conn.send(request) + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
        pieces: list[str] = []
        now = time.time()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await reader.read(1 << 20)
                now = time.time()
                conn.receive_data(chunk)
                if not chunk:
                    break
                continue
            if isinstance(event, h11.Response):
                result.headers_at, result.status = now, event.status_code
                if until_headers:
                    break
            elif isinstance(event, h11.Data):
                result.first_body_at = result.first_body_at or now
                if until_first_body:
                    break
                text = event.data.decode()
                boundary = "\n\n" in text or (pieces and pieces[-1].endswith("\n") and text.startswith("\n"))
                pieces.append(text)
                if not boundary:  # most chunks of a big event: no join, no scan of the whole event
                    continue
                buffer = "".join(pieces)
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    name, data = "", []
                    for line in block.split("\n"):
                        if line.startswith("data:"):
                            data.append(line[5:].lstrip(" "))
                        elif line.startswith("event:"):
                            name = line[6:].strip()
                    if data or name:
                        result.events.append((now, name, "\n".join(data)))
                pieces = [buffer] if buffer else []
                if stop_after_first_event and result.events:
                    break
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
        result.tail = "".join(pieces)
        result.done_at = time.time()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
    return result


class LagProbe:
    """Event-loop lag of the loop it runs on: a ``tick_s`` ticker records how late each wake-up is."""

    def __init__(self, tick_s: float = 0.005):
        self.tick_s = tick_s
        self.lags_ms: list[float] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self.lags_ms = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:  # perf_counter, not loop.time(): uvloop's clock has 1 ms steps
            tick = time.perf_counter()
            await asyncio.sleep(self.tick_s)
            self.lags_ms.append(max(0.0, (time.perf_counter() - tick - self.tick_s) * 1000))

    def stop(self) -> dict:
        if self._task is not None:
            self._task.cancel()
        lags = self.lags_ms
        return {"samples": len(lags), "p50_ms": r(pct(lags, 50), 2), "p99_ms": r(pct(lags, 99), 2),
                "max_ms": r(max(lags) if lags else float("nan"), 2)}
