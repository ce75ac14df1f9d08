"""LoRA adapters through the public interfaces of a real server over the tiny Z-Image (and the tiny
CogView4, selected by ``model``): GET /v1/loras,
the ``loras`` field on generations (official SDK), edits (multipart) and WebSocket create_job; job
identity (weights, file content), dedup, and a 400 with ``param`` for every bad input while the
server keeps serving."""

from __future__ import annotations

import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

import httpx
import openai
import pytest
import websockets
from PIL import Image

from server.bootstrap import NO_UPSCALER
from server.core.loras import LoraDirectory
from server.inference.loras import Adapters
from server.model import DiffusersGenerator
from tests.conftest import SHARED_CACHE, live, run_async
from tests.lora_helpers import write_adapter, write_broken, write_unrelated

pytest.importorskip("peft")


class CountingGenerator(DiffusersGenerator):
    calls = 0

    def generate(self, request, on_step, is_cancelled):
        CountingGenerator.calls += 1
        return super().generate(request, on_step, is_cancelled)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-server")
    root = tmp / "loras"
    write_adapter(root / "alpha.safetensors", SHARED_CACHE, seed=1)
    write_adapter(root / "beta.safetensors", SHARED_CACHE, seed=2)
    write_unrelated(root / "junk.safetensors")
    write_broken(root / "broken.safetensors", SHARED_CACHE)
    write_adapter(root / "cv_alpha.safetensors", SHARED_CACHE, seed=1, model="cogview4")
    write_adapter(root / "cv_kohya.safetensors", SHARED_CACHE, seed=1, model="cogview4", layout="kohya")
    write_broken(root / "cv_broken.safetensors", SHARED_CACHE, model="cogview4")
    generator = CountingGenerator(SHARED_CACHE, device="cpu",
                                  adapters=Adapters(LoraDirectory(root), max_count=4, max_bytes=1 << 30))
    with live(tmp, generator=generator, upscaler=NO_UPSCALER, lora_dir=root, max_loras=2,
              extra_models=["tiny-cogview4"], max_resident_models=2) as running:
        running.lora_root = root
        yield running


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def generate(server, loras=None, **extra):
    body = {"seed": 5, "num_inference_steps": 2, **extra}
    if loras is not None:
        body["loras"] = loras
    return client(server).images.generate(prompt="a lighthouse", size="64x64", extra_body=body)


def listing(server) -> dict:
    return {item["name"]: item for item in httpx.get(server.url + "/v1/loras").json()["data"]}


def test_listing_use_identity_and_dedup(server):
    before = listing(server)
    assert before["alpha"]["models"] == ["tiny-z-image"] and before["junk"]["models"] == []
    assert before["alpha"]["size"] == (server.lora_root / "alpha.safetensors").stat().st_size
    plain = generate(server)
    first = generate(server, [{"name": "alpha", "weight": 1.0}])
    calls = CountingGenerator.calls
    again = generate(server, [{"name": "alpha", "weight": 1.0}])
    assert again.job_id == first.job_id and CountingGenerator.calls == calls  # one generation
    assert first.data[0].b64_json != plain.data[0].b64_json
    half = generate(server, [{"name": "alpha", "weight": 0.5}])
    assert half.job_id not in (first.job_id, plain.job_id)
    assert listing(server)["alpha"]["loaded"] is True
    assert generate(server).data[0].b64_json == plain.data[0].b64_json


def test_replacing_the_file_changes_the_job_id(server, tmp_path):
    target = server.lora_root / "gamma.safetensors"
    write_adapter(target, SHARED_CACHE, seed=4)
    first = generate(server, [{"name": "gamma"}])
    replacement = write_adapter(tmp_path / "gamma.safetensors", SHARED_CACHE, seed=5)
    os.replace(replacement, target)
    second = generate(server, [{"name": "gamma"}])
    assert second.job_id != first.job_id and second.data[0].b64_json != first.data[0].b64_json


