"""Routes beside the protocols (server/routes_misc.py): image files and health."""

from __future__ import annotations

import json

from tests.conftest import http_get

TRAVERSALS = [
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252fetc%252fpasswd",
    "%2Fetc%2Fpasswd",
    "..%5C..%5Cetc%5Cpasswd",
    "..\\..\\etc\\passwd",
    "jobs.sqlite3",
    "jobs.sqlite3-wal",
    "escape.png",
    "missing.png",
]


def test_image_route_refuses_traversal(fake_server, tmp_path):
    outputs = fake_server.app.state.settings.output_dir
    outside = tmp_path / "secret.png"
    outside.write_bytes(b"\x89PNG not yours")
    (outputs / "escape.png").symlink_to(outside)
    for name in TRAVERSALS:
        status, _, data = http_get(fake_server, f"/api/image/{name}")
        assert status == 404, (name, status)
        assert b"not yours" not in data and b"root:" not in data and b"SQLite" not in data


def test_health(fake_server):
    status, headers, data = http_get(fake_server, "/api/health")
    assert status == 200 and json.loads(data) == {"status": "ok"}
