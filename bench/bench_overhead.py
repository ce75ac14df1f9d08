"""Goal 2 - server overhead: one non-streamed HTTP request / the raw ``pipe(...)`` call, in one process.

One DiffusersGenerator (tiny-z-image) is shared by two real apps served by uvicorn on loopback
(threads of this process): preview-method ``fast`` (the default) and ``none``. A third app serves a
'zero-time model' that returns the very image the raw pipe made, instantly, after 9 step callbacks:
its request time is the server's own cost per request, with no model at all. Each repeat runs
every variant once, interleaved (alternating order), with a fresh seed:
  raw          - pipe(prompt, size, steps, guidance 0, generator=seed, output_type="pil") in-process
  url_fast / b64_fast - POST /v1/images/generations, response_format url / b64_json, previews fast
  url_none / b64_none - the same with previews off
  zero_url / zero_b64 - the zero-time model
Then the pieces of the added time are timed in isolation on the same image: PNG encode (level 3,
the server's; 1 and 6 for comparison), atomic write with fsync, read back + base64, JSON body,
one fast preview (x0 estimate + latent->RGB + PNG level 1 + base64), a small HTTP round trip.

    .venv/bin/python bench/bench_overhead.py [--sizes 256,512] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import CACHE, ThreadServer, machine, med, r, save  # noqa: E402

import httpx  # noqa: E402

from server.core import files  # noqa: E402
from server.app import NO_UPSCALER, create_app  # noqa: E402
from server.config import Settings  # noqa: E402
from server.testing.fakes import FakeGenerator  # noqa: E402
from server.model import DiffusersGenerator  # noqa: E402

PROMPT = "a lighthouse at dusk"


class ReplayGenerator(FakeGenerator):
    """A zero-time model: 9 step callbacks (with the fake's small previews), then the stored image."""

    def __init__(self):
        super().__init__(step_s=0.0)
        self.image = None

    def generate(self, request, on_step, is_cancelled):
        super().generate(request, on_step, is_cancelled)
        return [self.image.copy() for _ in range(request.n)]


def raw_call(pipe, size: int, steps: int, seed: int):
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt=[PROMPT], width=size, height=size, num_inference_steps=steps, guidance_scale=0.0,
                generator=generator, output_type="pil").images[0]


def http_call(client: httpx.Client, url: str, size: int, steps: int, seed: int, fmt: str) -> None:
    response = client.post(url + "/v1/images/generations", json={
        "prompt": PROMPT, "model": "tiny-z-image", "size": f"{size}x{size}", "seed": seed,
        "num_inference_steps": steps, "response_format": fmt}, timeout=300)
    response.raise_for_status()
    item = response.json()["data"][0]
    if fmt == "b64_json":
        assert len(item["b64_json"]) > 100
    else:
        assert item["url"]


