"""Edit inputs in the job core: bounded decoding, pixel hashes in the spec, content-addressed storage."""

from __future__ import annotations

import io
import os
import zlib
import struct

import pytest
from PIL import Image

from server.core import inputs
from server.core.errors import InvalidRequest
from server.core.generation import steps_run
from server.core.profiles import get_profile
from server.core.spec import TASK_IMAGE_TO_IMAGE, Limits, SpecInput, normalize

ZIMAGE, COGVIEW = get_profile("tiny-z-image"), get_profile("tiny-cogview4")


def encoded(image: Image.Image, fmt: str = "PNG") -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    buffer.seek(0)
    return buffer


def picture(colour=(10, 20, 30), size=(96, 64)) -> Image.Image:
    image = Image.new("RGB", size, colour)
    image.putpixel((3, 3), (255, 0, 0))
    return image


def alpha_mask(size=(96, 64), hole=(0, 0, 48, 64)) -> Image.Image:
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), hole)
    return mask


def edit_spec(**overrides):
    values = dict(prompt="a cat", model="tiny-z-image", seed=5, task_type=TASK_IMAGE_TO_IMAGE, image_sha="a" * 64)
    values.update(overrides)
    return normalize(SpecInput(**values), ZIMAGE, Limits())


def test_ingest_stores_each_input_once_under_its_pixel_hash(tmp_path):
    first = inputs.ingest(tmp_path, encoded(picture()), encoded(alpha_mask()), 10**6)
    # The same pixels in another PNG layout (RGBA, opaque) are the same input.
    again = inputs.ingest(tmp_path, encoded(picture().convert("RGBA")), None, 10**6)
    assert (first.width, first.height) == (96, 64)
    assert again.image_sha == first.image_sha and again.mask_sha is None
    stored = sorted(p.name for p in (tmp_path / "inputs").iterdir())
    assert stored == sorted({f"{first.image_sha}.png", f"{first.mask_sha}.png"})
    with Image.open(inputs.input_path(tmp_path, first.mask_sha)) as mask:
        assert mask.mode == "L"
        assert mask.getpixel((0, 0)) == 255 and mask.getpixel((95, 0)) == 0  # alpha 0 -> white = repaint
    other = inputs.ingest(tmp_path, encoded(picture((11, 20, 30))), None, 10**6)
    assert other.image_sha != first.image_sha


def test_bad_inputs_are_400_naming_the_param(tmp_path):
    png = encoded(picture()).getvalue()
    cases = {
        "not an image": (io.BytesIO(b"hello, world" * 10), "image"),
        "truncated": (io.BytesIO(png[: len(png) // 2]), "image"),
        "gif": (encoded(picture(), "GIF"), "image"),
    }
    for name, (source, param) in cases.items():
        with pytest.raises(InvalidRequest) as caught:
            inputs.ingest(tmp_path, source, None, 10**6)
        assert caught.value.param == param, name
    with pytest.raises(InvalidRequest, match="no alpha") as caught:
        inputs.ingest(tmp_path, encoded(picture()), encoded(picture()), 10**6)
    assert caught.value.param == "mask"
    with pytest.raises(InvalidRequest, match="48x64 but the image is 96x64") as caught:
        inputs.ingest(tmp_path, encoded(picture()), encoded(alpha_mask((48, 64))), 10**6)
    assert caught.value.param == "mask"
    assert not (tmp_path / "inputs").exists()  # nothing stored for a refused edit


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` with almost no data: decoding it fully
    would allocate width*height bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_pixel_bound_is_checked_before_decoding(tmp_path):
    # Under PIL's own bomb limit: refused by the server's bound from the header, before the
    # (here missing) pixel data is read - otherwise this would be reported as truncated.
    with pytest.raises(InvalidRequest, match="5000x5000: too many pixels") as caught:
        inputs.ingest(tmp_path, io.BytesIO(bomb_png(5000, 5000)), None, 10**6)
    assert caught.value.param == "image"
    with pytest.raises(InvalidRequest, match="too many pixels") as caught:  # beyond PIL's limit too
        inputs.ingest(tmp_path, io.BytesIO(bomb_png(50_000, 50_000)), None, 10**6)
    assert caught.value.param == "image"


def test_edit_inputs_are_part_of_the_job_id():
    base = edit_spec()
    assert edit_spec().job_id == base.job_id
    assert edit_spec(image_sha="b" * 64).job_id != base.job_id
    assert edit_spec(mask_sha="c" * 64).job_id != base.job_id
    assert edit_spec(strength=0.3).job_id != base.job_id
    text = normalize(SpecInput(prompt="a cat", model="tiny-z-image", seed=5), ZIMAGE, Limits())
    assert text.job_id != base.job_id
    # Text-to-image ids are what they were before edits existed: the unset edit fields stay out.
    assert "image_sha" not in text.job_id and text.strength is None
    before_edits = ("task_type", "model", "model_type", "prompt", "negative_prompt", "width", "height", "steps",
                    "guidance_scale", "seed", "n", "upscale", "preview_method", "preview_interval")
    legacy = {k: v for k, v in text.to_dict().items() if k in before_edits}
    import hashlib, json
    assert text.job_id == hashlib.sha256(json.dumps(legacy, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_strength_defaults_by_fidelity_and_mask_and_bounds():
    assert edit_spec().strength == 0.6
    assert edit_spec(input_fidelity="high").strength == 0.4
    assert edit_spec(input_fidelity="low").strength == 0.8
    assert edit_spec(mask_sha="c" * 64).strength == 1.0
    assert edit_spec(strength=0.25).strength == 0.25
    for bad in (0, -0.1, 1.5):
        with pytest.raises(InvalidRequest) as caught:
            edit_spec(strength=bad)
        assert caught.value.param == "strength"
    with pytest.raises(InvalidRequest) as caught:
        normalize(SpecInput(prompt="x", model="tiny-cogview4", task_type=TASK_IMAGE_TO_IMAGE, image_sha="a" * 64),
                  COGVIEW, Limits())
    assert caught.value.param == "model"


def test_steps_run_is_diffusers_rule_and_sets_previews():
    assert steps_run(9, 0.6) == 6 and steps_run(9, None) == 9 and steps_run(9, 1.0) == 9 and steps_run(9, 0.01) == 1
    spec = edit_spec(steps=20, strength=0.5)
    assert spec.steps_run == 10 and spec.preview_interval == 1
    request = spec.generation_request(512, output_dir=__import__("pathlib").Path("/out"))
    assert request.image_path == f"/out/inputs/{'a' * 64}.png" and request.steps_run == 10 and request.strength == 0.5


def test_unreferenced_old_inputs_are_pruned_and_a_store_again_refreshes_one(tmp_path):
    kept, young, old = (inputs.store(tmp_path, picture(colour)) for colour in [(1, 1, 1), (2, 2, 2), (3, 3, 3)])
    path = {sha: inputs.input_path(tmp_path, sha) for sha in (kept, young, old)}
    for sha in (kept, old):
        os.utime(path[sha], (1_000, 1_000))  # stored long ago
    old_bytes = path[old].stat().st_size
    assert inputs.prune_unreferenced(tmp_path, {kept}, stored_before=2_000) == (1, old_bytes)
    assert path[kept].is_file() and path[young].is_file() and not path[old].exists()
    os.utime(path[kept], (1_000, 1_000))
    assert inputs.store(tmp_path, picture((1, 1, 1))) == kept  # the same pixels again: a new job's input
    assert inputs.prune_unreferenced(tmp_path, set(), stored_before=2_000) == (0, 0), "refreshed, not pruned"
