"""web_client.html in a real headless Chromium (Debian's, driven by Playwright) against a live server.

The page is observed from outside: an init script records every ``src`` change of every element
(MutationObserver with old values), so the test sees which preview frames were shown and in what
order relative to the final image. Screenshots go to ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

from tests.conftest import REPO, live

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 30_000

# Every src change, in order: {id, old}. The value each change set is the next change's old
# value for the same element, or the element's current src for its last change.
RECORD_SRC = """
window.__srcChanges = [];
new MutationObserver((records) => {
  for (const r of records) if (r.target.id) window.__srcChanges.push({ id: r.target.id, old: r.oldValue });
}).observe(document, { subtree: true, attributes: true, attributeFilter: ["src"], attributeOldValue: true });
window.__srcHistory = () => {
  const out = window.__srcChanges.map((c) => ({ id: c.id, value: null }));
  const pending = {};
  window.__srcChanges.forEach((c, i) => {
    if (pending[c.id] !== undefined) out[pending[c.id]].value = c.old;
    pending[c.id] = i;
  });
  for (const [id, i] of Object.entries(pending)) out[i].value = document.getElementById(id).getAttribute("src");
  return out;
};
"""

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's /usr/bin/chromium (apt-get install -y chromium; "
                                       "scripts/install.sh --test does it)")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, request, fake_server):  # after fake_server: the screenshot shows a live connection
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.add_init_script(RECORD_SRC)
    yield page
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


def open_ui(page, server) -> None:
    page.goto(server.url + "/ui")
    page.wait_for_function("document.querySelector('#model').options.length > 0")


def fill_form(page, **fields) -> None:
    for name, value in fields.items():
        page.fill("#" + name, str(value))


def test_streaming_shows_changing_previews_before_the_final_image(page, fake_server):
    open_ui(page, fake_server)
    assert page.input_value("#server-url") == fake_server.url
    fill_form(page, prompt="a lighthouse", width=64, height=64, steps=10, seed=3)
    page.check("#mode-stream")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('done')")

    history = page.evaluate("window.__srcHistory()")
    first_final = next(i for i, c in enumerate(history) if c["id"] == "final-img" and c["value"])
    previews = [c["value"] for c in history[:first_final] if c["id"] == "preview-img" and c["value"]]
    assert len(set(previews)) >= 2, f"only {len(set(previews))} distinct preview frames before the final image"
    assert all(v.startswith("data:image/png;base64,") for v in previews)
    assert page.evaluate("document.querySelector('#final-img').naturalWidth") == 64
    assert page.evaluate("document.querySelector('#progress').value") == 100
    assert page.locator("#step-log tbody tr").count() == 11  # 10 previews + the final image
    assert page.is_hidden("#error")


def test_compare_fills_streaming_and_batch_timings(page, fake_server):
    open_ui(page, fake_server)
    fill_form(page, prompt="a lighthouse", width=64, height=64, steps=10, seed=21)
    page.click("#compare")
    page.wait_for_function("/^\\d+$/.test(document.querySelector('#cmp-batch-total').textContent)")
    first, total = (int(page.text_content(sel)) for sel in ("#cmp-stream-first", "#cmp-stream-total"))
    assert 0 <= first < total
    assert int(page.text_content("#cmp-stream-steps")) == 10
    assert "seed+1" in page.text_content("#cmp-note")
    assert page.evaluate("document.querySelector('#final-img').naturalWidth") == 64  # the batch image
    assert page.is_hidden("#error")


def test_websocket_job_with_upscale_completes_and_survives_reload(page, fake_server):
    open_ui(page, fake_server)
    page.wait_for_function("document.querySelector('#ws-state').textContent === 'connected'")
    client_id = page.text_content("#client-id")
    fill_form(page, prompt="a lighthouse", width=64, height=64, steps=4, seed=8)
    page.check("#mode-jobs")
    page.check("#upscale")
    page.click("#ws-create")
    page.wait_for_function("(() => { const i = document.querySelector('#upscaled-img');"
                           " return i.complete && i.naturalWidth > 0; })()")
    assert page.text_content("#jobs-list .job .job-status") == "completed"
    sizes = page.evaluate("[document.querySelector('#job-original-img').naturalWidth,"
                          " document.querySelector('#upscaled-img').naturalWidth]")
    assert sizes == [64, 256]
    assert page.get_attribute("#jobs-list .job .job-preview", "src").startswith("data:image/png;base64,")

    page.reload()  # the client id lives in localStorage: "my jobs" come back after a reload
    page.wait_for_selector("#jobs-list .job .status-completed")
    assert page.text_content("#client-id") == client_id
    assert page.locator("#jobs-list .job").count() == 1


def test_cancel_button_cancels_a_running_job(page, fake_server):
    gate = threading.Event()
    fake_server.generator.gate = gate  # every step waits: the job stays 'processing' until released
    try:
        open_ui(page, fake_server)
        fill_form(page, prompt="hold me", width=64, height=64, steps=4, seed=9)
        page.click("#ws-create")
        page.wait_for_selector("#jobs-list .job .status-processing")
        page.click("#jobs-list .job .job-cancel")
        page.wait_for_function("document.querySelector('#jobs-list .job .job-error').textContent.length > 0")
    finally:
        gate.set()
    page.wait_for_selector("#jobs-list .job .status-cancelled")
    assert page.is_disabled("#jobs-list .job .job-cancel")


def test_invalid_input_is_shown_in_the_error_area(page, fake_server):
    open_ui(page, fake_server)
    fill_form(page, prompt="a lighthouse", width=1000, height=64, steps=4)
    page.click("#generate")
    page.wait_for_selector("#error", state="visible")
    text = page.text_content("#error")
    assert "400" in text and "width" in text and "1000" in text

    page.check("#mode-jobs")  # the same mistake over the WebSocket
    page.evaluate("document.querySelector('#error').hidden = true")
    page.click("#generate")
    page.wait_for_selector("#error", state="visible")
    assert "1000" in page.text_content("#error")


    page.check("#mode-stream")  # a failure after the 200: an error event inside the stream
    fill_form(page, prompt="fail:error please", width=64)
    page.evaluate("document.querySelector('#error').hidden = true")
    page.click("#generate")
    page.wait_for_selector("#error", state="visible")
    assert "stream error" in page.text_content("#error") and "failed" in page.text_content("#error")


def test_page_opened_from_disk_says_to_open_ui_instead(page, fake_server):
    """Origin: null is refused by default (a sandboxed iframe on any website sends it too): the
    page opened from disk tells the user what to do instead of failing silently."""
    page.goto((REPO / "web_client.html").as_uri())
    page.fill("#server-url", fake_server.url)
    page.dispatch_event("#server-url", "change")
    page.wait_for_function("url => document.querySelector('#error').textContent.includes(url)", arg=fake_server.url)
    text = page.text_content("#error")
    assert "opened from disk" in text and "/ui" in text and "--cors-origins null" in text
    assert page.evaluate("document.querySelector('#model').options.length") == 0


def test_page_opened_from_disk_works_when_null_is_allowed_explicitly(page, tmp_path):
    with live(tmp_path, cors_origins=["null"]) as server:
        page.goto((REPO / "web_client.html").as_uri())
        page.fill("#server-url", server.url)
        page.dispatch_event("#server-url", "change")
        page.wait_for_function("document.querySelector('#model').options.length > 0")  # CORS for Origin: null
        fill_form(page, prompt="a lighthouse", width=64, height=64, steps=3, seed=4)
        page.click("#generate")
        page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('done')")
        assert page.evaluate("document.querySelector('#final-img').naturalWidth") == 64
        page.wait_for_function("document.querySelector('#ws-state').textContent === 'connected'")
        assert page.is_hidden("#error")


def test_websocket_reconnects_with_the_same_client_id(page, fake_server):
    attempts = []

    def route(ws) -> None:
        attempts.append(ws.url)
        if len(attempts) == 1:
            ws.close()  # the first connection drops at once: the page must retry
        else:
            ws.connect_to_server()

    page.route_web_socket(re.compile(r".*/api/ws\?.*"), route)
    open_ui(page, fake_server)
    page.wait_for_function("document.querySelector('#ws-state').textContent.startsWith('disconnected; retrying')")
    page.wait_for_function("document.querySelector('#ws-state').textContent === 'connected'")
    client_id = page.text_content("#client-id")
    assert len(attempts) == 2 and all(url.endswith("client_id=" + client_id) for url in attempts)
    fill_form(page, prompt="after reconnect", width=64, height=64, steps=2, seed=5)
    page.click("#ws-create")
    page.wait_for_selector("#jobs-list .job .status-completed")