def timed(fn, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()``."""
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return r(med(samples), 2)


def pieces(image, pipe, client: httpx.Client, url: str, tmp: Path) -> dict:
    """Each part of the server's added work, timed alone on the image the pipe made."""
    import torch

    from server.inference.previews import estimate_x0, render_preview
    from server.openai_api.schemas import ImageData, ImagesResponse, InputTokensDetails, Usage

    png3 = files.encode_image(image, "png", png_level=3)
    b64 = files.to_b64(png3)
    side = image.width // 8
    prev, cur = torch.randn(1, 16, side, side), torch.randn(1, 16, side, side)

    def preview() -> None:
        x0 = estimate_x0(prev, cur, 0.5, 0.4)
        small = render_preview("fast", pipe, x0, 512)
        files.to_b64(files.encode_image(small, "png", png_level=1))

    def json_body() -> None:
        body = ImagesResponse(created=0, data=[ImageData(b64_json=b64, seed=1)], size="x", output_format="png",
                              quality="auto", job_id="0" * 64,
                              usage=Usage(input_tokens=4, output_tokens=256, total_tokens=260,
                                          input_tokens_details=InputTokensDetails(text_tokens=4, image_tokens=0)))
        json.dumps(body.model_dump(exclude_none=True)).encode()

    out_dir = tmp / "pieces"
    target = files.write_atomic(out_dir, "piece.png", png3)
    return {
        "png_bytes": len(png3),
        "png_encode_level1_ms": timed(lambda: files.encode_image(image, "png", png_level=1)),
        "png_encode_level3_ms": timed(lambda: files.encode_image(image, "png", png_level=3)),
        "png_encode_level6_ms": timed(lambda: files.encode_image(image, "png", png_level=6)),
        "write_atomic_fsync_ms": timed(lambda: files.write_atomic(out_dir, "piece.png", png3)),
        "read_and_base64_ms": timed(lambda: files.to_b64(files.read_as(target, "png"))),
        "json_body_b64_ms": timed(json_body),
        "fast_preview_one_ms": timed(preview),
        "http_roundtrip_get_models_ms": timed(lambda: client.get(url + "/v1/models").raise_for_status(), 20),
    }


def build_apps(tmp: Path, generator, replay):
    apps = {}
    for name, method, gen in (("fast", "fast", generator), ("none", "none", generator), ("zero", "fast", replay)):
        settings = Settings(output_dir=tmp / name, cache_dir=CACHE, model="tiny-z-image", preview_method=method,
                            shutdown_grace_s=2.0)
        apps[name] = create_app(settings, generator=gen, upscaler=NO_UPSCALER, default_model="tiny-z-image")
    return apps


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--pieces-sizes", default="1024", help="sizes where only the pieces are timed")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random()
    generator, replay = DiffusersGenerator(CACHE, device="cpu"), ReplayGenerator()
    pipe = generator.pipeline_for("tiny-z-image")
    results: dict = {"machine": machine(), "model": "tiny-z-image (random weights, fp32, CPU)", "steps": args.steps,
                     "repeats": args.repeats, "median": {}, "pieces": {}, "raw": {}}
    with tempfile.TemporaryDirectory() as tmp_name, httpx.Client() as client:
        tmp = Path(tmp_name)
        apps = build_apps(tmp, generator, replay)
        servers = {name: ThreadServer(app).__enter__() for name, app in apps.items()}
        try:
            variants = {
                "raw": lambda size, seed: raw_call(pipe, size, args.steps, seed),
                **{f"{fmt_name}_{srv}": (lambda size, seed, s=srv, f=fmt: http_call(client, servers[s].url, size, args.steps, seed, f))
                   for srv in ("fast", "none", "zero") for fmt_name, fmt in (("url", "url"), ("b64", "b64_json"))},
            }
            for size in sizes:
                replay.image = raw_call(pipe, size, args.steps, 1)
                for fn in variants.values():  # warm-up
                    fn(size, rng.randrange(1 << 40))
                samples = {name: [] for name in variants}
                for rep in range(args.repeats):
                    order = list(variants.items())
                    for name, fn in (order if rep % 2 == 0 else order[::-1]):
                        started = time.perf_counter()
                        fn(size, rng.randrange(1 << 40))
                        samples[name].append(time.perf_counter() - started)
                medians = {name: r(med(v) * 1000, 2) for name, v in samples.items()}
                raw_ms = medians["raw"]
                row = {"ms": medians,
                       "ratio_vs_raw": {k: r(v / raw_ms, 3) for k, v in medians.items() if k != "raw"},
                       "added_ms_vs_raw": {k: r(v - raw_ms, 1) for k, v in medians.items() if k != "raw"}}
                results["median"][str(size)] = row
                results["raw"][str(size)] = {k: [r(x * 1000, 2) for x in v] for k, v in samples.items()}
                results["pieces"][str(size)] = pieces(replay.image, pipe, client, servers["fast"].url, tmp)
            for size in [int(s) for s in args.pieces_sizes.split(",") if s]:
                image = raw_call(pipe, size, args.steps, 1)
                results["pieces"][str(size)] = pieces(image, pipe, client, servers["fast"].url, tmp)
        finally:
            for server in servers.values():
                server.__exit__()
    save("overhead", results)


if __name__ == "__main__":
    main()
