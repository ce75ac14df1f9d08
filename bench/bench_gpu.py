"""Goal 8 - GPU figures with an architecture-exact, random-weight Z-Image-Turbo (needs CUDA, no downloads).

    python bench/bench_gpu.py                 # on a CUDA machine: writes bench/results/gpu.json
    python bench/bench_gpu.py --dry-run       # tiny configs on CPU: checks the script's code paths only

Builds the transformer (dim 3840, 30 layers, ~6.15B params) and the FLUX VAE directly on the GPU in
bf16 from the configs in /work/shared/facts/models.md, and the Qwen3-4B-shaped text encoder directly
on the GPU too (never meta + ``to_empty``: that would leave its rotary buffer as garbage). Then, at
1024x1024, 9 steps, guidance 0, for bf16 and SDNQ uint4 (+SVD rank 32, quantized matmul):
  seconds per image (pipe call), seconds per step (step callbacks with device syncs) against the
  ~55 TFLOP/step estimate, peak memory; VAE decode time; the server's generator with preview
  fast / vae / none (overhead of previews); Real-ESRGAN x4plus (server.inference.upscale) in fp16 on a 1024^2
  input, tiled (512) and untiled; PNG encode time of 1024^2 and 4096^2 images.
Random weights make images noise-like; speed does not depend on the values.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import machine, save  # noqa: E402

FLOP_PER_STEP = 55e12  # models.md estimate at 1024^2 (4096 image tokens)


def configs(dry: bool) -> dict:
    if dry:
        return {"transformer": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
                                    n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True,
                                    cap_feat_dim=32, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12],
                                    axes_lens=[1024, 128, 128]),
                "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, head_dim=16, vocab_size=512, max_position_embeddings=1024,
                             tie_word_embeddings=True),
                "vae_channels": (32, 32, 32, 32), "vae_layers": 1, "size": 256, "upscale_size": 32, "png_sizes": (256, 512)}
    return {"transformer": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                                n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True,
                                cap_feat_dim=2560, rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48],
                                axes_lens=[1536, 512, 512]),
            "text": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                         tie_word_embeddings=True),
            "vae_channels": (128, 256, 512, 512), "vae_layers": 2, "size": 1024, "upscale_size": 1024,
            "png_sizes": (1024, 4096)}


def build_pipe(cfg: dict, device: str, dtype):
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    from server.inference.tiny_models import _qwen_tokenizer

    with torch.device(device):  # parameters are created (and randomly initialised) on the device
        transformer = ZImageTransformer2DModel(**cfg["transformer"]).to(dtype)
        text_encoder = Qwen3Model(Qwen3Config(**cfg["text"])).to(dtype)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=cfg["vae_channels"],
                            layers_per_block=cfg["vae_layers"], latent_channels=16, norm_num_groups=32,
                            scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                            use_post_quant_conv=False, mid_block_add_attention=True).to(dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=_qwen_tokenizer(),
                          transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quantize_uint4(pipe, device: str) -> None:
    from sdnq import sdnq_post_load_quant

    for name in ("transformer", "text_encoder"):
        model = sdnq_post_load_quant(getattr(pipe, name), weights_dtype="uint4", use_svd=True, svd_rank=32)
        if device.startswith("cuda"):
            try:
                from sdnq.loader import apply_sdnq_options_to_model

                model = apply_sdnq_options_to_model(model, use_quantized_matmul=True) or model
            except Exception as exc:  # noqa: BLE001 - report, keep the dequantized matmul
                print(f"quantized matmul unavailable for {name}: {exc}", file=sys.stderr)
        setattr(pipe, name, model)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_pipe(pipe, device: str, size: int, repeats: int) -> dict:
    import torch

    step_times: list[float] = []

    def on_step(_pipe, i, _t, kwargs):
        sync(device)
        step_times.append(time.perf_counter())
        return kwargs

    def once(seed: int) -> float:
        step_times.clear()
        generator = torch.Generator(device).manual_seed(seed)
        sync(device)
        started = time.perf_counter()
        step_times.append(started)
        pipe(prompt=["a lighthouse at dusk, photograph"], width=size, height=size, num_inference_steps=9,
             guidance_scale=0.0, generator=generator, output_type="pil", callback_on_step_end=on_step)
        sync(device)
        return time.perf_counter() - started

    once(0)  # warm-up: kernels, allocator
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    walls, steps = [], []
    for seed in range(1, repeats + 1):
        walls.append(once(seed))
        steps.extend(b - a for a, b in zip(step_times[1:], step_times[2:]))  # steps 2..9: no text encoder
    step_s = statistics.median(steps)
    out = {"s_per_image": round(statistics.median(walls), 4), "s_per_step": round(step_s, 4),
           "tflops_achieved_vs_55_tflop_estimate": round(FLOP_PER_STEP / step_s / 1e12, 1)}
    if device.startswith("cuda"):
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def time_vae(pipe, device: str, size: int, repeats: int) -> float:
    import torch

    latents = torch.randn(1, 16, size // 8, size // 8, device=device, dtype=pipe.vae.dtype)
    samples = []
    with torch.inference_mode():
        for i in range(repeats + 1):
            sync(device)
            started = time.perf_counter()
            pipe.vae.decode(latents, return_dict=False)
            sync(device)
            if i:
                samples.append(time.perf_counter() - started)
    return round(statistics.median(samples), 4)


def time_previews(pipe, device: str, size: int, repeats: int) -> dict:
    """The server's generator (server.model) on this pipeline, preview method fast / vae / none."""
    from server.core.generation import GenerationRequest, preview_interval_for
    from server.model import DiffusersGenerator

    generator = DiffusersGenerator(Path(tempfile.gettempdir()), device=device)
    generator.adopt_pipeline("z-image-turbo", "uint4", pipe)  # serve the random-weight pipeline under the real id
    walls: dict[str, list[float]] = {"none": [], "fast": [], "vae": []}
    for rep in range(repeats + 1):
        for method in walls:  # interleaved
            request = GenerationRequest(model="z-image-turbo", variant="uint4", prompt="a lighthouse", negative_prompt=None,
                                        width=size, height=size, steps=9, guidance_scale=0.0, seed=rep, n=1,
                                        preview_method=method, preview_interval=preview_interval_for(9), preview_max_side=512)
            sync(device)
            started = time.perf_counter()
            generator.generate(request, lambda update: None, lambda: False)
            sync(device)
            if rep:
                walls[method].append(time.perf_counter() - started)
    med = {m: statistics.median(v) for m, v in walls.items()}
    return {"s_per_image": {m: round(v, 4) for m, v in med.items()},
            "overhead_vs_none": {m: round(med[m] / med["none"] - 1, 4) for m in ("fast", "vae")}}


