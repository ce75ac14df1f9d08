"""Model layer: tiny real-class pipelines through from_pretrained, seeds, previews, cancel, errors.

CPU only, offline. Every model here is a tiny random-weight pipeline saved to a temporary cache
and loaded back with the real ``PipelineClass.from_pretrained`` call.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

import dataclasses
import json
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import numpy as np
import pytest

from server.core.errors import GenerationFailed, InvalidRequest, JobCancelled, ModelLoadError, ModelNotFound, OutOfMemory
from server.core.generation import GenerationRequest, StepUpdate
from server.model import DiffusersGenerator

torch = pytest.importorskip("torch")


@pytest.fixture(scope="session", autouse=True)
def single_cpu_thread():
    """Tiny models gain nothing from intra-op threads, and on a small shared CPU a busy neighbour
    makes OpenMP barriers cost about a millisecond per op (30x slower runs). Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def generator(cache_dir):
    return DiffusersGenerator(cache_dir, device="cpu", max_resident=3)


def request(**overrides) -> GenerationRequest:
    base = dict(
        model="tiny-z-image", variant=None, prompt="a red fox in the snow", negative_prompt=None,
        width=64, height=64, steps=4, guidance_scale=0.0, seed=7, preview_method="none",
    )
    base.update(overrides)
    return GenerationRequest(**base)


def run(generator, req, on_step=None, is_cancelled=None):
    updates: list[StepUpdate] = []
    images = generator.generate(req, on_step or updates.append, is_cancelled or (lambda: False))
    return images, updates


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def mse(a, b) -> float:
    return float(np.mean((pixels(a) - pixels(b)) ** 2))


def test_importing_model_module_does_not_import_torch():
    code = "import sys, server.model, server.inference.previews, server.inference.tiny_models; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=str(Path(__file__).resolve().parents[2]))
    assert result.returncode == 0


def test_tiny_z_image_loads_through_from_pretrained_and_generates(generator, cache_dir):
    pipe = generator.pipeline_for("tiny-z-image")
    saved = cache_dir / "tiny" / "z-image"
    assert type(pipe).__name__ == "ZImagePipeline"
    assert pipe.name_or_path == str(saved)
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == "ZImagePipeline"
    images, updates = run(generator, request(width=128, height=64))
    assert [im.size for im in images] == [(128, 64)]
    assert images[0].mode == "RGB"
    assert [u.step for u in updates] == [1, 2, 3, 4]
    assert all(u.total_steps == 4 and u.image_index == 0 and u.preview is None for u in updates)


def test_tiny_cogview4_with_cfg_and_negative_prompt(generator, cache_dir):
    pipe = generator.pipeline_for("tiny-cogview4")
    assert type(pipe).__name__ == "CogView4Pipeline"
    assert pipe.name_or_path == str(cache_dir / "tiny" / "cogview4")
    req = request(model="tiny-cogview4", width=64, height=128, guidance_scale=5.0, negative_prompt="blurry")
    images, updates = run(generator, req)
    assert [im.size for im in images] == [(64, 128)]
    assert len(updates) == 4
    # The negative prompt reaches the pipeline (CFG uses it): changing it changes the pixels.
    other, _ = run(generator, dataclasses.replace(req, negative_prompt="a completely different text"))
    assert mse(images[0], other[0]) > 0


def test_same_seed_same_pixels_other_seed_differs(generator):
    first, _ = run(generator, request(seed=11))
    again, _ = run(generator, request(seed=11))
    other, _ = run(generator, request(seed=12))
    assert np.array_equal(pixels(first[0]), pixels(again[0]))
    assert mse(first[0], other[0]) > 1.0


def test_n_images_use_consecutive_seeds(generator):
    pair, updates = run(generator, request(seed=20, n=2))
    single, _ = run(generator, request(seed=21))
    assert len(pair) == 2
    assert np.array_equal(pixels(pair[1]), pixels(single[0]))
    assert mse(pair[0], pair[1]) > 1.0
    assert [(u.image_index, u.step) for u in updates] == [(i, s) for i in (0, 1) for s in (1, 2, 3, 4)]


@pytest.mark.parametrize(
    ("steps", "interval", "expected"),
    [(10, 2, [2, 4, 6, 8, 10]), (9, 1, list(range(1, 10))), (9, 4, [4, 8, 9]), (3, 10, [3])],
)
def test_preview_steps_follow_interval_and_always_include_last(generator, steps, interval, expected):
    _, updates = run(generator, request(steps=steps, preview_method="fast", preview_interval=interval))
    assert [u.step for u in updates] == list(range(1, steps + 1))
    assert [u.step for u in updates if u.preview is not None] == expected


def test_preview_sizes_per_method(generator):
    _, fast = run(generator, request(width=128, height=64, steps=2, preview_method="fast"))
    _, vae = run(generator, request(width=128, height=64, steps=2, preview_method="vae"))
    _, small = run(generator, request(width=128, height=64, steps=2, preview_method="vae", preview_max_side=32))
    assert {u.preview.size for u in fast} == {(16, 8)}  # latent grid: 1/8 of the image
    assert {u.preview.size for u in vae} == {(128, 64)}
    assert {u.preview.size for u in small} == {(32, 16)}
    assert all(u.preview.mode == "RGB" for u in fast + vae)


