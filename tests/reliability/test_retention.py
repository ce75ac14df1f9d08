"""Retention (issue 16 item 2): job records of cancelled and never-started jobs, client links,
finished jobs past their age and images beyond the size budget are pruned on a schedule; a
record never outlives its files, so a pruned job is simply run again; ``/metrics`` shows what was
pruned and what is kept."""

from __future__ import annotations

import re
import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
from PIL import Image

from server.core.files import encode_image
from server.testing.fakes import FakeGenerator
from tests.reliability.helpers import TIMEOUT, live, run, wait_until, ws_client

URL = "/v1/images/generations"
PROMPT = "x" * 4000  # the largest a prompt may be: the most a row can cost


def job_rows(server) -> int:
    with sqlite3.connect(server.app.state.settings.db_path) as conn:
        return conn.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


def link_rows(server) -> int:
    with sqlite3.connect(server.app.state.settings.db_path) as conn:
        return conn.execute("SELECT COUNT(*) FROM client_jobs").fetchone()[0]


def metric(server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=TIMEOUT).text
    match = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(match.group(1)) if match else -1.0


def test_create_cancel_pairs_do_not_grow_the_database(tmp_path):
    gate = threading.Event()
    with live(tmp_path, generator=FakeGenerator(gate=gate), max_queue=1000, max_queue_per_client=1000,
              retention_unstarted_s=0.0, retention_interval_s=0.2) as server:
        async def pairs(count: int) -> int:
            async with ws_client(server, "churn") as client:
                running = await client.create("holds the GPU", upscale=False)
                await client.until_status(running["job_id"], "processing")
                for seed in range(count):
                    created = await client.create(PROMPT, seed=seed, upscale=False)
                    await client.request(type="cancel_job", job_id=created["job_id"])
                return running["job_id"]

        running = run(pairs(300))
        pruned = wait_until(lambda: job_rows(server) == 1)
        links = link_rows(server)
        pruned_jobs = metric(server, 't2i_pruned_total{kind="jobs"}')
        kept = metric(server, "t2i_kept_jobs")
        gate.set()
    assert pruned, f"{job_rows(server)} rows left"
    assert links == 1  # only the running job's link
    assert pruned_jobs >= 300 and kept == 1
    assert running


def noise_png_bytes() -> int:
    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return len(encode_image(Image.fromarray(pixels), "png", png_level=3))


def test_the_image_budget_prunes_the_oldest_jobs_whole(tmp_path):
    budget = int(2.5 * noise_png_bytes())  # room for two 64x64 noise images
    with live(tmp_path, generator=FakeGenerator(noise=True), output_max_bytes=budget, retention_min_age_s=0.0,
              retention_interval_s=0.2) as server:
        body = {"size": "64x64", "num_inference_steps": 2, "upscale": False, "response_format": "url"}
        answers = [httpx.post(server.url + URL, json={**body, "prompt": f"picture {i}", "seed": i},
                              timeout=TIMEOUT).json() for i in range(4)]
        outputs = server.app.state.settings.output_dir
        assert wait_until(lambda: sum(p.stat().st_size for p in outputs.glob("*.png")) <= budget)
        fetched = [httpx.get(a["data"][0]["url"], timeout=TIMEOUT).status_code for a in answers]

        async def statuses():
            async with ws_client(server) as client:
                return [(await client.request(type="get_status", job_id=a["job_id"])).get("code", "found")
                        for a in answers]

        known = run(statuses())
        calls_before = len(server.generator.calls)
        again = httpx.post(server.url + URL, json={**body, "prompt": "picture 0", "seed": 0}, timeout=TIMEOUT)
        kept_bytes = metric(server, "t2i_kept_image_bytes")
    assert fetched == [404, 404, 200, 200]  # the oldest went first
    assert known == ["job_not_found", "job_not_found", "found", "found"]  # with their records
    # Pruned whole: the same request is generated again (same job id), not answered with a dead link.
    assert again.status_code == 200 and again.json()["job_id"] == answers[0]["job_id"]
    assert len(server.generator.calls) == calls_before + 1
    assert 0 < kept_bytes <= budget


def test_finished_jobs_expire_with_their_files(tmp_path):
    with live(tmp_path, retention_finished_s=1.0, retention_interval_s=0.2) as server:
        answer = httpx.post(server.url + URL, json={"prompt": "short-lived", "size": "64x64", "seed": 1,
                                                    "response_format": "url"}, timeout=TIMEOUT).json()
        url = answer["data"][0]["url"]  # (that a fresh URL serves its file: the budget test above)
        gone = wait_until(lambda: httpx.get(url, timeout=TIMEOUT).status_code == 404)
        rows = job_rows(server)
        calls_before = len(server.generator.calls)
        again = httpx.post(server.url + URL, json={"prompt": "short-lived", "size": "64x64", "seed": 1,
                                                   "response_format": "url"}, timeout=TIMEOUT)
    assert gone and rows == 0
    assert again.status_code == 200 and len(server.generator.calls) == calls_before + 1


def test_edit_inputs_go_with_the_last_job_that_refers_to_them(tmp_path):
    gate = threading.Event()
    gate.set()
    with live(tmp_path, generator=FakeGenerator(gate=gate), retention_finished_s=0.0, retention_min_age_s=0.0,
              retention_interval_s=0.2) as server:
        stored = server.app.state.settings.output_dir / "inputs"
        sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)

        def edit(seed: int):  # url: the answer does not read the image, which retention may take at once
            picture = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))
            return sdk.images.edit(image=("in.png", encode_image(picture, "png"), "image/png"), prompt="x",
                                   response_format="url", extra_body={"seed": seed})

        edit(1)
        assert wait_until(lambda: not list(stored.glob("*.png"))), "the input went with its pruned job"
        gate.clear()  # the next job holds the GPU: its record, and so its input, is kept
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(edit, 2)
            assert wait_until(lambda: server.engine.counts().get("processing") == 1)
            kept_after_a_run = wait_until(lambda: metric(server, "t2i_kept_jobs") == 1)
            inputs_while_held = len(list(stored.glob("*.png")))
            gate.set()
            held.result(TIMEOUT)
        assert wait_until(lambda: not list(stored.glob("*.png")))
        pruned_inputs = metric(server, 't2i_pruned_total{kind="inputs"}')
    assert kept_after_a_run and inputs_while_held == 1
    assert pruned_inputs == 2
