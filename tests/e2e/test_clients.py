"""The command-line clients as a person runs them: client_example.py and test_streaming.py as
real subprocesses against real servers (an in-process uvicorn, or one the tool spawns itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.conftest import REPO


def run_tool(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_client_example_streams_previews_then_final(fake_server, tmp_path):
    out = tmp_path / "shots"
    proc = run_tool("client_example.py", "a lighthouse", "--stream", "--out", str(out), "--url", fake_server.url,
                    "--steps", "10", "--size", "64x96", "--seed", "7")
    assert proc.returncode == 0, proc.stderr
    previews = sorted(out.glob("preview_0_*.png"))
    assert len(previews) == 10  # 10 steps: a preview every step
    assert len({p.read_bytes() for p in previews}) >= 2, "previews must show the image developing"
    final = Image.open(out / "final_0.png")
    assert final.size == (64, 96)
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 11 and lines[0].startswith("step   1/10") and lines[-1].startswith("final")


def test_client_example_batch_and_error(fake_server, tmp_path):
    proc = run_tool("client_example.py", "a lighthouse", "--out", str(tmp_path), "--url", fake_server.url,
                    "--steps", "3", "--size", "64x64")
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob("preview_*")) and Image.open(tmp_path / "final_0.png").size == (64, 64)
    bad = run_tool("client_example.py", "a lighthouse", "--stream", "--out", str(tmp_path), "--url", fake_server.url,
                   "--size", "1000x64")
    assert bad.returncode == 1 and "status 400" in bad.stderr and "1000" in bad.stderr


def test_client_example_websocket_job_with_upscale(fake_server, tmp_path):
    proc = run_tool("client_example.py", "a lighthouse", "--ws", "--upscale", "--out", str(tmp_path),
                    "--url", fake_server.url, "--steps", "4", "--size", "64x64", "--seed", "11")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    statuses = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("status")]
    assert statuses[0] == "pending" and statuses[-1] == "completed"
    assert any(line.startswith("progress") for line in proc.stdout.splitlines())
    assert Image.open(tmp_path / "final_0.png").size == (64, 64)
    assert Image.open(tmp_path / "final_0_x4.png").size == (256, 256)


def test_measuring_tool_spawns_tiny_server_and_sees_streaming():
    proc = run_tool("test_streaming.py", "--spawn", "--json", "--steps", "10", "--size", "128x128",
                    "--concurrent", "2", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["ok"] is True and summary["updates_before_completion"] is True
    assert summary["steps_received"] == 10 and summary["finals_received"] == 1
    assert 0 < summary["time_to_first_preview_s"] < summary["time_to_final_s"] <= summary["total_time_s"]
    assert summary["batch_total_time_s"] > 0
    conc = summary["concurrent"]
    assert conc["streams"] == 2 and conc["all_updates_before_completion"] is True
    assert all(s["steps_received"] == 10 for s in conc["per_stream"])
    assert "step 1/10" in proc.stdout  # the per-step timing table


def test_measuring_tool_exits_2_when_server_unreachable(tmp_path):
    from tests.conftest import free_port

    proc = run_tool("test_streaming.py", "--url", f"http://127.0.0.1:{free_port()}", "--no-warmup", timeout=60)
    assert proc.returncode == 2 and "error" in proc.stderr


def stub_checkout(tmp_path: Path) -> Path:
    """A copy of start_server.sh beside stub install script and python that record their calls."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / ".venv" / "bin").mkdir(parents=True)
    (root / "start_server.sh").write_bytes((REPO / "start_server.sh").read_bytes())
    (root / "scripts" / "install.sh").write_text('#!/usr/bin/env bash\necho install-ran >> "$(dirname "$0")/../calls"\n')
    (root / ".venv" / "bin" / "python").write_text(
        '#!/usr/bin/env bash\necho "python $* T2I_MODEL=${T2I_MODEL:-}" >> "$(dirname "$0")/../../calls"\n')
    for script in ("start_server.sh", "scripts/install.sh", ".venv/bin/python"):
        (root / script).chmod(0o755)
    return root


def test_start_server_installs_then_execs_the_server_with_flags(tmp_path):
    import os

    root = stub_checkout(tmp_path)
    env = {**os.environ, "T2I_PORT": "9100", "T2I_MODEL": "tiny-z-image"}
    env.pop("T2I_HOST", None)
    proc = subprocess.run(["bash", str(root / "start_server.sh"), "--host", "0.0.0.0"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "open http://127.0.0.1:9100/ui" in proc.stdout
    calls = (root / "calls").read_text().splitlines()
    assert calls == ["install-ran", "python -m server --host 0.0.0.0 T2I_MODEL=tiny-z-image"]

    proc = subprocess.run(["bash", str(root / "start_server.sh"), "--port=8123"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert "open http://127.0.0.1:8123/ui" in proc.stdout


def test_client_example_sends_the_api_key(tmp_path):
    from server.app import create_app
    from server.testing.fakes import FakeGenerator, FakeUpscaler
    from tests.conftest import LiveServer, make_settings

    app = create_app(make_settings(tmp_path, api_keys=["sesame"]), generator=FakeGenerator(), upscaler=FakeUpscaler(),
                     default_model="tiny-z-image")
    common = ("--out", str(tmp_path / "o"), "--steps", "2", "--size", "64x64", "--seed", "3")
    with LiveServer(app) as server:
        refused = run_tool("client_example.py", "x", "--stream", "--url", server.url, *common)
        assert refused.returncode == 1 and "status 401" in refused.stderr
        refused_ws = run_tool("client_example.py", "x", "--ws", "--url", server.url, *common)
        assert refused_ws.returncode == 1 and "API key" in refused_ws.stderr
        for mode in ("--stream", "--ws"):
            ok = run_tool("client_example.py", "x", mode, "--url", server.url, "--api-key", "sesame", *common)
            assert ok.returncode == 0, ok.stderr