@pytest.mark.parametrize("model", ["tiny-z-image", "tiny-cogview4"])
def test_x0_previews_converge_and_beat_noisy_latents(generator, monkeypatch, model):
    from server.inference import previews

    noisy = []  # x_t at each step, captured where the generator estimates x0 from it
    real_estimate = previews.estimate_x0

    def spy(prev, latents, sigma_prev, sigma):
        noisy.append(latents.clone())
        return real_estimate(prev, latents, sigma_prev, sigma)

    monkeypatch.setattr(previews, "estimate_x0", spy)
    guidance = 5.0 if model == "tiny-cogview4" else 0.0
    req = request(model=model, width=128, height=128, steps=9, guidance_scale=guidance, preview_method="vae")
    images, updates = run(generator, req)
    final = images[0]
    x0_errors = [mse(u.preview, final) for u in updates]
    assert len(noisy) == 9 and len(x0_errors) == 9
    assert x0_errors[-1] < 1.0  # sigma is 0 at the last step: x0 is the final latent
    assert x0_errors[0] > 20 * max(x0_errors[-1], 0.05)  # the first preview is far from it
    pipe = generator.pipeline_for(model)
    xt_errors = [mse(previews.vae_preview(pipe, noisy[k], 512), final) for k in (0, 4)]
    # Previewing x0 instead of x_t is the point: early x0 previews are much closer to the result.
    assert x0_errors[0] < 0.5 * xt_errors[0] and x0_errors[4] < 0.5 * xt_errors[1]


