#!/usr/bin/env python3
"""Example client for the t2i server: streaming and batch over HTTP, jobs over the WebSocket.

    python client_example.py "a lighthouse at dusk" --stream --out shots/ [--url URL] [--steps 9]
    python client_example.py "a lighthouse at dusk" --ws --upscale --out shots/

Library use::

    async with T2IClient("http://127.0.0.1:8000") as client:
        async for event in client.generate_image("a cat", stream=True, num_inference_steps=9):
            ...  # step-dialect dicts: step, total_steps, progress, image (base64 PNG), is_final, ...

``generate_image(stream=True)`` yields the server's step events as they arrive (previews first,
then one ``is_final`` event per image); ``stream=False`` yields one dict per image in the same
shape (``is_final`` true), built from the non-streaming response. Errors raise ``T2IError``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import httpx
from websockets.exceptions import ConnectionClosed, WebSocketException

# Friendly names accepted by generate_image/create_job besides the wire names.
HTTP_ALIASES = {"steps": "num_inference_steps", "guidance": "guidance_scale", "variant": "model_type"}


class T2IError(Exception):
    """An error the server reported (HTTP status or an error event inside a stream)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.code, self.param = message, status, code, param

    @classmethod
    def from_body(cls, body: Any, status: int | None = None) -> "T2IError":
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            return cls(err.get("message") or "error", status, err.get("code"), err.get("param"))
        return cls(f"HTTP {status}: {str(body)[:300]}", status)


def save_base64_image(b64: str, path: str | Path) -> Path:
    """Decode ``b64`` (plain base64 or a ``data:`` URL) into ``path``; parents are created."""
    if b64.startswith("data:"):
        b64 = b64.split(",", 1)[1]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(b64))
    return path


def http_body(prompt: str, stream: bool, params: dict) -> dict:
    """The JSON body of ``POST /v1/images/generations``; ``width``/``height`` become ``size``."""
    params = {HTTP_ALIASES.get(k, k): v for k, v in params.items() if v is not None}
    width, height = params.pop("width", None), params.pop("height", None)
    if width is not None or height is not None:
        params["size"] = f"{width}x{height}"
    return {"prompt": prompt, "response_format": "b64_json", **params, "stream": stream}


async def sse_data(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data`` payload of each server-sent event (multi-line data joined with newlines)."""
    lines: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if lines:
                yield "\n".join(lines)
                lines = []
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
        # "event:", "id:", "retry:" and ":" comments (keep-alive pings) carry nothing we need
    if lines:
        yield "\n".join(lines)


class T2IClient:
    """Async HTTP client for the OpenAI-compatible endpoint (with this server's extensions)."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                       timeout=httpx.Timeout(timeout, connect=10.0))

    async def __aenter__(self) -> "T2IClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def health(self) -> dict:
        return await self._get_json("/health")

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._get_json("/v1/models"))["data"]]

    async def download(self, filename: str) -> bytes:
        """The stored PNG ``GET /api/image/{filename}`` (file names come from WebSocket results)."""
        response = await self._http.get(f"/api/image/{filename}")
        if response.status_code != 200:
            raise T2IError.from_body(_json_or_text(response), response.status_code)
        return response.content

    async def generate_image(self, prompt: str, stream: bool = True, **params) -> AsyncIterator[dict]:
        """Yield step-dialect dicts; see the module docstring. ``params``: wire names or aliases."""
        body = http_body(prompt, stream, params)
        if not stream:
            response = await self._http.post("/v1/images/generations", json=body)
            data = _json_or_text(response)
            if response.status_code != 200:
                raise T2IError.from_body(data, response.status_code)
            for index, item in enumerate(data["data"]):
                yield {"job_id": data.get("job_id"), "index": index, "is_final": True, "progress": 100.0,
                       "image": item.get("b64_json"), "upscaled_image": item.get("upscaled_b64_json"),
                       "seed": item.get("seed"), "output_format": data.get("output_format", "png"),
                       "timestamp": time.time()}
            return
        async with self._http.stream("POST", "/v1/images/generations", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                raise T2IError.from_body(_json_or_text(response), response.status_code)
            async for data in sse_data(response):
                if data == "[DONE]":
                    return
                event = json.loads(data)
                if event.get("type") == "error" or "error" in event:
                    raise T2IError.from_body(event)
                yield event

    async def _get_json(self, path: str) -> Any:
        response = await self._http.get(path)
        if response.status_code != 200:
            raise T2IError.from_body(_json_or_text(response), response.status_code)
        return response.json()


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


async def websocket_job_example(base_url: str, prompt: str, *, client_id: str | None = None, api_key: str | None = None,
                                on_message: Callable[[dict], None] = lambda m: None,
                                timeout: float = 600.0, **params) -> dict:
    """Create a job over ``WS /api/ws`` and follow it; return the final ``job_status`` message.

    Raises ``T2IError`` when the server answers with an error, or the job fails or is cancelled.
    """
    from websockets.asyncio.client import connect

    ws_url = base_url.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1)
    client_id = client_id or uuid.uuid4().hex
    request_id = uuid.uuid4().hex
    job_params = {HTTP_ALIASES.get(k, k): v for k, v in params.items() if v is not None}
    job_params["steps"] = job_params.pop("num_inference_steps", job_params.get("steps"))
    job_params = {"prompt": prompt, "preview": True, **{k: v for k, v in job_params.items() if v is not None}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    async with connect(f"{ws_url}/api/ws?client_id={client_id}", max_size=2**24, additional_headers=headers) as ws:
        try:
            await ws.send(json.dumps({"type": "create_job", "task_type": "text_to_image",
                                      "request_id": request_id, "params": job_params}))
        except ConnectionClosed:
            pass  # refused at once (bad API key...): the error frame it sent first is read below
        job_id = None
        async with asyncio.timeout(timeout):
            async for raw in ws:
                message = json.loads(raw)
                on_message(message)
                if message.get("type") == "error" and message.get("request_id") in (None, request_id):
                    raise T2IError(message.get("message", "error"), code=message.get("code"))
                if message.get("type") != "job_status":
                    continue
                if job_id is None and message.get("request_id") == request_id:
                    job_id = message["job_id"]
                if message.get("job_id") != job_id:
                    continue
                if message["status"] == "completed":
                    return message
                if message["status"] in ("failed", "cancelled"):
                    raise T2IError(f"job {job_id[:12]} {message['status']}: {message.get('error')}", code=message["status"])
    raise T2IError("the server closed the WebSocket before the job finished")


# -- CLI --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="t2i server example client")
    parser.add_argument("prompt")
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key")
    parser.add_argument("--out", default="client_out", help="folder for previews and final images")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--stream", action="store_true", help="stream step previews over SSE")
    mode.add_argument("--ws", action="store_true", help="run a job over the WebSocket")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--size", help="WxH, e.g. 512x512")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--model")
    parser.add_argument("--model-type")
    parser.add_argument("--negative-prompt")
    parser.add_argument("--guidance", type=float)
    parser.add_argument("--n", type=int)
    parser.add_argument("--upscale", action="store_true")
    return parser.parse_args(argv)


