"""Client-side helpers for the multi-process scenarios: real HTTP requests to API nodes, and waits
on a job's Redis event stream (XREAD BLOCK: woken by the event itself, never a sleep)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import httpx

from server.app import build_catalog
from server.config import Settings
from server.routes_openai import plan_request
from server.openai_api.schemas import ImageGenerationRequest

PREFIX = "t2i:"
TIMEOUT = 30.0


def body(prompt: str, steps: int = 10, seed: int = 1, **extra) -> dict:
    return {"prompt": prompt, "model": "tiny-z-image", "size": "64x64", "num_inference_steps": steps, "seed": seed,
            "response_format": "url", **extra}


def job_id_of(payload: dict) -> str:
    settings = Settings(model="tiny-z-image")
    catalog = build_catalog(settings, "tiny-z-image")
    return plan_request(ImageGenerationRequest(**payload), catalog, settings).spec.job_id


def post_in_background(url: str, payload: dict, timeout: float = 60.0) -> Future:
    """POST /v1/images/generations on a thread; the future holds the httpx.Response."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(httpx.post(url + "/v1/images/generations", json=payload, timeout=timeout))
        except BaseException as exc:  # handed to the test through the future
            future.set_exception(exc)

    threading.Thread(target=run, daemon=True).start()
    return future


def events(client, job_id: str) -> list[dict]:
    return [fields for _, fields in client.xrange(f"{PREFIX}ev:{job_id}")]


def statuses(client, job_id: str) -> list[str]:
    return [e["status"] for e in events(client, job_id) if e.get("k") == "status"]


def wait_event(client, job_id: str, predicate, timeout: float = TIMEOUT) -> dict:
    """The first event of the job's stream (from its start) that satisfies ``predicate``."""
    cursor, deadline = "0-0", time.monotonic() + timeout
    while time.monotonic() < deadline:
        reply = client.xread({f"{PREFIX}ev:{job_id}": cursor}, block=200, count=100)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                cursor = entry_id
                if predicate(fields):
                    return fields
    raise TimeoutError(f"no matching event for job {job_id[:12]} within {timeout} s")


def wait_status(client, job_id: str, status: str, timeout: float = TIMEOUT) -> dict:
    return wait_event(client, job_id, lambda f: f.get("k") == "status" and f.get("status") == status, timeout)


def wait_step(client, job_id: str, step: int, timeout: float = TIMEOUT) -> dict:
    import json

    return wait_event(client, job_id, lambda f: f.get("k") == "progress" and json.loads(f["v"])["step"] >= step, timeout)


def job_hash(client, job_id: str) -> dict:
    return client.hgetall(f"{PREFIX}job:{job_id}")
