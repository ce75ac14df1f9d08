"""``python -m server``: starts, answers /health; a model it cannot load ends it with one line."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.conftest import REPO, SHARED_CACHE, ServerProcess


def test_tiny_model_starts_and_health_names_it(tmp_path):
    with ServerProcess("--model", "tiny-z-image", "--output-dir", str(tmp_path / "out"),
                       "--cache-dir", str(SHARED_CACHE)) as server:
        health = httpx.get(server.url + "/health").json()
        assert health["model"] == "tiny-z-image"
        assert health["demo_model"] is True
        assert httpx.get(server.url + "/api/health").json() == {"status": "ok"}


def test_unavailable_real_model_exits_with_a_one_line_remedy(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "SDNQ_USE_TORCH_COMPILE": "0"}
    done = subprocess.run([sys.executable, "-m", "server", "--model", "z-image-turbo", "--output-dir", str(tmp_path / "o")],
                          cwd=REPO, env={**__import__("os").environ, **env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr[-2000:]
    assert "Disty0/Z-Image-Turbo-SDNQ-uint4-svd-r32" in lines[0]
    assert "--model tiny-z-image" in lines[0]
    assert "Traceback" not in done.stderr
