"""The OpenAI adapter through the official ``openai`` SDK (sync and async) against a real uvicorn."""

from __future__ import annotations

import asyncio
import base64
import io
import threading
from contextlib import ExitStack

import httpx
import openai
import pytest
from PIL import Image

from conftest import LiveServer, make_settings
from server.app import create_app
from server.testing.fakes import FakeGenerator, FakeUpscaler


def client(server, **kwargs) -> openai.OpenAI:
    kwargs.setdefault("api_key", "x")
    return openai.OpenAI(base_url=server.url + "/v1", **kwargs)


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


class StepGate:
    """A FakeGenerator gate: the first ``free`` steps pass, later ones wait until ``open()``."""

    def __init__(self, free: int = 0):
        self.free, self.calls, self.opened, self.lock = free, 0, threading.Event(), threading.Lock()

    def wait(self, timeout=None) -> bool:
        with self.lock:
            self.calls += 1
            if self.calls <= self.free:
                return True
        return self.opened.wait(timeout)

    def open(self) -> None:
        self.opened.set()


@pytest.fixture
def serve(tmp_path):
    """Start extra live servers with their own settings/generator; gates open at teardown."""
    stack, gates = ExitStack(), []

    def start(gate=None, step_s=0.005, **overrides) -> LiveServer:
        generator = FakeGenerator(step_s=step_s, gate=gate)
        settings = make_settings(tmp_path / f"server{len(gates)}", **overrides)
        gates.append(gate or StepGate())
        app = create_app(settings, generator=generator, upscaler=FakeUpscaler(), default_model="tiny-z-image")
        server = stack.enter_context(LiveServer(app))
        server.generator = generator
        return server

    yield start
    for gate in gates:
        gate.open()
    stack.close()


def test_generate_b64_pngs_of_the_requested_size(fake_server):
    result = client(fake_server).images.generate(prompt="a red fox in snow", size="128x96", n=2, extra_body={"seed": 5})
    assert [decode(d.b64_json).size for d in result.data] == [(128, 96), (128, 96)]
    assert decode(result.data[0].b64_json).format == "PNG"
    assert decode(result.data[0].b64_json).tobytes() != decode(result.data[1].b64_json).tobytes()  # seed, seed+1
    assert (result.size, result.output_format, result.background, result.quality) == ("128x96", "png", "opaque", "auto")
    assert result.usage.input_tokens == 5 and result.usage.input_tokens_details.text_tokens == 5
    assert result.usage.total_tokens == 5 + result.usage.output_tokens and result.usage.output_tokens > 0
    assert len(result.job_id) == 64 and result.created > 0


def test_async_client_generates_and_streams(fake_server):
    async def main():
        async with openai.AsyncOpenAI(base_url=fake_server.url + "/v1", api_key="x") as aclient:
            result = await aclient.images.generate(prompt="async cat", size="64x64", quality="low")
            stream = await aclient.images.generate(prompt="async dog", size="64x64", stream=True, partial_images=2)
            events = [event async for event in stream]
        return result, events

    result, events = asyncio.run(main())
    assert decode(result.data[0].b64_json).size == (64, 64) and result.quality == "low"
    assert [(e.type, getattr(e, "partial_image_index", None)) for e in events] == [
        ("image_generation.partial_image", 0), ("image_generation.partial_image", 1), ("image_generation.completed", None)]


def test_response_format_url_downloads_the_image(fake_server):
    result = client(fake_server).images.generate(prompt="a lighthouse", size="96x64", response_format="url",
                                                 extra_body={"upscale": True})
    url = result.data[0].url
    assert url.startswith(fake_server.url + "/api/image/") and result.data[0].b64_json is None
    downloaded = httpx.get(url)
    assert downloaded.status_code == 200 and decode(base64.b64encode(downloaded.content)).size == (96, 64)
    upscaled = httpx.get(result.data[0].upscaled_url)
    assert decode(base64.b64encode(upscaled.content)).size == (384, 256)


