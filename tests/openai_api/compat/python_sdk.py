"""Drives whichever official ``openai`` Python SDK is importable, unchanged, against a live server,
sync and async; prints one JSON object of what it saw for tests/openai_api/test_compat.py to judge.

Run as a subprocess (``python python_sdk.py <base_url>``) so that the old 1.x SDK can come first
on PYTHONPATH without replacing the newest one in the test process.
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import sys
import urllib.request

import openai

NEW_FIELDS = {"complexity": "low", "moderation": "low", "safety_identifier": "user-123", "style": "natural",
              "user": "legacy-user"}


def field_kwargs(generate) -> dict:
    """The newer request fields: as keyword arguments where this SDK version has them, otherwise the
    way its users reach them, ``extra_body``."""
    known = inspect.signature(generate).parameters
    given = {k: v for k, v in NEW_FIELDS.items() if k in known}
    extra = {k: v for k, v in NEW_FIELDS.items() if k not in known}
    return {**given, "extra_body": extra} if extra else given


def png_size(b64: str) -> list[int]:
    data = base64.b64decode(b64)
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return [int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")]


def download(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status == 200 and response.read(8) == b"\x89PNG\r\n\x1a\n"


def run_sync(base_url: str) -> dict:
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    out: dict = {"models": {}}
    for name in ("gpt-image-1.5", "gpt-image-2", "chatgpt-image-latest", "dall-e-3", "gpt-image-1"):
        result = client.images.generate(model=name, prompt="a lighthouse", size="64x64", response_format="b64_json")
        out["models"][name] = png_size(result.data[0].b64_json)
    dalle = client.images.generate(model="dall-e-2", prompt="x", n=1, size="64x64")
    out["dalle2"] = {"url_downloads": download(dalle.data[0].url), "b64_json": dalle.data[0].b64_json}
    plain = client.images.generate(prompt="x", n=1, size="64x64")
    out["no_model"] = {"url": plain.data[0].url, "size": png_size(plain.data[0].b64_json)}
    fields = client.images.generate(prompt="x", size="64x64", quality="xhigh", n=2,
                                    **field_kwargs(client.images.generate))
    out["fields"] = {"count": len(fields.data), "quality": fields.quality}
    out["stream"] = [event.type for event in client.images.generate(
        model="gpt-image-2", prompt="x", size="64x64", stream=True, partial_images=2)]
    try:
        client.images.generate(model="stable-diffusion-9", prompt="x")
        out["unknown"] = None
    except openai.NotFoundError as exc:
        out["unknown"] = {"status": exc.status_code, "code": exc.code}
    try:
        client.images.generate(prompt="x", output_format="svg")
        out["svg"] = None
    except openai.BadRequestError as exc:
        out["svg"] = {"status": exc.status_code, "param": exc.param}
    return out


async def run_async(base_url: str) -> dict:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    dalle = await client.images.generate(model="dall-e-3", prompt="x", size="64x64")
    modern = await client.images.generate(model="gpt-image-2", prompt="x", size="64x64", quality="max",
                                          **field_kwargs(client.images.generate))
    stream = await client.images.generate(model="gpt-image-1.5", prompt="x", size="64x64", stream=True,
                                          partial_images=1)
    events = [event.type async for event in stream]
    await client.close()
    return {"dalle3_url_downloads": await asyncio.to_thread(download, dalle.data[0].url),
            "modern": png_size(modern.data[0].b64_json), "quality": modern.quality, "stream": events}


if __name__ == "__main__":
    base = sys.argv[1]
    print(json.dumps({"version": openai.__version__, "sync": run_sync(base), "async": asyncio.run(run_async(base))}))
