"""Every example in the README runs: the curl and Python blocks against a live server."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import REPO

BLOCK = re.compile(r"```(python|bash)\n(.*?)```", re.S)


def readme_blocks(language: str, contains: str = "") -> list[str]:
    text = (REPO / "README.md").read_text()
    return [body for lang, body in BLOCK.findall(text) if lang == language and contains in body]


def against(server, code: str) -> str:
    return code.replace("http://127.0.0.1:8000", server.url).replace("ws://127.0.0.1:8000", server.ws_url)


@pytest.mark.parametrize("index", range(len(readme_blocks("python"))))
def test_python_examples_run(fake_server, index):
    code = against(fake_server, readme_blocks("python")[index])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "each example prints what it got"


@pytest.mark.parametrize("index", range(len(readme_blocks("bash", "curl"))))
def test_curl_examples_run(fake_server, index):
    code = against(fake_server, readme_blocks("bash", "curl")[index])
    done = subprocess.run(["bash", "-c", "set -o pipefail; " + code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"b64_json"' in done.stdout or '"url"' in done.stdout or '"image"' in done.stdout
    assert '"error"' not in done.stdout


def test_there_are_examples_to_run():
    assert len(readme_blocks("python")) >= 3 and len(readme_blocks("bash", "curl")) >= 2
