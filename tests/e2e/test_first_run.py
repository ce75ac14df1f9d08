"""The first run a person makes: ``./start_server.sh`` with no flags but a port, then the page at
/ui generates with live previews - the real script, the real (tiny, CPU) model, a real browser."""

from __future__ import annotations

import pytest

from tests.conftest import ServerProcess
from tests.e2e.test_web_client import ARTIFACTS, CHROMIUM, LAUNCH_ARGS, RECORD_SRC, TIMEOUT_MS, fill_form

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium")


class StartServerScript(ServerProcess):
    """``./start_server.sh --port P --output-dir D``: model, cache and everything else default."""

    def __init__(self, output_dir):
        super().__init__()
        self.args = ["./start_server.sh", "--port", str(self.port), "--output-dir", str(output_dir)]

    def __enter__(self) -> "StartServerScript":
        return self.start(timeout=300)  # the script may first bring .venv up to requirements.txt


def test_start_server_then_the_page_streams_previews(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with StartServerScript(tmp_path / "outputs") as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.add_init_script(RECORD_SRC)
        page.goto(server.url + "/ui")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        assert "tiny-z-image" in page.text_content("#model")  # --model auto on a CPU-only machine
        fill_form(page, prompt="a lighthouse at dusk", width=128, height=128, steps=10, seed=5)
        page.check("#mode-stream")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('done')",
                               timeout=120_000)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "first_run_start_server_sh.png"), full_page=True)
        history = page.evaluate("window.__srcHistory()")
        browser.close()
        log = server.output()
    assert "RANDOM-WEIGHT DEMO" in log  # the server says loudly what it is serving
    assert f"127.0.0.1:{server.port}/ui" in log  # the script says where to go
    first_final = next(i for i, c in enumerate(history) if c["id"] == "final-img" and c["value"])
    previews = {c["value"] for c in history[:first_final] if c["id"] == "preview-img" and c["value"]}
    assert len(previews) >= 2, f"only {len(previews)} distinct preview frames before the final image"
