"""Compatibility as users meet it: today's OpenAI model names, fields and defaults, through real
client libraries unchanged (the newest and the oldest claimed 1.x ``openai`` Python SDK, sync and
async, and the official node SDK), each request also as raw HTTP; and the WebSocket protocol's
``request_id`` and ``result.path`` exactly as documented.

The SDKs run in subprocesses (tests/openai_api/compat/) against a live server over the FakeGenerator: the 1.x
SDK from .venv/openai-1x and the node SDK from .venv/node-openai, both installed by
``scripts/install.sh --test``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import sys
import threading

import httpx
import pytest
from websockets.asyncio.client import connect

from server.core.catalog import Catalog
from server.core.errors import ModelNotFound
from server.testing.fakes import FakeGenerator
from tests.conftest import REPO, live, run_async

COMPAT = REPO / "tests" / "openai_api" / "compat"
OLD_SDK_DIR = REPO / ".venv" / "openai-1x"
NODE_SDK_DIR = REPO / ".venv" / "node-openai"
TODAYS_NAMES = ["gpt-image-1.5", "gpt-image-2", "gpt-image-2-2026-04-21", "gpt-image-2.6-flare", "gpt-image-1-mini",
                "chatgpt-image-latest", "gpt-image-1", "dall-e-3", "dall-e-2"]
TIMEOUT = 10.0


def pinned(requirements: str) -> str:
    """The version pinned for ``openai`` in a requirements file: what the tests must have run."""
    lines = (REPO / requirements).read_text().splitlines()
    return next(line.split("==")[1].strip() for line in lines if line.startswith("openai=="))


def generate(server, **body) -> httpx.Response:
    return httpx.post(server.url + "/v1/images/generations", json={"prompt": "a lighthouse", **body}, timeout=30)


def png_bytes(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n")


# -- raw HTTP -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", TODAYS_NAMES)
def test_openai_image_names_generate_with_the_default_model(fake_server, name):
    response = generate(fake_server, model=name, size="64x64", response_format="b64_json")
    assert response.status_code == 200, response.text
    assert png_bytes(base64.b64decode(response.json()["data"][0]["b64_json"]))
    assert fake_server.generator.calls[-1].model == "tiny-z-image"


def test_unknown_names_are_404_and_models_lists_only_what_is_served(fake_server):
    missing = generate(fake_server, model="stable-diffusion-9")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert fake_server.generator.calls == []
    listed = httpx.get(fake_server.url + "/v1/models").json()
    assert [m["id"] for m in listed["data"]] == ["tiny-z-image"]
    one = httpx.get(fake_server.url + "/v1/models/gpt-image-2").json()
    assert one["id"] == "gpt-image-2" and one["root"] == "tiny-z-image"
    assert httpx.get(fake_server.url + "/v1/models/no-such-model").status_code == 404


def test_aliases_override_the_openai_name_rules():
    catalog = Catalog(default_model="tiny-z-image", served=("tiny-z-image", "tiny-cogview4"),
                      aliases={"dall-e-*": "tiny-cogview4", "gpt-image-2": "tiny-cogview4", "mine": "tiny-cogview4"})
    assert catalog.resolve("dall-e-3").model_id == "tiny-cogview4"  # a pattern beats the rule
    assert catalog.resolve("gpt-image-2").model_id == "tiny-cogview4"  # an exact name too
    assert catalog.resolve("gpt-image-2.5-sunburst").model_id == "tiny-z-image"  # the rule
    assert catalog.resolve("chatgpt-image-latest").model_id == "tiny-z-image"
    assert catalog.resolve("mine").model_id == "tiny-cogview4"
    with pytest.raises(ModelNotFound):
        catalog.resolve("gpt-4o")  # not an image model name


def test_response_format_defaults_to_url_for_dall_e_names_only(fake_server):
    dalle = generate(fake_server, model="dall-e-2", prompt="x", n=1, size="64x64")
    assert dalle.status_code == 200, dalle.text
    [entry] = dalle.json()["data"]
    assert "b64_json" not in entry
    download = httpx.get(entry["url"])
    assert download.status_code == 200 and png_bytes(download.content)
    plain = generate(fake_server, prompt="x", n=1, size="64x64").json()["data"][0]
    assert "url" not in plain and png_bytes(base64.b64decode(plain["b64_json"]))
    modern = generate(fake_server, model="gpt-image-2", size="64x64").json()["data"][0]
    assert "url" not in modern and modern["b64_json"]
    # An explicit value always wins.
    explicit_b64 = generate(fake_server, model="dall-e-3", size="64x64", response_format="b64_json").json()["data"][0]
    assert "url" not in explicit_b64 and explicit_b64["b64_json"]
    explicit_url = generate(fake_server, model="gpt-image-1.5", size="64x64", response_format="url").json()["data"][0]
    assert "b64_json" not in explicit_url and explicit_url["url"].startswith(fake_server.url + "/api/image/")


@pytest.mark.parametrize("quality", ["low", "medium", "high", "xhigh", "max", "auto", "standard", "hd"])
def test_todays_fields_are_accepted_and_quality_is_echoed(fake_server, quality):
    response = generate(fake_server, model="gpt-image-2", size="64x64", quality=quality, complexity="high",
                        safety_identifier="user-123", moderation="low", style="vivid", user="legacy-user", n=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["quality"] == quality and len(body["data"]) == 2
    assert body["background"] == "opaque" and body["output_format"] == "png" and body["size"] == "64x64"


@pytest.mark.parametrize("body, param", [
    ({"complexity": "extreme"}, "complexity"),
    ({"moderation": "none"}, "moderation"),
    ({"style": "cubist"}, "style"),
    ({"quality": "ultra"}, "quality"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_format": "svg"}, "output_format"),
    ({"background": "transparent"}, "background"),
    ({"n": 5}, "n"),
    ({"n": "2"}, "n"),
])
def test_what_cannot_be_done_is_a_clear_400(fake_server, body, param):
    response = generate(fake_server, size="64x64", **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]
    if body.get("output_format") in ("gif", "svg"):
        assert "png, jpeg or webp" in error["message"]
    assert fake_server.generator.calls == []


def test_n_up_to_a_raised_max_n(tmp_path):
    with live(tmp_path, max_n=10) as server:
        response = generate(server, model="dall-e-2", size="64x64", n=10, response_format="b64_json")
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 10
        assert generate(server, size="64x64", n=11).json()["error"]["param"] == "n"


# -- real client libraries ------------------------------------------------------------------------

def run_client(command: list[str], env: dict | None = None) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO,
                            env={**os.environ, **(env or {})})
    assert result.returncode == 0, f"{command[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def check_python_sdk(seen: dict, version: str) -> None:
    assert seen["version"] == version
    sync, run = seen["sync"], seen["async"]
    assert sync["models"] == {name: [64, 64] for name in
                              ("gpt-image-1.5", "gpt-image-2", "chatgpt-image-latest", "dall-e-3", "gpt-image-1")}
    assert sync["dalle2"] == {"url_downloads": True, "b64_json": None}
    assert sync["no_model"] == {"url": None, "size": [64, 64]}
    assert sync["fields"] == {"count": 2, "quality": "xhigh"}
    assert sync["stream"] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert sync["unknown"] == {"status": 404, "code": "model_not_found"}
    assert sync["svg"] == {"status": 400, "param": "output_format"}
    assert run == {"dalle3_url_downloads": True, "modern": [64, 64], "quality": "max",
                   "stream": ["image_generation.partial_image", "image_generation.completed"]}


def test_newest_python_sdk_sync_and_async(fake_server):
    seen = run_client([sys.executable, str(COMPAT / "python_sdk.py"), fake_server.url + "/v1"])
    check_python_sdk(seen, pinned("requirements-test.txt"))


def test_oldest_claimed_python_sdk_1x_sync_and_async(fake_server):
    if not (OLD_SDK_DIR / "openai").is_dir():
        pytest.fail(f"{OLD_SDK_DIR} is missing: run scripts/install.sh --test")
    seen = run_client([sys.executable, str(COMPAT / "python_sdk.py"), fake_server.url + "/v1"],
                      env={"PYTHONPATH": str(OLD_SDK_DIR)})
    check_python_sdk(seen, pinned("requirements-openai-1x.txt"))


def test_official_node_sdk(fake_server):
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm are not installed: the official node SDK cannot run here")
    if not (NODE_SDK_DIR / "node_modules" / "openai").is_dir():
        pytest.fail(f"{NODE_SDK_DIR} is missing: run scripts/install.sh --test")
    seen = run_client(["node", str(COMPAT / "node_sdk.mjs"), fake_server.url + "/v1", str(NODE_SDK_DIR)])
    assert seen["modern"] == {"count": 2, "quality": "xhigh", "b64": seen["modern"]["b64"], "url": None}
    assert all(length > 0 for length in seen["modern"]["b64"])
    assert seen["dalle"]["b64"] is None and seen["dalle"]["status"] == 200 and seen["dalle"]["png"] is True
    assert seen["stream"] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert seen["unknown"] == {"status": 404, "code": "model_not_found"}
    assert seen["gif"] == {"status": 400, "param": "output_format"}


# -- the WebSocket protocol as documented ---------------------------------------------------------

async def recv(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def until_final(ws, job_id: str) -> list[dict]:
    """Every message of the job up to and including its completed/failed status."""
    seen = []
    while True:
        message = await recv(ws)
        if message.get("job_id") == job_id:
            seen.append(message)
            if message.get("type") == "job_status" and message["status"] in ("completed", "failed"):
                return seen


async def create(ws, request_id: str) -> dict:
    params = {"prompt": "one job for two clients", "width": 64, "height": 64, "seed": 5}
    await ws.send(json.dumps({"type": "create_job", "request_id": request_id, "params": params}))
    return await recv(ws)


def test_each_client_sees_its_own_request_id_on_every_push_of_a_shared_job(tmp_path):
    gate = threading.Event()  # holds the job at its first step until both clients follow it
    with live(tmp_path, generator=FakeGenerator(gate=gate)) as server:
        async def body():
            async with connect(f"{server.ws_url}/api/ws?client_id=one") as one, \
                    connect(f"{server.ws_url}/api/ws?client_id=two") as two:
                first, second = await create(one, "r1"), await create(two, "r2")
                assert first["job_id"] == second["job_id"]  # deduplicated: one job
                gate.set()
                return first, second, await until_final(one, first["job_id"]), await until_final(two, first["job_id"])

        try:
            first, second, seen_one, seen_two = run_async(body(), 45)
        finally:
            gate.set()
        download = httpx.get(server.url + seen_one[-1]["result"]["url"])
    assert download.status_code == 200 and png_bytes(download.content)
    assert (first["request_id"], second["request_id"]) == ("r1", "r2")
    for seen, request_id in ((seen_one, "r1"), (seen_two, "r2")):
        statuses = [m for m in seen if m["type"] == "job_status"]
        assert [m["status"] for m in statuses][-2:] == ["generated", "completed"]
        assert all(m["request_id"] == request_id for m in statuses)
        assert all(m.get("request_id", request_id) == request_id for m in seen)
        result = statuses[-1]["result"]
        assert result["path"] == result["local_path"] == f"outputs/{result['filename']}"
        assert result["url"] == f"/api/image/{result['filename']}" and result["seed"] == 5