def test_public_url_and_output_formats(serve):
    server = serve(public_url="https://images.example.org/")
    sdk = client(server)
    result = sdk.images.generate(prompt="a lake", size="64x64", response_format="url")
    assert result.data[0].url.startswith("https://images.example.org/api/image/")
    jpeg = sdk.images.generate(prompt="a lake", size="64x64", output_format="jpeg", output_compression=60,
                               extra_body={"upscale": True})
    assert decode(jpeg.data[0].b64_json).format == "JPEG" and jpeg.output_format == "jpeg"
    assert decode(jpeg.data[0].upscaled_b64_json).size == (256, 256)


def test_stream_partial_images_then_completed(fake_server):
    stream = client(fake_server).images.generate(prompt="a castle", size="80x64", stream=True, partial_images=2)
    events = list(stream)
    assert [type(e).__name__ for e in events] == ["ImageGenPartialImageEvent", "ImageGenPartialImageEvent",
                                                  "ImageGenCompletedEvent"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(decode(e.b64_json).format == "PNG" for e in events)
    completed = events[-1]
    assert decode(completed.b64_json).size == (80, 64) and completed.size == "80x64"
    assert completed.usage.input_tokens == 2 and completed.output_format == "png" and completed.background == "opaque"
    # Spread evenly over the 9 steps: the fake previews are the final colour scaled by step/9.
    final = decode(completed.b64_json).getpixel((0, 0))
    assert [decode(e.b64_json).getpixel((0, 0)) for e in events[:2]] == [
        tuple(int(c * step / 9) for c in final) for step in (3, 6)]


@pytest.mark.parametrize("kwargs, param", [
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"size": "big"}, "size"),
    ({"size": "4096x4096"}, "size"),
    ({"background": "transparent"}, "background"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_compression": 101}, "output_compression"),
    ({"partial_images": 4}, "partial_images"),
    ({"quality": "ultra"}, "quality"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 5000}, "prompt"),
    ({"extra_body": {"num_inference_steps": 1000}}, "num_inference_steps"),
    ({"extra_body": {"model_type": "int3"}}, "model_type"),
    ({"extra_body": {"seed": -1}}, "seed"),
])
def test_validation_errors_are_400_with_param(fake_server, kwargs, param):
    kwargs = {"prompt": "a cat", **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        client(fake_server, max_retries=0).images.generate(**kwargs)
    assert caught.value.status_code == 400
    assert caught.value.param == param and caught.value.type == "invalid_request_error"
    assert fake_server.generator.calls == []


def test_raw_http_errors_use_the_envelope(fake_server):
    url = fake_server.url + "/v1/images/generations"
    bad_json = httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    missing = httpx.post(url, json={"n": 1, "future_field": True})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "prompt"
    assert "detail" not in missing.json()
    unknown_route = httpx.get(fake_server.url + "/v1/nothing-here")
    assert unknown_route.status_code == 404 and unknown_route.json()["error"]["type"] == "invalid_request_error"
    wrong_method = httpx.get(url)
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"
    nulls = httpx.post(url, json={"prompt": "nulls are defaults", "model": None, "n": None, "size": "64x64",
                                  "quality": None, "stream": None, "seed": None, "unknown_field": {"x": 1}})
    assert nulls.status_code == 200 and len(nulls.json()["data"]) == 1


def test_unexpected_exceptions_are_a_bare_500(tmp_path):
    app = create_app(make_settings(tmp_path), generator=FakeGenerator(), upscaler=FakeUpscaler(),
                     default_model="tiny-z-image")

    async def boom():
        raise RuntimeError("secret detail at /srv/private/path")

    app.add_api_route("/v1/boom", boom)
    with LiveServer(app) as server:
        response = httpx.get(server.url + "/v1/boom")
    assert response.status_code == 500
    assert response.json() == {"error": {"message": "internal server error", "type": "server_error", "param": None,
                                         "code": "internal_error"}}


def test_openapi_describes_the_request_schema(fake_server):
    schema = httpx.get(fake_server.url + "/openapi.json").json()
    request = schema["components"]["schemas"]["ImageGenerationRequest"]
    assert {"prompt", "partial_images", "seed", "upscale", "num_inference_steps"} <= set(request["properties"])
    assert "quality" in request["description"]
    assert httpx.get(fake_server.url + "/docs").status_code == 200


def test_unknown_model_is_404_and_aliases_resolve(fake_server):
    sdk = client(fake_server, max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.images.generate(prompt="a cat", model="no-such-model")
    assert caught.value.code == "model_not_found" and "tiny-z-image" in caught.value.message
    assert decode(sdk.images.generate(prompt="a cat", model="gpt-image-1", size="64x64").data[0].b64_json).size == (64, 64)


def test_models_list_and_retrieve(fake_server):
    sdk = client(fake_server, max_retries=0)
    models = sdk.models.list()
    assert [m.id for m in models.data] == ["tiny-z-image"]
    assert models.data[0].object == "model" and "demo" in models.data[0].owned_by
    assert sdk.models.retrieve("tiny-z-image").id == "tiny-z-image"
    alias = sdk.models.retrieve("gpt-image-1")
    assert alias.id == "gpt-image-1" and alias.root == "tiny-z-image"
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.models.retrieve("org/some-model")  # the SDK sends org%2Fsome-model: it must reach the route
    assert caught.value.code == "model_not_found"


def test_seed_repeats_the_image_from_the_cache(fake_server):
    sdk = client(fake_server)
    first = sdk.images.generate(prompt="a blue bird", size="64x64", extra_body={"seed": 42})
    second = sdk.images.generate(prompt="a blue bird", size="64x64", quality="high", extra_body={"seed": 42})
    assert first.data[0].b64_json == second.data[0].b64_json
    assert first.job_id == second.job_id and second.quality == "high"
    assert len(fake_server.generator.calls) == 1


def test_failed_generation_is_500_and_not_retried(fake_server):
    with pytest.raises(openai.InternalServerError) as caught:
        client(fake_server).images.generate(prompt="fail:oom please", size="64x64")  # default: 2 retries
    assert caught.value.status_code == 500 and caught.value.code == "out_of_memory"
    assert caught.value.response.headers["x-should-retry"] == "false"
    assert len(fake_server.generator.calls) == 1


def test_api_keys(serve):
    server = serve(api_keys=["k1", "k2"])
    raw = httpx.get(server.url + "/v1/models")
    assert raw.status_code == 401 and raw.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, api_key="wrong", max_retries=0).models.list()
    one = client(server, api_key="k1").images.generate(prompt="keyed", size="64x64", extra_body={"seed": 3})
    two = client(server, api_key="k2").images.generate(prompt="keyed", size="64x64", extra_body={"seed": 3})
    assert one.job_id != two.job_id  # jobs are scoped per key
    assert server.call(server.engine.get(one.job_id)).owner is not None


def test_queue_full_is_429_with_retry_after(serve):
    gate = StepGate(free=1)
    server = serve(gate=gate, max_queue=1)
    url = server.url + "/v1/images/generations"
    body = {"prompt": "queued", "size": "64x64", "stream": True, "seed": 1, "num_inference_steps": 10}
    with httpx.Client(timeout=30) as http, http.stream("POST", url, json=body) as running:
        next(line for line in running.iter_lines() if line.startswith("data:"))  # job 1 holds the GPU
        with http.stream("POST", url, json={**body, "seed": 2}) as waiting:  # job 2 fills the queue
            assert waiting.status_code == 200
            with pytest.raises(openai.RateLimitError) as caught:
                client(server, max_retries=0).images.generate(prompt="one too many", size="64x64")
            assert caught.value.response.headers["retry-after"].isdigit()
            assert caught.value.code == "queue_full"
            gate.open()


def test_tiny_model_end_to_end(tiny_server):
    sdk = client(tiny_server)
    result = sdk.images.generate(prompt="tiny noise", size="64x64", extra_body={"seed": 1, "num_inference_steps": 2})
    assert decode(result.data[0].b64_json).size == (64, 64)
    events = list(sdk.images.generate(prompt="tiny noise", size="64x64", stream=True, partial_images=1,
                                      extra_body={"seed": 2, "num_inference_steps": 2}))
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert decode(events[-1].b64_json).size == (64, 64)
