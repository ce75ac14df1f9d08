"""``python -m server`` on a damaged job database or a full disk: exit code 2 and one line that names
the file, the problem and the remedy; never a traceback, and the damaged file is left as it was
(issue 15, item 7)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, SHARED_CACHE, ServerProcess, tmpfs


def start(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SDNQ_USE_TORCH_COMPILE": "0"}
    return subprocess.run([sys.executable, "-m", "server", "--model", "tiny-z-image", "--output-dir", str(out),
                           "--cache-dir", str(SHARED_CACHE), "--port", "1"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, done.stderr[-2000:]
    return lines[0]


def filled_database(path: Path, rows: int = 400) -> None:
    """A real job database (the server's own schema) with enough rows to span many pages."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE jobs (job_id TEXT PRIMARY KEY, spec TEXT NOT NULL, status TEXT NOT NULL,"
                 " created_at REAL NOT NULL, updated_at REAL NOT NULL, result TEXT, error TEXT, owner TEXT,"
                 " attempt INTEGER NOT NULL DEFAULT 1, failure TEXT)")
    conn.executemany("INSERT INTO jobs (job_id, spec, status, created_at, updated_at) VALUES (?,?,?,?,?)",
                     [(f"{i:064x}", "{}" + " " * 500, "completed", i, i) for i in range(rows)])
    conn.close()


def damage_garbage(db: Path) -> None:
    db.write_bytes(bytes(range(256)) * 64)


def damage_truncated(db: Path) -> None:
    filled_database(db)
    with db.open("r+b") as handle:
        handle.truncate(db.stat().st_size // 2)


def damage_directory(db: Path) -> None:
    db.mkdir()
    (db / "something").write_text("x")


@pytest.mark.parametrize("damage, problem", [(damage_garbage, "is damaged (file is not a database)"),
                                             (damage_truncated, "is damaged (database disk image is malformed)"),
                                             (damage_directory, "is a directory, not a file")],
                         ids=["garbage", "truncated", "directory"])
def test_a_damaged_job_database_ends_startup_with_one_line(tmp_path, damage, problem):
    out = tmp_path / "out"
    out.mkdir()
    db = out / "jobs.sqlite3"
    damage(db)
    before = sorted(p.name for p in out.iterdir())
    snapshot = db.read_bytes() if db.is_file() else None
    line = one_error_line(start(out))
    assert f"the job database {db} {problem}" in line
    assert f"move it aside (mv {db} {db}.broken)" in line and "empty job list" in line
    assert sorted(p.name for p in out.iterdir()) == before  # nothing created beside it
    if snapshot is not None:
        assert db.read_bytes() == snapshot  # the damaged file is left exactly as it was


def test_moving_the_damaged_database_aside_starts_fresh(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    db = out / "jobs.sqlite3"
    damage_garbage(db)
    one_error_line(start(out))
    db.rename(db.with_name("jobs.sqlite3.broken"))
    server = ServerProcess("--fake-step-s", "0", "--output-dir", str(out), "--cache-dir", str(SHARED_CACHE))
    server.args[2] = "server.testing.serve"  # the same entry point over the fake generator
    with server:
        reply = httpx.post(server.url + "/v1/images/generations", timeout=30,
                           json={"prompt": "fresh start", "size": "64x64", "num_inference_steps": 1})
        assert reply.status_code == 200, reply.text


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only): ENOSPC from the kernel, as on a real full disk."""
    with tmpfs(tmp_path, "2m") as mount:
        yield mount


def fill(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == 28  # ENOSPC: the disk is full now
    finally:
        os.close(fd)


@pytest.mark.parametrize("existing", [True, False], ids=["existing-database", "new-database"])
def test_a_full_disk_ends_startup_with_one_line(small_disk, existing):
    out = small_disk / "out"
    out.mkdir()
    db = out / "jobs.sqlite3"
    if existing:
        filled_database(db, rows=50)
    fill(small_disk)
    line = one_error_line(start(out))
    assert line == f"error: cannot write the job database {db}: the disk is full; free space on that disk and start again"