async def run_http(args: argparse.Namespace, params: dict, out: Path) -> int:
    started = last = time.monotonic()
    async with T2IClient(args.url, args.api_key) as client:
        async for event in client.generate_image(args.prompt, stream=args.stream, **params):
            now = time.monotonic()
            index = event.get("index", 0)
            if event.get("is_final"):
                path = save_base64_image(event["image"], out / f"final_{index}.{event.get('output_format', 'png')}")
                if event.get("upscaled_image"):
                    save_base64_image(event["upscaled_image"], out / f"final_{index}_x4.{event.get('output_format', 'png')}")
                label = f"final   image {index}"
            else:
                path = save_base64_image(event["image"], out / f"preview_{index}_{event['step']:03d}.png")
                label = f"step {event['step']:>3}/{event['total_steps']:<3}"
            print(f"{label} {event.get('progress', 0):5.1f}%  t={now - started:7.3f}s  +{now - last:6.3f}s  -> {path}",
                  flush=True)
            last = now
    return 0


async def run_ws(args: argparse.Namespace, params: dict, out: Path) -> int:
    started = time.monotonic()

    def show(message: dict) -> None:
        t = f"t={time.monotonic() - started:7.3f}s"
        kind = message.get("type")
        if kind == "job_progress":
            p = message.get("progress", {})
            print(f"progress {p.get('current_step')}/{p.get('total_steps')} {p.get('percentage')}%  {t}", flush=True)
        elif kind == "job_status":
            print(f"status   {message.get('status'):<10} job {str(message.get('job_id'))[:12]}  {t}", flush=True)
        else:
            print(f"{kind:<8} {t}", flush=True)

    final = await websocket_job_example(args.url, args.prompt, api_key=args.api_key, on_message=show, **params)
    result = final.get("result") or {}
    images = result.get("images") or [result]
    async with T2IClient(args.url, args.api_key) as client:
        for index, image in enumerate(images):
            for key, suffix in (("filename", ""), ("upscaled_filename", "_x4")):
                if image.get(key):
                    path = out / f"final_{index}{suffix}.png"
                    path.write_bytes(await client.download(image[key]))
                    print(f"saved    {path}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    params: dict[str, Any] = {"steps": args.steps, "seed": args.seed, "model": args.model, "model_type": args.model_type,
                              "negative_prompt": args.negative_prompt, "guidance_scale": args.guidance, "n": args.n,
                              "upscale": args.upscale}
    if args.size:
        width, _, height = args.size.lower().partition("x")
        params.update(width=int(width), height=int(height))
    try:
        return asyncio.run(run_ws(args, params, out) if args.ws else run_http(args, params, out))
    except T2IError as exc:
        print(f"error: {exc.message}" + (f" (status {exc.status})" if exc.status else ""), file=sys.stderr)
        return 1
    except (httpx.HTTPError, OSError, WebSocketException) as exc:
        print(f"error: cannot talk to {args.url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
