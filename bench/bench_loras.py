"""LoRA adapters (issue 17) on the tiny Z-Image, in process (``DiffusersGenerator``, no server):

- switch time: ``Adapters.activate`` for a job whose adapter is already loaded (set_adapters only),
  for one whose adapter must be loaded first (load_lora_weights of a new file: a fresh file per
  repeat, so nothing is cached), and for a job without adapters (disable_lora);
- per-step cost: the denoising step time (between consecutive step callbacks) with one active
  unfused adapter (rank 4 on to_q/k/v/out) vs none, same seed and size; and, less noisy on a busy
  machine, the transformer's forward alone (median over repeats of the minimum of 5 calls).

    .venv/bin/python bench/bench_loras.py [--repeats 7] [--size 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import CACHE, machine, med, r, save  # noqa: E402


def step_times(generator, request) -> list[float]:
    stamps = []
    generator.generate(request, lambda update: stamps.append(time.perf_counter()), lambda: False)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def forward_ms(generator, pipe, key, refs, size: int, repeats: int) -> float:
    """The transformer's forward alone (one denoising step's model call) with ``refs`` active: the
    minimum of ``repeats`` calls (the machine's other load only ever adds time)."""
    import torch

    generator.adapters.activate(key, pipe, refs)
    latents = [torch.randn(16, 1, size // 8, size // 8, generator=torch.Generator().manual_seed(0))]
    caption = [torch.randn(16, pipe.transformer.config.cap_feat_dim, generator=torch.Generator().manual_seed(1))]
    timestep = torch.tensor([0.5])
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            pipe.transformer(latents, timestep, caption, return_dict=False)
            times.append(time.perf_counter() - start)
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=9)
    args = parser.parse_args()
    import torch

    from server.core.generation import GenerationRequest
    from server.core.loras import LoraDirectory, LoraRef
    from server.inference.loras import Adapters
    from server.model import DiffusersGenerator
    from tests.lora_helpers import write_adapter

    root = Path(tempfile.mkdtemp(prefix="bench-loras-"))
    directory = LoraDirectory(root)
    generator = DiffusersGenerator(CACHE, device="cpu", adapters=Adapters(directory, max_count=64, max_bytes=1 << 34))
    pipe = generator.pipeline_for("tiny-z-image")
    key = ("tiny-z-image", "fp32")

    def ref(name: str, seed: int) -> LoraRef:
        write_adapter(root / f"{name}.safetensors", CACHE, seed=seed)
        return LoraRef(name=name, sha256=directory.find(name).sha256, weight=1.0)

    def timed(refs) -> float:
        start = time.perf_counter()
        generator.adapters.activate(key, pipe, refs)
        return time.perf_counter() - start

    warm_a, warm_b = ref("warm_a", 1), ref("warm_b", 2)
    timed((warm_a,)), timed((warm_b,))
    first, switch, disable = [], [], []
    for i in range(args.repeats):
        fresh = ref(f"fresh_{i}", 100 + i)
        directory.find(fresh.name)  # hash cached first: the load alone is measured
        first.append(timed((fresh,)))
        switch.append(timed((warm_a,) if i % 2 else (warm_b,)))
        disable.append(timed(()))
    request = dict(model="tiny-z-image", variant=None, prompt="a lighthouse", negative_prompt=None,
                   width=args.size, height=args.size, steps=args.steps, guidance_scale=0.0, seed=1,
                   preview_method="none")
    none_steps, lora_steps = [], []
    variants = [((), none_steps), ((warm_a,), lora_steps)]
    for i in range(args.repeats):  # interleaved, alternating order
        for loras, into in variants if i % 2 else variants[::-1]:
            into.extend(step_times(generator, GenerationRequest(**request, loras=loras)))
    forward = {"no_adapter": [], "one_adapter": []}
    for i in range(args.repeats):
        for label, refs in ((("no_adapter", ()), ("one_adapter", (warm_a,))))[:: 1 if i % 2 else -1]:
            forward[label].append(forward_ms(generator, pipe, key, refs, args.size, 5))
    result = {
        "machine": machine(), "torch_threads": torch.get_num_threads(), "size": args.size, "steps": args.steps,
        "repeats": args.repeats,
        "activate_ms": {"first_load": r(med(first) * 1000), "switch_loaded": r(med(switch) * 1000),
                        "disable": r(med(disable) * 1000)},
        "step_ms": {"no_adapter": r(med(none_steps) * 1000), "one_adapter": r(med(lora_steps) * 1000),
                    "stdev_no_adapter": r(statistics.pstdev(none_steps) * 1000),
                    "stdev_one_adapter": r(statistics.pstdev(lora_steps) * 1000)},
        "transformer_forward_min_ms": {label: r(med(values)) for label, values in forward.items()},
    }
    print(result)
    save("loras", result)


if __name__ == "__main__":
    main()