def time_upscaler(device: str, size: int, repeats: int) -> dict:
    import numpy as np

    from server.inference.upscale import RealESRGANUpscaler

    out = {}
    rgb = np.random.default_rng(0).random((size, size, 3), dtype=np.float32)
    for name, tile in (("tiled_512", 512), ("untiled", 100_000)):
        upscaler = RealESRGANUpscaler(Path(tempfile.gettempdir()) / "esrgan", device=device, tile=tile)
        try:
            upscaler.load()
            weights = "RealESRGAN_x4plus"
        except Exception:  # noqa: BLE001 - no weights offline: the same architecture, random weights
            import spandrel
            import torch
            from spandrel.architectures.ESRGAN import RRDBNet

            descriptor = spandrel.ModelLoader(torch.device(device)).load_from_state_dict(
                RRDBNet(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4).state_dict())
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
            descriptor.eval().to(device=torch.device(device), dtype=dtype)
            upscaler.adopt(descriptor, torch.device(device), dtype)
            weights = "random-weight RRDBNet x4 (23 blocks)"
        import torch

        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        samples = []
        for i in range(repeats + 1):
            sync(device)
            started = time.perf_counter()
            upscaler.run_model(rgb)
            sync(device)
            if i:
                samples.append(time.perf_counter() - started)
        out[name] = {"s": round(statistics.median(samples), 4), "weights": weights, "dtype": str(upscaler.dtype)}
        if device.startswith("cuda"):
            out[name]["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def time_png(sizes) -> dict:
    import numpy as np
    from PIL import Image

    from server.core import files

    out = {}
    for size in sizes:
        noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
        ramp = np.linspace(0, 255, size, dtype=np.float32)
        smooth = Image.fromarray(np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)),
                                           np.tile(ramp[:, None], (1, size))], axis=-1).astype(np.uint8))
        for kind, image in (("noise", noise), ("smooth", smooth)):
            for level in (1, 3):
                samples = []
                for _ in range(3):
                    started = time.perf_counter()
                    files.encode_image(image, "png", png_level=level)
                    samples.append(time.perf_counter() - started)
                out[f"{size}_{kind}_level{level}_s"] = round(statistics.median(samples), 4)
    return out


def versions(device: str) -> dict:
    import diffusers
    import torch
    import transformers

    info = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import sdnq

        info["sdnq"] = getattr(sdnq, "__version__", "unknown")
    except ImportError:
        info["sdnq"] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="tiny configs on CPU: checks the code paths")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on a GPU machine, or use --dry-run to check the script")
    cfg = configs(args.dry_run)
    size, repeats = cfg["size"], (1 if args.dry_run else args.repeats)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    results: dict = {"machine": machine(), "versions": versions(device), "dry_run": args.dry_run, "size": size,
                     "steps": 9, "model": "Z-Image-Turbo architecture, random weights" + (" (tiny dry-run configs)" if args.dry_run else "")}
    pipe = build_pipe(cfg, device, dtype)
    results["bf16" if device == "cuda" else "float32"] = time_pipe(pipe, device, size, repeats)
    results["vae_decode_s"] = time_vae(pipe, device, size, repeats)
    quantize_uint4(pipe, device)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    results["sdnq_uint4"] = time_pipe(pipe, device, size, repeats)
    results["previews_uint4"] = time_previews(pipe, device, size, repeats)
    del pipe
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    results["realesrgan_x4plus_fp16"] = time_upscaler(device, cfg["upscale_size"], repeats)
    results["png_encode"] = time_png(cfg["png_sizes"])
    save("gpu_dry_run" if args.dry_run else "gpu", results)


if __name__ == "__main__":
    main()
