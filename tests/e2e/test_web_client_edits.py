"""The web page's Edit mode and its "latest job" panes, in a real headless Chromium against a live
server over the FakeGenerator (an edit blends the input with the seed's colour by ``strength`` and
keeps every pixel outside the mask).

Pixels are read back in the page: the edited image and the inputs are drawn into a canvas and
``getImageData`` returns them, so the test sees what the page shows.
"""

from __future__ import annotations

import io
import json
import random

import pytest
from PIL import Image

from tests.e2e import test_web_client as web
from tests.e2e.test_web_client import CHROMIUM, fill_form, open_ui

browser, page = web.browser, web.page  # the page's fixtures: Chromium, a context with src recording, screenshots
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium")

SIDE = 64

# RGBA bytes of an <img> or <canvas> (by id) at its natural size, read through a canvas.
PIXELS = """id => {
  const el = document.getElementById(id);
  const w = el.naturalWidth || el.width, h = el.naturalHeight || el.height;
  const c = document.createElement("canvas"); c.width = w; c.height = h;
  const ctx = c.getContext("2d"); ctx.drawImage(el, 0, 0);
  return { w, h, px: Array.from(ctx.getImageData(0, 0, w, h).data) };
}"""
IMAGE_READY = "id => { const i = document.getElementById(id); return i.complete && i.naturalWidth > 0; }"


def colour(seed: int) -> tuple[int, int, int]:
    """The FakeGenerator's plain colour for a seed (its documented stand-in for a picture)."""
    return (seed * 67 % 256, seed * 131 % 256, seed * 197 % 256)


def gradient_png() -> bytes:
    """A picture with a distinct colour per pixel and no blue, so a blend with any seed colour that
    has blue changes every pixel it touches."""
    image = Image.new("RGB", (SIDE, SIDE))
    image.putdata([(x * 4, y * 4, 0) for y in range(SIDE) for x in range(SIDE)])
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def pixels(page, element_id: str) -> tuple[int, int, list[tuple[int, ...]]]:
    got = page.evaluate(PIXELS, element_id)
    px = got["px"]
    return got["w"], got["h"], [tuple(px[i:i + 4]) for i in range(0, len(px), 4)]


def paint_stroke(page) -> None:
    """A horizontal stroke across the middle of the mask canvas, left quarter to right quarter."""
    canvas = page.locator("#mask-canvas")
    canvas.scroll_into_view_if_needed()  # mouse coordinates are the viewport's
    box = canvas.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + box["width"] * 0.25, y)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.75, y, steps=8)
    page.mouse.up()


def record_ws_frames(page) -> list[dict]:
    sent: list[dict] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(json.loads(payload))))
    return sent


def test_edit_streams_previews_and_changes_only_the_painted_area(page, fake_server):
    open_ui(page, fake_server)
    fill_form(page, prompt="a red boat", steps=10, seed=5)
    page.set_input_files("#edit-file", files=[{"name": "photo.png", "mimeType": "image/png", "buffer": gradient_png()}])
    page.wait_for_function("!document.querySelector('#edit-run').disabled")
    assert page.text_content("#edit-info") == f"photo.png: {SIDE}x{SIDE}"
    source = pixels(page, "edit-image")
    assert source[:2] == (SIDE, SIDE) and source[2][SIDE + 1] == (4, 4, 0, 255)  # the upload, pixel-exact

    paint_stroke(page)
    page.fill("#strength", "0.8")
    assert page.text_content("#strength-value") == "0.80"
    page.check("#mode-stream")
    page.click("#edit-run")
    page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('done')")
    assert page.is_hidden("#error")

    history = page.evaluate("window.__srcHistory()")
    first_final = next(i for i, c in enumerate(history) if c["id"] == "final-img" and c["value"])
    previews = [c["value"] for c in history[:first_final] if c["id"] == "preview-img" and c["value"]]
    assert len(set(previews)) >= 2, f"only {len(set(previews))} distinct preview frames before the final image"
    assert page.locator("#step-log tbody tr").count() == 9  # 10 steps x strength 0.8 = 8 previews + the final

    page.wait_for_function(IMAGE_READY, arg="final-img")
    width, height, final = pixels(page, "final-img")
    assert (width, height) == (SIDE, SIDE)
    painted = [alpha > 0 for *_, alpha in pixels(page, "mask-canvas")[2]]
    assert 0 < sum(painted) < SIDE * SIDE // 2, "the stroke should cover part of the image"
    inside = [i for i, p in enumerate(painted) if p]
    outside = [i for i, p in enumerate(painted) if not p]
    assert all(final[i] == source[2][i] for i in outside), "a pixel outside the painted area changed"
    assert all(final[i] != source[2][i] for i in inside), "a pixel inside the painted area did not change"
    tint, i = colour(5), inside[0]  # inside: the input blended with the seed's colour by the strength
    expected = [round(s * 0.2 + c * 0.8) for s, c in zip(source[2][i][:3], tint)]
    assert all(abs(a - b) <= 1 for a, b in zip(final[i][:3], expected)), (final[i], expected)


