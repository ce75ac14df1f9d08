"""WebSocket ``create_job`` with ``task_type: image_to_image`` against a real uvicorn server: from
an earlier output's file name (upscaled), from base64 with a mask, and the error frames."""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image

from server.core.spec import TASK_IMAGE_TO_IMAGE
from tests.conftest import run_async
from tests.ws.test_routes_ws import client


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_image_to_image_from_an_earlier_result_completes_with_the_upscaled_image(fake_server):
    async def body():
        async with client(fake_server, "edit") as c:
            first = await c.create("a lighthouse", seed=3, upscale=False)
            done = (await c.until_status(first["job_id"], "completed"))[-1]
            filename = done["result"]["filename"]
            reply = await c.request(type="create_job", task_type=TASK_IMAGE_TO_IMAGE,
                                    params={"prompt": "at night", "image_filename": filename, "seed": 4,
                                            "strength": 0.5, "preview": True})
            assert reply["type"] == "job_status" and reply["job_id"] != first["job_id"]
            seen = await c.until_status(reply["job_id"], "completed")
            return seen[-1], [m for m in seen if m["type"] == "job_preview"]

    final, previews = run_async(body(), 45)
    assert final["result"]["upscaled_filename"] and final["result"]["upscale_error"] is None
    assert previews and {p["preview"]["total_steps"] for p in previews} == {5}  # 9 steps x 0.5
    request = fake_server.generator.calls[-1]
    assert (request.width, request.height, request.strength) == (64, 64, 0.5)  # the input's size


def test_image_to_image_from_base64_with_a_mask(fake_server):
    original = Image.fromarray((np.random.RandomState(1).rand(64, 80, 3) * 255).astype("uint8"))
    mask = Image.new("RGBA", (80, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 40, 64))

    async def body():
        async with client(fake_server, "edit64") as c:
            reply = await c.request(type="create_job", task_type=TASK_IMAGE_TO_IMAGE,
                                    params={"prompt": "x", "image": png_b64(original),
                                            "mask": "data:image/png;base64," + png_b64(mask), "upscale": False})
            return (await c.until_status(reply["job_id"], "completed"))[-1]

    final = run_async(body(), 45)
    path = fake_server.app.state.settings.output_dir / final["result"]["filename"]
    out = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert out.shape == (64, 80, 3)
    assert np.array_equal(out[:, 40:], np.asarray(original, dtype=np.int16)[:, 40:])
    assert fake_server.generator.calls[-1].strength == 1.0  # the inpaint default


def test_image_to_image_errors_name_the_param(fake_server):
    cases = [
        ({"prompt": "x"}, "image"),
        ({"prompt": "x", "image_filename": "../jobs.sqlite3"}, "image_filename"),
        ({"prompt": "x", "image": "not base64!"}, "image"),
        ({"prompt": "x", "image": base64.b64encode(b"plain text").decode()}, "image"),
        ({"prompt": "x", "image": png_b64(Image.new("RGB", (64, 64))), "strength": 2.0}, "strength"),
        ({"prompt": "x", "image": png_b64(Image.new("RGB", (64, 64))), "mask": png_b64(Image.new("RGB", (64, 64)))},
         "mask"),
    ]

    async def body():
        async with client(fake_server, "bad") as c:
            return [await c.request(type="create_job", task_type=TASK_IMAGE_TO_IMAGE, params=params)
                    for params, _ in cases]

    replies = run_async(body(), 45)
    assert [(r["type"], r["param"]) for r in replies] == [("error", param) for _, param in cases]
    assert fake_server.generator.calls == []