@pytest.mark.parametrize("loras, extra, param", [
    ([{"name": "nope"}], {}, "loras[0].name"),
    ([{"name": "../alpha"}], {}, "loras[0].name"),
    ([{"name": "alpha"}, {"name": "beta"}, {"name": "gamma"}], {}, "loras"),
    ([{"name": "alpha", "weight": 2.5}], {}, "loras[0].weight"),
    ([{"name": "junk"}], {}, "loras[0].name"),
    ([{"name": "alpha"}, {"name": "alpha"}], {}, "loras[1].name"),
    ([{"name": "alpha"}], {"model": "tiny-cogview4"}, "loras[0].name"),
    ([{"name": "cv_alpha"}], {}, "loras[0].name"),  # a CogView4 adapter for the Z-Image
    ([{"name": "cv_kohya"}], {"model": "tiny-cogview4"}, "loras[0].name"),  # a layout CogView4's loader cannot read
    ([{"name": "broken"}], {}, "loras"),  # passes the header check, fails to load on the GPU thread
    ([{"name": "cv_broken"}], {"model": "tiny-cogview4"}, "loras"),
])
def test_bad_input_is_a_400_naming_the_param(server, loras, extra, param):
    with pytest.raises(openai.BadRequestError) as caught:
        generate(server, loras, **extra)
    assert caught.value.status_code == 400 and caught.value.body["param"] == param
    plain = generate(server, seed=11)
    assert generate(server, [{"name": "alpha", "weight": 0.0}], seed=11).data[0].b64_json == plain.data[0].b64_json


def test_cogview4_adapters_through_the_sdk(server):
    """Weight 1 changes the CogView4 image, weight 0 does not, and a job without adapters that runs
    right after a weight-1 job (``n=2``: a new job whose first image has the same seed) is the one before."""
    assert listing(server)["cv_alpha"]["models"] == ["tiny-cogview4"]
    assert listing(server)["cv_kohya"]["models"] == []
    plain = generate(server, model="tiny-cogview4", seed=21)
    zero = generate(server, [{"name": "cv_alpha", "weight": 0.0}], model="tiny-cogview4", seed=21)
    adapted = generate(server, [{"name": "cv_alpha", "weight": 1.0}], model="tiny-cogview4", seed=21)
    assert len({plain.job_id, adapted.job_id, zero.job_id}) == 3
    assert adapted.data[0].b64_json != plain.data[0].b64_json
    assert zero.data[0].b64_json == plain.data[0].b64_json
    assert listing(server)["cv_alpha"]["loaded"] is True
    after = client(server).images.generate(prompt="a lighthouse", size="64x64", model="tiny-cogview4", n=2,
                                           extra_body={"seed": 21, "num_inference_steps": 2})
    assert after.job_id != plain.job_id and after.data[0].b64_json == plain.data[0].b64_json


def test_edits_take_loras_as_json_text(server):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 90, 160)).save(buffer, format="PNG")
    files = {"image": ("in.png", buffer.getvalue(), "image/png")}

    def edit(loras=None):
        data = {"prompt": "at night", "seed": "3", "num_inference_steps": "2"}
        if loras is not None:
            data["loras"] = json.dumps(loras)
        return httpx.post(server.url + "/v1/images/edits", data=data, files=files, timeout=60)

    plain, adapted = edit(), edit([{"name": "beta", "weight": 0.8}])
    assert plain.status_code == adapted.status_code == 200
    assert adapted.json()["job_id"] != plain.json()["job_id"]
    assert adapted.json()["data"][0]["b64_json"] != plain.json()["data"][0]["b64_json"]
    bad = edit([{"name": "nope"}])
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "loras[0].name"


def test_websocket_create_job_with_loras(server):
    async def session():
        async with websockets.connect(server.ws_url + "/api/ws?client_id=lora-ws") as ws:
            params = {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "upscale": False}
            await ws.send(json.dumps({"type": "create_job", "request_id": "bad", "params": {
                **params, "loras": [{"name": "nope", "weight": 1}]}}))
            error = json.loads(await ws.recv())
            assert error["type"] == "error" and error.get("param") == "loras[0].name", error
            await ws.send(json.dumps({"type": "create_job", "request_id": "good", "params": {
                **params, "loras": [{"name": "beta", "weight": 1}]}}))
            while True:
                message = json.loads(await ws.recv())
                if message.get("status") in ("completed", "failed", "cancelled"):
                    return message

    assert run_async(session())["status"] == "completed"


def test_without_lora_dir_the_feature_is_off(fake_server):
    assert httpx.get(fake_server.url + "/v1/loras").json() == {"object": "list", "data": []}
    response = httpx.post(fake_server.url + "/v1/images/generations",
                          json={"prompt": "x", "size": "64x64", "loras": [{"name": "alpha"}]})
    assert response.status_code == 400 and "--lora-dir" in response.json()["error"]["message"]
    assert response.json()["error"]["param"] == "loras[0].name"
    plain = httpx.post(fake_server.url + "/v1/images/generations", json={"prompt": "x", "size": "64x64", "loras": []})
    assert plain.status_code == 200
