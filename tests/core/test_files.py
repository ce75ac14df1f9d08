"""Output file names that cannot collide, and writes that never replace a file (issue 15, item 4)."""

from __future__ import annotations

import hashlib
import io

import httpx
import pytest
from PIL import Image

import server.core.engine as engine_module
from conftest import live
from server.core import files

# Two job ids that share their first 8 hex digits (what file names carried before), as a birthday
# search over seeds finds in seconds.
ID_A = "deadbeef" + "1" * 56
ID_B = "deadbeef" + "2" * 56


def test_names_of_ids_sharing_a_short_prefix_differ():
    # Prompts without ASCII letters all get the slug "image": only the id tells them apart.
    a = files.output_filename("🌸", ID_A, 0, 1, when=0)
    b = files.output_filename("🌊", ID_B, 0, 1, when=0)
    assert a != b
    assert a.endswith(f"-image-{ID_A[:32]}.png") and b.endswith(f"-image-{ID_B[:32]}.png")
    assert files.output_filename("x", ID_A, 1, 2, upscaled=True, when=0).endswith(f"-{ID_A[:32]}-1-upscaled.png")
    assert files.SAFE_NAME.match(files.output_filename("a" * 4000, ID_A, 3, 4, upscaled=True))


def test_a_write_never_replaces_an_existing_file(tmp_path):
    files.write_atomic(tmp_path, "taken.png", b"first job's bytes")
    path = files.write_atomic(tmp_path, "taken.png", b"someone else's bytes")
    assert path == tmp_path / "taken.png"
    assert path.read_bytes() == b"first job's bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.png"]  # no temp file left behind
    files.write_atomic(tmp_path, "new.png", b"new")
    assert (tmp_path / "new.png").read_bytes() == b"new"


def test_a_name_taken_by_a_directory_fails_the_write_and_leaves_no_temp_file(tmp_path):
    (tmp_path / "dir.png").mkdir()
    with pytest.raises(FileExistsError):
        files.write_atomic(tmp_path, "dir.png", b"x")
    assert (tmp_path / "dir.png").is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["dir.png"]


def _forced_prefix(spec, owner):
    """Every job id starts with the same 8 hex digits; the rest stays unique per spec."""
    return "deadbeef" + hashlib.sha256(f"{owner}:{spec.job_id}".encode()).hexdigest()[8:]


def _pixel(server, url: str) -> tuple:
    body = httpx.get(url, timeout=10).content
    with Image.open(io.BytesIO(body)) as image:
        return image.convert("RGB").getpixel((0, 0))


def test_two_jobs_sharing_an_id_prefix_keep_their_own_images(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "scoped_job_id", _forced_prefix)
    with live(tmp_path) as server:
        def generate(prompt: str, seed: int) -> dict:
            reply = httpx.post(server.url + "/v1/images/generations", timeout=30, json={
                "prompt": prompt, "size": "64x64", "seed": seed, "num_inference_steps": 2,
                "response_format": "url", "upscale": True})
            assert reply.status_code == 200, reply.text
            return reply.json()["data"][0]

        a = generate("🌸", 1)
        b = generate("🌊", 2)
        assert a["url"] != b["url"] and a["upscaled_url"] != b["upscaled_url"]
        assert a["url"].rsplit("-", 1)[-1].startswith("deadbeef")  # the prefix really was shared
        colour_a, colour_b = _pixel(server, a["url"]), _pixel(server, b["url"])
        assert colour_a != colour_b
        assert _pixel(server, a["upscaled_url"]) == colour_a and _pixel(server, b["upscaled_url"]) == colour_b
        again = generate("🌸", 1)  # A's repeat, answered from the cache, still has A's pixels
        assert again["url"] == a["url"] and _pixel(server, again["url"]) == colour_a
        names = sorted(p.name for p in (tmp_path / "outputs").glob("*.png"))
        assert len(names) == 4 and not any(p.name.startswith(".tmp-") for p in (tmp_path / "outputs").iterdir())
