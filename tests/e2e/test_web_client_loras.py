"""The web page offers the adapters of GET /v1/loras that fit the chosen model and sends the chosen
one with its weight (HTTP and WebSocket), in a real headless Chromium against a live server."""

from __future__ import annotations

import pytest

from server.testing.fakes import FakeGenerator
from tests.conftest import SHARED_CACHE, live
from tests.e2e.test_web_client import CHROMIUM, TIMEOUT_MS, browser  # noqa: F401 - the fixture
from tests.lora_helpers import write_adapter, write_unrelated

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's /usr/bin/chromium")


class RecordingGenerator(FakeGenerator):
    def __init__(self):
        super().__init__(step_s=0.01)
        self.requests = []

    def generate(self, request, on_step, is_cancelled):
        self.requests.append(request)
        return super().generate(request, on_step, is_cancelled)


def test_the_page_offers_fitting_adapters_and_sends_the_choice(browser, tmp_path):  # noqa: F811
    pytest.importorskip("peft")
    root = tmp_path / "loras"
    write_adapter(root / "alpha.safetensors", SHARED_CACHE)
    write_unrelated(root / "junk.safetensors")
    generator = RecordingGenerator()
    with live(tmp_path, generator=generator, lora_dir=root) as server:
        page = browser.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server.url + "/ui")
        page.wait_for_function("document.querySelector('#lora').options.length > 1")
        assert [o for o in page.eval_on_selector_all("#lora option", "os => os.map(o => o.value)")] == ["", "alpha"]
        page.select_option("#lora", "alpha")
        page.fill("#lora-weight", "0.5")
        page.fill("#width", "64")
        page.fill("#height", "64")
        page.fill("#seed", "4")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('done')")
        assert page.is_hidden("#error")
        [request] = generator.requests
        assert [(ref.name, ref.weight) for ref in request.loras] == [("alpha", 0.5)]
        page.close()
