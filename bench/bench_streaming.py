"""Goal 1 - streaming overhead: the same job streamed with previews / not streamed, side by side.

Three real servers (``python -m server --model tiny-z-image --preview-method fast|vae|none``) run
at once; every repeat sends one request per variant, interleaved, each with a fresh seed (so the
result cache never answers). Variants:
  plain_none   - preview-method none, not streamed (b64_json): the baseline
  plain_fast   - preview-method fast (the default), not streamed: previews are made, nobody reads them
  stream_fast  - preview-method fast, streamed (step dialect): the default streaming experience
  stream_vae   - preview-method vae, streamed: a full VAE decode every 10% of steps (original design)
Wall time: request sent -> last byte (``[DONE]`` or the JSON body). Streams also give the time to
the first intermediate image and the gap between intermediates.

    .venv/bin/python bench/bench_streaming.py [--sizes 256,512] [--repeats 7] [--steps 9]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ServerProc, machine, med, r, save, sse_post  # noqa: E402

VARIANTS = (("plain_none", "none", False), ("plain_fast", "fast", False),
            ("stream_fast", "fast", True), ("stream_vae", "vae", True))


def one(server: ServerProc, size: int, steps: int, stream: bool, seed: int) -> dict:
    body = {"prompt": "a lighthouse at dusk", "model": "tiny-z-image", "size": f"{size}x{size}", "seed": seed,
            "num_inference_steps": steps, "response_format": "b64_json", "stream": stream}
    res = asyncio.run(sse_post("127.0.0.1", server.port, "/v1/images/generations", body))
    if res.status != 200:
        raise RuntimeError(f"HTTP {res.status}: {res.tail[:300]}")
    out = {"wall_s": res.done_at - res.sent_at}
    if stream:
        events = res.data()
        partials = [t for t, d in events if not d.get("is_final")]
        if not any(d.get("is_final") for _, d in events):
            raise RuntimeError("stream ended without a final image")
        out["partials"] = len(partials)
        if partials:
            out["first_partial_s"] = partials[0] - res.sent_at
            gaps = [b - a for a, b in zip(partials, partials[1:])]
            if gaps:
                out["partial_gap_s"] = med(gaps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--repeats-512", type=int, default=3, help="repeats at sizes above 256 (vae previews are slow)")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rng = random.Random()
    with ExitStack() as stack:
        servers = {}
        for method in ("none", "fast", "vae"):  # start all three; each loads the tiny model
            servers[method] = ServerProc("--model", "tiny-z-image", "--preview-method", method, module=True)
        for server in servers.values():
            stack.enter_context(server)
        for method, server in servers.items():  # warm-up: first-call costs (allocations, lazy imports)
            for size in sizes:
                one(server, size, args.steps, method != "none", rng.randrange(1 << 40))
        raw = {size: {name: [] for name, _, _ in VARIANTS} for size in sizes}
        for size in sizes:
            for rep in range(args.repeats if size <= 256 else args.repeats_512):
                order = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]  # alternate order: no position bias
                for name, method, stream in order:
                    raw[size][name].append(one(servers[method], size, args.steps, stream, rng.randrange(1 << 40)))
    table = {}
    for size, variants in raw.items():
        medians = {name: {key: r(med([run[key] for run in runs if key in run]), 4)
                          for key in runs[0]} for name, runs in variants.items()}
        base = medians["plain_none"]["wall_s"]
        for name in medians:
            medians[name]["ratio_vs_plain_none"] = r(medians[name]["wall_s"] / base, 3)
        medians["stream_fast"]["ratio_vs_plain_fast"] = r(medians["stream_fast"]["wall_s"] / medians["plain_fast"]["wall_s"], 3)
        table[str(size)] = medians
    save("streaming", {"machine": machine(), "model": "tiny-z-image (random weights, fp32, CPU)",
                       "steps": args.steps, "repeats": args.repeats, "median": table,
                       "raw": {str(k): v for k, v in raw.items()}})


if __name__ == "__main__":
    main()
