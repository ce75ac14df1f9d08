"""Edits (issue 13): the same img2img edit streamed / not streamed through the server, and the raw
pipeline call (``DiffusersGenerator.generate`` in this process, no server), side by side.

One real server (``python -m server --model tiny-z-image``, default fast previews). Every repeat runs
each variant once, interleaved with alternating order, each with a fresh seed (the cache never
answers); the input is one fixed noise picture at the size measured. Variants:
  raw_pipe    - ZImageImg2ImgPipeline through DiffusersGenerator, previews off: the floor
  edit_plain  - POST /v1/images/edits (multipart), JSON b64_json
  edit_stream - the same with stream=true (step dialect): time to the first preview, and the last byte
Steps: ``--steps`` at the default strength 0.6 (9 -> 6 steps run).

    .venv/bin/python bench/bench_edits.py [--sizes 256,512] [--repeats 7] [--steps 9]
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import CACHE, ServerProc, machine, med, r, save  # noqa: E402

VARIANTS = ("raw_pipe", "edit_plain", "edit_stream")


def picture(size: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.random.RandomState(0).rand(size, size, 3) * 255).astype("uint8")).save(buffer, "PNG")
    return buffer.getvalue()


def over_http(server: ServerProc, image: bytes, steps: int, seed: int, stream: bool) -> dict:
    data = {"prompt": "a lighthouse at dusk", "model": "tiny-z-image", "seed": str(seed),
            "num_inference_steps": str(steps), "response_format": "b64_json", "stream": str(stream).lower()}
    files = {"image": ("in.png", image, "image/png")}
    sent = time.perf_counter()
    first = None
    with httpx.stream("POST", server.url + "/v1/images/edits", data=data, files=files, timeout=300) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]}")
        for line in response.iter_lines():
            if stream and first is None and line.startswith("data: {") and '"is_final":false' in line:
                first = time.perf_counter() - sent
    out = {"wall_s": time.perf_counter() - sent}
    if first is not None:
        out["first_preview_s"] = first
    return out


def raw(generator, stored_dir: Path, sha: str, size: int, steps: int, seed: int) -> dict:
    from server.core import inputs
    from server.core.generation import GenerationRequest

    request = GenerationRequest(model="tiny-z-image", variant=None, prompt="a lighthouse at dusk", negative_prompt=None,
                                width=size, height=size, steps=steps, guidance_scale=0.0, seed=seed,
                                preview_method="none", image_path=str(inputs.input_path(stored_dir, sha)),
                                strength=0.6)
    started = time.perf_counter()
    generator.generate(request, lambda update: None, lambda: False)
    return {"wall_s": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random()
    from server.core import inputs
    from server.model import DiffusersGenerator

    generator = DiffusersGenerator(CACHE, device="cpu")
    stored = Path(tempfile.mkdtemp(prefix="t2i-bench-inputs-"))
    images = {size: picture(size) for size in sizes}
    shas = {size: inputs.ingest(stored, io.BytesIO(images[size]), None, 1 << 26).image_sha for size in sizes}
    with ExitStack() as stack:
        server = stack.enter_context(ServerProc("--model", "tiny-z-image", module=True))
        runs = {
            "raw_pipe": lambda size: raw(generator, stored, shas[size], size, args.steps, rng.randrange(1 << 40)),
            "edit_plain": lambda size: over_http(server, images[size], args.steps, rng.randrange(1 << 40), False),
            "edit_stream": lambda size: over_http(server, images[size], args.steps, rng.randrange(1 << 40), True),
        }
        for size in sizes:  # warm-up: first-call costs (from_pipe, allocations, lazy imports)
            for name in VARIANTS:
                runs[name](size)
        data = {size: {name: [] for name in VARIANTS} for size in sizes}
        for size in sizes:
            for rep in range(args.repeats):
                for name in (VARIANTS if rep % 2 == 0 else VARIANTS[::-1]):
                    data[size][name].append(runs[name](size))
    table = {}
    for size, variants in data.items():
        medians = {name: {key: r(med([run[key] for run in runs_ if key in run]), 4) for key in runs_[-1]}
                   for name, runs_ in variants.items()}
        for name in medians:
            medians[name]["ratio_vs_raw_pipe"] = r(medians[name]["wall_s"] / medians["raw_pipe"]["wall_s"], 3)
        medians["edit_stream"]["ratio_vs_edit_plain"] = r(
            medians["edit_stream"]["wall_s"] / medians["edit_plain"]["wall_s"], 3)
        table[str(size)] = medians
    save("edits", {"machine": machine(), "model": "tiny-z-image (random weights, fp32, CPU)", "steps": args.steps,
                   "strength": 0.6, "repeats": args.repeats, "median": table,
                   "raw": {str(k): v for k, v in data.items()}})
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