def test_use_last_result_edits_it_over_batch_and_over_the_websocket(page, fake_server):
    sent = record_ws_frames(page)
    open_ui(page, fake_server)
    assert page.is_disabled("#edit-use-last")
    fill_form(page, prompt="a lighthouse", width=SIDE, height=SIDE, steps=4, seed=3)
    page.click("#generate")  # streaming: the last result is the final image's data URL
    page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('done')")
    page.click("#edit-use-last")
    page.wait_for_function("document.querySelector('#edit-info').textContent.startsWith('last result')")
    assert pixels(page, "edit-image")[2][0] == (*colour(3), 255)

    fill_form(page, seed=6)
    page.fill("#strength", "0.5")
    page.check("#mode-batch")
    page.click("#edit-run")  # no mask: the whole image is blended
    page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('done')")
    assert page.is_hidden("#error")
    page.wait_for_function(IMAGE_READY, arg="final-img")
    _, _, batch = pixels(page, "final-img")
    expected = tuple(round(a * 0.5 + b * 0.5) for a, b in zip(colour(3), colour(6)))
    assert len(set(batch)) == 1 and all(abs(a - b) <= 1 for a, b in zip(batch[0][:3], expected)), (batch[0], expected)

    page.check("#mode-jobs")  # a WebSocket job's result: the edit names its file instead of uploading it
    fill_form(page, seed=7)
    page.click("#ws-create")
    page.wait_for_selector("#jobs-list .job .status-completed")
    page.wait_for_function(IMAGE_READY, arg="job-original-img")
    page.click("#edit-use-last")
    page.wait_for_function("document.querySelector('#edit-info').textContent.includes('.png')")
    paint_stroke(page)
    page.fill("#strength", "1")
    fill_form(page, seed=8)
    page.click("#edit-run")
    page.wait_for_function("document.querySelectorAll('#jobs-list .job .status-completed').length === 2")
    assert page.is_hidden("#error")
    edit = next(m for m in sent if m.get("type") == "create_job" and m.get("task_type") == "image_to_image")
    params = edit["params"]
    assert params["image_filename"].endswith(".png") and "image" not in params
    assert params["mask"].startswith("data:image/png;base64,") and params["strength"] == 1
    page.wait_for_function(IMAGE_READY, arg="job-original-img")
    _, _, edited = pixels(page, "job-original-img")
    assert {p[:3] for p in edited} == {colour(7), colour(8)}  # kept outside the stroke, replaced inside


def test_after_a_reload_the_latest_job_panes_show_the_newest_finished_job(page, fake_server):
    open_ui(page, fake_server)
    page.wait_for_function("document.querySelector('#ws-state').textContent === 'connected'")
    page.check("#mode-jobs")
    page.check("#upscale")
    for count, seed in enumerate((11, 12), start=1):
        fill_form(page, prompt="a lighthouse", width=SIDE, height=SIDE, steps=2, seed=seed)
        page.click("#ws-create")
        page.wait_for_function(f"document.querySelectorAll('#jobs-list .job .status-completed').length === {count}")
    page.wait_for_function(IMAGE_READY, arg="upscaled-img")
    newest = page.get_attribute("#job-original-img", "src"), page.get_attribute("#upscaled-img", "src")

    page.reload()
    page.wait_for_function("document.querySelectorAll('#jobs-list .job .status-completed').length === 2")
    page.wait_for_function(IMAGE_READY, arg="job-original-img")
    page.wait_for_function(IMAGE_READY, arg="upscaled-img")
    assert (page.get_attribute("#job-original-img", "src"), page.get_attribute("#upscaled-img", "src")) == newest
    assert pixels(page, "job-original-img")[2][0] == (*colour(12), 255)
    assert page.evaluate("document.querySelector('#upscaled-img').naturalWidth") == SIDE * 4
    assert not page.is_disabled("#edit-use-last")  # the listed job is also the last result to edit


def test_unusable_inputs_are_refused_with_advice(page, fake_server):
    sent = record_ws_frames(page)
    open_ui(page, fake_server)
    page.set_input_files("#edit-file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": b"not a picture"}])
    page.wait_for_selector("#error", state="visible")
    assert "cannot read notes.png as an image" in page.text_content("#error")
    assert page.is_disabled("#edit-run") and page.text_content("#edit-info") == "no image"

    noise = Image.frombytes("RGB", (640, 640), random.Random(1).randbytes(640 * 640 * 3))  # ~1.2 MB as PNG
    out = io.BytesIO()
    noise.save(out, format="PNG")
    page.set_input_files("#edit-file", files=[{"name": "big.png", "mimeType": "image/png", "buffer": out.getvalue()}])
    page.wait_for_function("!document.querySelector('#edit-run').disabled")
    page.check("#mode-jobs")
    page.click("#edit-run")
    page.wait_for_function("document.querySelector('#error').textContent.includes('too large for one WebSocket message')")
    assert page.is_visible("#error")
    assert not any(m.get("type") == "create_job" for m in sent)