def test_cancel_stops_at_the_step_boundary_without_decoding(generator, monkeypatch):
    pipe = generator.pipeline_for("tiny-z-image")
    decodes = []
    original_decode = pipe.vae.decode

    def counting_decode(*args, **kwargs):
        decodes.append(1)
        return original_decode(*args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", counting_decode)
    run(generator, request(steps=3))
    assert len(decodes) == 1  # the counter sees a normal run's decode

    decodes.clear()
    cancelled = threading.Event()
    seen = []

    def on_step(update):
        seen.append(update.step)
        if update.step == 3:
            cancelled.set()

    with pytest.raises(JobCancelled):
        generator.generate(request(steps=8, preview_method="fast"), on_step, cancelled.is_set)
    assert seen[:3] == [1, 2, 3]
    assert max(seen) <= 4
    assert decodes == []
    images, _ = run(generator, request(steps=3))  # the generator is usable afterwards
    assert images[0].size == (64, 64)


def test_cancel_before_start_runs_nothing(generator):
    with pytest.raises(JobCancelled):
        generator.generate(request(), lambda u: pytest.fail("no step expected"), lambda: True)


def test_sdnq_uint4_variant_generates_with_quantized_layers(generator, cache_dir):
    pipe = generator.pipeline_for("tiny-z-image", "uint4")
    assert pipe.name_or_path == str(cache_dir / "tiny" / "z-image-uint4")
    layer_types = {type(m).__name__ for m in pipe.transformer.modules()}
    assert "SDNQLinear" in layer_types
    assert "Linear" not in layer_types or sum(type(m).__name__ == "SDNQLinear" for m in pipe.transformer.modules()) > 5
    config = json.loads((cache_dir / "tiny" / "z-image-uint4" / "transformer" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "sdnq"
    assert config["quantization_config"]["weights_dtype"] == "uint4"
    quantized, _ = run(generator, request(variant="uint4", seed=5))
    full, _ = run(generator, request(variant="fp32", seed=5))
    assert quantized[0].size == (64, 64)
    # Same random weights, quantized: close to the fp32 output but not bit-identical.
    diff = np.abs(pixels(quantized[0]) - pixels(full[0])).mean() / 255
    assert 0 < diff < 0.05


@pytest.mark.parametrize(
    ("overrides", "param", "rule"),
    [
        ({"width": 100}, "width", "multiple of 16"),
        ({"height": 72}, "height", "multiple of 16"),
        ({"width": 48}, "width", "between 64 and 1024"),
        ({"height": 2048}, "height", "between 64 and 1024"),
        ({"steps": 0}, "steps", "between 1 and 100"),
    ],
)
def test_invalid_requests_name_the_rule(generator, overrides, param, rule):
    with pytest.raises(InvalidRequest) as info:
        generator.generate(request(**overrides), lambda u: None, lambda: False)
    assert info.value.param == param
    assert rule in str(info.value)


def test_unknown_variant_and_model(generator):
    with pytest.raises(InvalidRequest) as info:
        generator.generate(request(variant="int3"), lambda u: None, lambda: False)
    assert info.value.param == "model_type"
    assert "int3" in str(info.value) and "fp32, uint4" in str(info.value)
    with pytest.raises(InvalidRequest):
        generator.load("tiny-cogview4", "uint4")
    with pytest.raises(ModelNotFound):
        generator.load("no-such-model", None)


def test_missing_real_weights_offline_give_a_one_line_remedy(cache_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time; patch the live values too.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    gen = DiffusersGenerator(cache_dir, device="cpu")
    with pytest.raises(ModelLoadError) as info:
        gen.load("z-image-turbo", None)
    message = str(info.value)
    assert "\n" not in message
    assert "Disty0/Z-Image-Turbo-SDNQ-uint4-svd-r32" in message
    assert "HF_HOME" in message and "HF_HUB_OFFLINE" in message and "--model tiny-z-image" in message
    assert str(home / "hub") in message
    assert "Traceback" not in message
    assert gen.describe()["loaded"] == []


def _fail_once(monkeypatch, pipe, exc):
    cls = type(pipe)
    original = cls.__call__
    calls = []

    def failing_call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "__call__", failing_call)
    return calls


@pytest.mark.parametrize(
    "exc", [torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20 GiB"),
            RuntimeError("CUDA error: out of memory")],
)
def test_out_of_memory_is_reported_and_the_next_generation_works(generator, monkeypatch, exc):
    baseline, _ = run(generator, request(seed=3))
    calls = _fail_once(monkeypatch, generator.pipeline_for("tiny-z-image"), exc)
    with pytest.raises(OutOfMemory) as info:
        run(generator, request(seed=3))
    assert info.value.code == "out_of_memory"
    assert "Out of memory" in str(info.value) and "\n" not in str(info.value)
    images, _ = run(generator, request(seed=3))
    assert len(calls) == 2
    assert np.array_equal(pixels(images[0]), pixels(baseline[0]))


def test_other_pipeline_errors_become_generation_failed(generator, monkeypatch):
    _fail_once(monkeypatch, generator.pipeline_for("tiny-z-image"), ValueError("bad tensor\nwith details"))
    with pytest.raises(GenerationFailed) as info:
        run(generator, request())
    assert not isinstance(info.value, OutOfMemory)
    assert str(info.value) == "Generation failed: ValueError: bad tensor"


def test_lru_keeps_at_most_max_resident_and_frees_the_evicted(cache_dir):
    gen = DiffusersGenerator(cache_dir, device="cpu", max_resident=1)
    first = weakref.ref(gen.pipeline_for("tiny-z-image"))
    assert gen.describe() == {"device": "cpu", "dtype": "float32",
                              "loaded": [{"model": "tiny-z-image", "variant": "fp32"}]}
    gen.load("tiny-cogview4", None)
    assert gen.describe()["loaded"] == [{"model": "tiny-cogview4", "variant": "fp32"}]
    assert first() is None  # nothing else holds the evicted pipeline


def test_tiny_model_builds_are_safe_under_concurrency(tmp_path):
    from server.inference.tiny_models import tiny_model_dir

    results, errors = [], []

    def build():
        try:
            results.append(tiny_model_dir(tmp_path, "cogview4"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(set(results)) == 1 and (results[0] / "model_index.json").is_file()
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == ["cogview4"]  # no temp folders left


def test_x0_estimate_is_exact_for_a_straight_flow():
    from server.inference.previews import estimate_x0

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 4, 4, generator=gen), torch.randn(1, 16, 4, 4, generator=gen)
    at = lambda s: (1 - s) * x0 + s * noise  # noqa: E731 - flow matching interpolation
    assert torch.allclose(estimate_x0(at(0.9), at(0.7), 0.9, 0.7), x0, atol=1e-5)
    assert not torch.allclose(at(0.7), x0, atol=0.1)  # x_t itself is far from x0


def test_fast_preview_applies_factors_and_bias():
    from server.inference.previews import LATENT_RGB_FACTORS, latents_to_rgb_fast

    factors, bias = LATENT_RGB_FACTORS["ZImagePipeline"]
    assert len(factors) == 16 and all(len(row) == 3 for row in factors) and len(bias) == 3
    latents = torch.zeros(1, 16, 2, 3)
    latents[0, 12] = 1.0  # channel 12 only: rgb = factors[12] + bias
    image = latents_to_rgb_fast(latents, factors, bias, max_side=512)
    expected = [round((factors[12][c] + bias[c] + 1) * 127.5) for c in range(3)]
    assert image.size == (3, 2)
    assert np.asarray(image)[1, 2].tolist() == expected
    assert len(LATENT_RGB_FACTORS["CogView4Pipeline"][0]) == 16


def test_fit_latent_rgb_factors_recovers_a_linear_map():
    from server.inference.previews import fit_latent_rgb_factors

    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 6, 5, generator=gen)
    true_f, true_b = torch.randn(16, 3, generator=gen) * 0.05, torch.tensor([0.1, -0.2, 0.05])
    rgb = torch.einsum("bchw,cr->brhw", latents, true_f) + true_b[None, :, None, None]
    pixels = torch.nn.functional.interpolate(rgb, scale_factor=8, mode="nearest")
    fitted_f, fitted_b = fit_latent_rgb_factors(latents, pixels)
    assert torch.allclose(fitted_f, true_f, atol=1e-4) and torch.allclose(fitted_b, true_b, atol=1e-4)
