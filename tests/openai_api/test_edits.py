"""``POST /v1/images/edits`` (and the legacy variations) through the official ``openai`` SDK against
a real uvicorn: img2img, inpainting, streamed partial images, dedup, and every bad input's 400."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from conftest import live

EDIT_EVENTS = ["image_edit.partial_image", "image_edit.partial_image", "image_edit.completed"]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


def png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def noise(width: int = 96, height: int = 64, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


def left_half_mask(width: int = 96, height: int = 64) -> Image.Image:
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))  # transparent = edit
    return mask


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def bomb_png(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + data + chunk(b"IEND", b"")


@pytest.fixture
def server(tmp_path):
    with live(tmp_path, extra_models=["tiny-cogview4"], max_upload_bytes=200_000, max_input_pixels=1_000_000) as srv:
        yield srv


def test_img2img_keeps_the_input_size_rounded_to_the_model(server):
    result = client(server).images.edit(image=("in.png", png(noise(100, 70)), "image/png"), prompt="make it blue",
                                        extra_body={"seed": 4})
    assert result.size == "96x64"
    assert decode(result.data[0].b64_json).shape == (64, 96, 3)
    assert result.usage.input_tokens_details.image_tokens == 6 * 4  # the input, in 16x16 patches
    request = server.generator.calls[-1]
    assert request.strength == 0.6 and request.mask_path is None and request.image_path.endswith(".png")


def test_other_size_resizes_the_input_and_strings_are_parsed(server):
    result = client(server).images.edit(image=("in.png", png(noise()), "image/png"), prompt="x", size="128x128",
                                        n=2, input_fidelity="high", extra_body={"seed": 9, "unknown_field": "ignored"})
    assert result.size == "128x128" and len(result.data) == 2
    assert decode(result.data[1].b64_json).shape == (128, 128, 3)
    assert server.generator.calls[-1].strength == 0.4  # input_fidelity high


def test_mask_edits_only_the_transparent_area(server):
    original = noise()
    result = client(server).images.edit(image=("in.png", png(original), "image/png"),
                                        mask=("mask.png", png(left_half_mask()), "image/png"), prompt="x",
                                        extra_body={"seed": 1})
    out, src = decode(result.data[0].b64_json), np.asarray(original, dtype=np.int16)
    assert np.array_equal(out[:, 48:], src[:, 48:])
    assert np.abs(out[:, :48] - src[:, :48]).mean() > 10


def left_half_transparent(original: Image.Image) -> Image.Image:
    image = original.convert("RGBA")
    image.putalpha(left_half_mask().getchannel("A"))
    return image


def test_dall_e_2_edits_the_images_own_transparent_area(server):
    """DALL-E 2 clients send no mask: the image's transparency is the mask. Other model names edit
    a transparent image whole (GPT image models), and an opaque image is edited whole either way."""
    original = noise()
    sent = ("in.png", png(left_half_transparent(original)), "image/png")
    # (DALL-E names answer with a URL unless asked otherwise, as they did upstream.)
    result = client(server).images.edit(image=sent, prompt="x", model="dall-e-2", response_format="b64_json",
                                        extra_body={"seed": 1})
    out, src = decode(result.data[0].b64_json), np.asarray(original, dtype=np.int16)
    assert np.array_equal(out[:, 48:], src[:, 48:]), "the opaque half is kept"
    assert np.abs(out[:, :48] - src[:, :48]).mean() > 10
    assert server.generator.calls[-1].mask_path is not None
    for model, image in [("gpt-image-1.5", sent), ("dall-e-2", ("in.png", png(original), "image/png"))]:
        whole = client(server).images.edit(image=image, prompt="x", model=model, response_format="b64_json",
                                           extra_body={"seed": 1})
        assert server.generator.calls[-1].mask_path is None, model
        assert np.abs(decode(whole.data[0].b64_json)[:, 48:] - src[:, 48:]).mean() > 10, model


def test_several_images_are_a_400_naming_image(server):
    a, b = png(noise(seed=1)), png(noise(seed=2))
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).images.edit(image=[("a.png", a, "image/png"), ("b.png", b, "image/png")], prompt="x")
    assert caught.value.body["param"] == "image" and "2 images" in caught.value.body["message"]
    # A one-element list is sent as image[] too, and works.
    result = client(server).images.edit(image=[("a.png", a, "image/png")], prompt="x")
    assert result.size == "96x64"


def bad_cases():
    image = png(noise())
    truncated = image[: len(image) // 2]
    return [
        ("not an image", {"image": ("a.png", b"hello" * 50, "image/png")}, {}, "image", "not an image"),
        ("truncated", {"image": ("a.png", truncated, "image/png")}, {}, "image", "truncated"),
        ("gif", {"image": ("a.gif", png(noise(), "GIF"), "image/gif")}, {}, "image", "GIF"),
        ("bomb", {"image": ("a.png", bomb_png(20_000, 20_000), "image/png")}, {}, "image", "too many pixels"),
        ("mask without alpha", {"mask": ("m.png", png(noise()), "image/png")}, {}, "mask", "no alpha"),
        ("mask of another size", {"mask": ("m.png", png(left_half_mask(64, 64)), "image/png")}, {}, "mask",
         "64x64 but the image is 96x64"),
        ("strength", {}, {"strength": 1.5}, "strength", ""),
        ("zero strength", {}, {"strength": 0}, "strength", ""),
        ("cogview4", {"model": "tiny-cogview4"}, {}, "model", "models that can: tiny-z-image"),
        ("size", {"size": "big"}, {}, "size", ""),
        ("background", {"background": "transparent"}, {}, "background", ""),
        ("fidelity", {}, {"input_fidelity": "medium"}, "input_fidelity", ""),
    ]


@pytest.mark.parametrize(("name", "args", "extra", "param", "says"), bad_cases(), ids=[c[0] for c in bad_cases()])
def test_bad_input_is_a_400_naming_the_param(server, name, args, extra, param, says):
    kwargs = {"image": ("in.png", png(noise()), "image/png"), "prompt": "x", **args}
    with pytest.raises(openai.BadRequestError) as caught:
        client(server).images.edit(**kwargs, extra_body=extra or None)
    assert caught.value.body["param"] == param
    assert says in caught.value.body["message"]
    assert server.generator.calls == []  # nothing ran


def test_missing_prompt_and_image_are_400s(server):
    image = ("in.png", png(noise()), "image/png")
    response = httpx.post(server.url + "/v1/images/edits", files={"image": image}, data={"prompt": "  "})
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"
    response = httpx.post(server.url + "/v1/images/edits", data={"prompt": "x"}, files={"other": image})
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"
    response = httpx.post(server.url + "/v1/images/edits", json={"prompt": "x", "image": "abc"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "image"


def test_upload_over_the_limit_is_413_declared_or_chunked(server):
    big = png(noise(400, 400, seed=3))  # ~480 KB of noise, over the 200 KB limit
    with pytest.raises(openai.APIStatusError) as caught:
        client(server).images.edit(image=("big.png", big, "image/png"), prompt="x")
    assert caught.value.status_code == 413 and caught.value.body["code"] == "request_too_large"
    request = httpx.Request("POST", server.url + "/v1/images/edits", files={"image": ("big.png", big, "image/png")})
    body = request.read()

    def chunks():  # no Content-Length: the limit is enforced while the body streams
        for start in range(0, len(body), 16384):
            yield body[start:start + 16384]

    response = httpx.post(server.url + "/v1/images/edits", content=chunks(),
                          headers={"content-type": request.headers["content-type"]})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert server.generator.calls == []


def test_edits_dedup_by_input_pixels(server):
    edit = client(server).images.edit
    first = edit(image=("a.png", png(noise(seed=5)), "image/png"), prompt="x", extra_body={"seed": 3})
    again = edit(image=("b.png", png(noise(seed=5).convert("RGBA")), "image/png"), prompt="x", extra_body={"seed": 3})
    other = edit(image=("a.png", png(noise(seed=6)), "image/png"), prompt="x", extra_body={"seed": 3})
    assert again.job_id == first.job_id  # same pixels in another PNG layout: one job
    assert other.job_id != first.job_id
    assert len(server.generator.calls) == 2


def test_stream_openai_dialect_sends_image_edit_events(server):
    stream = client(server).images.edit(image=("in.png", png(noise()), "image/png"), prompt="x", stream=True,
                                        partial_images=2)
    events = list(stream)
    assert [e.type for e in events] == EDIT_EVENTS
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert decode(events[-1].b64_json).shape == (64, 96, 3)


def test_models_say_which_can_edit_and_variations_work(server):
    models = {m.id: m for m in client(server).models.list().data}
    assert models["tiny-z-image"].supports_edits is True and models["tiny-cogview4"].supports_edits is False
    response = httpx.post(server.url + "/v1/images/variations", files={"image": ("in.png", png(noise()), "image/png")},
                          data={"n": "1", "size": "64x64", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    assert decode(response.json()["data"][0]["b64_json"]).shape == (64, 64, 3)
    assert server.generator.calls[-1].prompt == ""


def test_real_tiny_model_inpaints_only_the_mask_and_streams_partials(tiny_server):
    original = noise(seed=11)
    sdk = client(tiny_server)
    result = sdk.images.edit(image=("in.png", png(original), "image/png"),
                             mask=("mask.png", png(left_half_mask()), "image/png"), prompt="a red fox",
                             extra_body={"seed": 2, "num_inference_steps": 4})
    out, src = decode(result.data[0].b64_json), np.asarray(original, dtype=np.int16)
    assert out.shape == (64, 96, 3)
    assert np.abs(out[:, 48:] - src[:, 48:]).max() <= 2  # outside the mask: the input's pixels
    assert np.abs(out[:, :48] - src[:, :48]).mean() > 10  # inside: repainted
    events = list(sdk.images.edit(image=("in.png", png(original), "image/png"), prompt="a red fox", stream=True,
                                  partial_images=2, extra_body={"seed": 3, "num_inference_steps": 9}))
    assert [e.type for e in events] == EDIT_EVENTS  # 9 steps x 0.6 = 6 steps run, 2 of them partials
    assert decode(events[-1].b64_json).shape == (64, 96, 3)


REPO = Path(__file__).resolve().parents[2]


def run_json(command: list[str], env: dict | None = None) -> dict:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_official_node_sdk_edits(server, tmp_path):
    sdk_dir = REPO / ".venv" / "node-openai"
    if shutil.which("node") is None or not (sdk_dir / "node_modules" / "openai").is_dir():
        pytest.skip("node or the node SDK (scripts/install.sh --test) is not installed")
    (tmp_path / "in.png").write_bytes(png(noise()))
    (tmp_path / "mask.png").write_bytes(png(left_half_mask()))
    seen = run_json(["node", str(REPO / "tests/openai_api/compat/node_edits.mjs"), server.url + "/v1", str(sdk_dir),
                     str(tmp_path / "in.png"), str(tmp_path / "mask.png")])
    assert seen["edit"]["size"] == "96x64" and seen["edit"]["b64"] > 0
    assert seen["stream"] == EDIT_EVENTS
    assert seen["two"] == {"status": 400, "param": "image"}


VARIATION_1X = """
import io, sys, openai
from PIL import Image
buffer = io.BytesIO()
Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, "PNG")
client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
result = client.images.create_variation(image=("in.png", buffer.getvalue(), "image/png"), n=1, size="64x64",
                                        response_format="b64_json")
print('{"version": "%s", "b64": %d}' % (openai.__version__, len(result.data[0].b64_json)))
"""


def test_variation_with_the_1x_sdk(server):
    old_sdk = REPO / ".venv" / "openai-1x"
    if not (old_sdk / "openai").is_dir():
        pytest.skip("the 1.x SDK (scripts/install.sh --test) is not installed")
    seen = run_json([sys.executable, "-c", VARIATION_1X, server.url + "/v1"], env={"PYTHONPATH": str(old_sdk)})
    assert seen["version"].startswith("1.") and seen["b64"] > 0
    assert server.generator.calls[-1].prompt == ""

