"""Shared fixtures: settings in a temp dir, and a real uvicorn server on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

from server.app import NO_UPSCALER, create_app  # noqa: E402
from server.config import Settings  # noqa: E402
from server.testing.fakes import FakeGenerator, FakeUpscaler  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED_CACHE = REPO / ".cache"  # tiny models and converted weights are built once per checkout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A real uvicorn server in a background thread; ``url`` is ready when the context is entered."""

    def __init__(self, app, port: int | None = None):
        self.app = app
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", ws_max_size=2**21)
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's loop, once it runs
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve()

        asyncio.run(serve())

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        for _ in range(3000):
            if self.server.started:
                return self
            if not self.thread.is_alive():
                raise RuntimeError("server failed to start")
            self.thread.join(0.01)
        raise RuntimeError("server did not start within 30 s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)

    @property
    def engine(self):
        return self.app.state.engine

    def call(self, coro):
        """Run a coroutine on the server's event loop (for inspecting engine state)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)


def finished_by_status(metrics) -> dict[str, int]:
    """``t2i_jobs_finished`` per status, read through the Prometheus registry."""
    return {sample.labels["status"]: int(sample.value)
            for family in metrics.registry.collect() if family.name == "t2i_jobs_finished"
            for sample in family.samples if sample.name == "t2i_jobs_finished_total"}


@contextlib.contextmanager
def tmpfs(tmp_path: Path, size: str):
    """A tmpfs of ``size`` (e.g. "2m") under ``tmp_path``: a real ENOSPC from the kernel on the real
    write path. Root only: skips the test where it cannot be mounted."""
    import shutil
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode()[:100]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def wait_until(predicate, timeout: float = 15.0) -> bool:
    """Poll ``predicate`` at 20 Hz for server-side state that has no event to wait on."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        threading.Event().wait(0.05)
    return True


def make_settings(tmp_path: Path, **overrides) -> Settings:
    values = dict(output_dir=tmp_path / "outputs", cache_dir=SHARED_CACHE, model="tiny-z-image",
                  shutdown_grace_s=5.0)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path)


@contextlib.contextmanager
def live(tmp_path, generator=None, upscaler=None, **settings):
    """A LiveServer over a FakeGenerator (10 ms steps unless given) and a FakeUpscaler."""
    generator = generator or FakeGenerator(step_s=0.01)
    app = create_app(make_settings(tmp_path, **settings), generator=generator,
                     upscaler=upscaler or FakeUpscaler(), default_model="tiny-z-image")
    with LiveServer(app) as server:
        server.generator = generator
        yield server


def run_async(coro, limit: float = 60.0):
    """Run one async test body with an overall time limit."""
    async def limited():
        async with asyncio.timeout(limit):
            return await coro
    return asyncio.run(limited())


async def terminal_record(engine, job_id: str, timeout: float = 10.0):
    """The job's final record, waited for on the engine's own events (not on a clock)."""
    subscriber = engine.subscribe(await engine.get(job_id))
    try:
        while True:
            event = await subscriber.get(timeout=timeout)
            if event.is_terminal:
                return event.record
    finally:
        subscriber.close()


@pytest.fixture
def fake_server(tmp_path):
    """A live server over a FakeGenerator (fast, deterministic) and a FakeUpscaler."""
    with live(tmp_path) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory):
    """A live server over the real diffusers path with the tiny Z-Image model, no upscaler."""
    tmp = tmp_path_factory.mktemp("tiny-server")
    app = create_app(make_settings(tmp), upscaler=NO_UPSCALER, default_model="tiny-z-image")
    with LiveServer(app) as server:
        yield server


class ServerProcess:
    """``python -m server ...`` as a real child process on a free port; ready when /health answers."""

    def __init__(self, *args: str, env: dict | None = None, port: int | None = None, popen=None):
        """``popen``: a stand-in for ``subprocess.Popen`` (e.g. with resource limits for the child)."""
        import subprocess
        import sys

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDNQ_USE_TORCH_COMPILE": "0", **(env or {})}
        self._popen = popen or subprocess.Popen
        self.proc = None

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        import subprocess
        import time

        import httpx

        import tempfile

        # A file, not a pipe: a chatty server must never block on a full pipe nobody reads.
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = self._popen(self.args, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                threading.Event().wait(0.1)  # not listening yet: poll the port at 10 Hz
        raise RuntimeError("server did not become healthy in time")

    def output(self) -> str:
        with open(self.log.name) as handle:
            return handle.read()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def http_get(server, raw_path: str) -> tuple[int, dict, bytes]:
    """GET with the path sent byte for byte (no client-side normalization of dots or escapes)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10.0)
    try:
        conn.request("GET", raw_path)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()
