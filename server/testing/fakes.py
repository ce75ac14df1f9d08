"""A deterministic stand-in generator and upscaler for tests and benchmarks (no torch).

``FakeGenerator`` honours the whole generation contract (steps, previews, seeds, cancellation)
with a fixed time per step, so timing-sensitive behaviour of the job core can be shown without a
model. Prompts containing ``fail:oom`` or ``fail:error`` raise the matching errors. An edit
(``request.image_path``) blends the stored input with the seed's colour by ``strength`` and keeps the
input's pixels outside the mask, as the real inpainting does.
"""

from __future__ import annotations

import random
import threading
import time

from PIL import Image

from server.core.errors import GenerationFailed, JobCancelled, OutOfMemory
from server.core.generation import CancelCheck, GenerationRequest, StepCallback, StepUpdate


class FakeGenerator:
    def __init__(self, step_s: float = 0.0, gate: threading.Event | None = None, noise: bool = False):
        self.step_s = step_s
        self.noise = noise  # noise images cost real PNG-encoding time, like real outputs
        self.gate = gate  # when given, every step waits for it: tests hold the GPU deterministically
        self.calls: list[GenerationRequest] = []
        self.busy_s = 0.0

    def load(self, model: str, variant: str | None) -> None:
        pass

    def describe(self) -> dict:
        return {"device": "cpu", "dtype": "none", "loaded": [], "fake": True}

    def generate(self, request: GenerationRequest, on_step: StepCallback, is_cancelled: CancelCheck) -> list[Image.Image]:
        started = time.monotonic()
        self.calls.append(request)
        try:
            if "fail:oom" in request.prompt:
                raise OutOfMemory("out of GPU memory while generating; try a smaller size")
            if "fail:error" in request.prompt:
                raise GenerationFailed("the generator failed")
            return [self._one(request, i, on_step, is_cancelled) for i in range(request.n)]
        finally:
            self.busy_s += time.monotonic() - started

    def _one(self, request, index, on_step, is_cancelled) -> Image.Image:
        colour = _colour(request.seed + index)
        total = request.steps_run
        for step in range(1, total + 1):
            if is_cancelled():
                raise JobCancelled()
            if self.gate is not None:
                self.gate.wait(30)
            if self.step_s:
                time.sleep(self.step_s)  # stands for GPU work on this (GPU) thread
            preview = None
            if request.preview_method != "none" and (step % request.preview_interval == 0 or step == total):
                shade = tuple(int(c * step / total) for c in colour)
                side = min(request.preview_max_side, 64)
                preview = Image.new("RGB", (side, side), shade)
            on_step(StepUpdate(index, step, total, preview))
        if is_cancelled():
            raise JobCancelled()
        if request.is_edit:
            return _edited(request, colour)
        if self.noise:
            return Image.frombytes("RGB", (request.width, request.height),
                                   random.Random(request.seed + index).randbytes(request.width * request.height * 3))
        return Image.new("RGB", (request.width, request.height), colour)


class FakeUpscaler:
    """``delay_s``: one uninterrupted wait per image; ``tiles`` x ``tile_s``: a tiled upscale that,
    like the real one, polls ``is_cancelled`` before each tile and stops there."""

    def __init__(self, fail: bool = False, delay_s: float = 0.0, tile_s: float = 0.0, tiles: int = 1):
        self.fail = fail
        self.delay_s = delay_s  # seconds per image: holds a job in ``generated`` (e.g. for a kill -9)
        self.tile_s, self.tiles = tile_s, tiles
        self.calls = 0
        self.tiles_done = 0

    def upscale(self, image: Image.Image, is_cancelled: CancelCheck | None = None) -> Image.Image:
        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)  # stands for upscaling work on the GPU thread
        for _ in range(self.tiles):
            if is_cancelled is not None and is_cancelled():
                raise JobCancelled()
            if self.tile_s:
                time.sleep(self.tile_s)  # one tile's work on the GPU thread
            self.tiles_done += 1
        if self.fail:
            raise OutOfMemory("out of GPU memory while upscaling")
        return image.resize((image.width * 4, image.height * 4), Image.NEAREST)


def _edited(request: GenerationRequest, colour: tuple[int, int, int]) -> Image.Image:
    size = (request.width, request.height)
    with Image.open(request.image_path) as stored:
        source = stored.convert("RGB").resize(size)
    result = Image.blend(source, Image.new("RGB", size, colour), request.strength)
    if request.mask_path is None:
        return result
    with Image.open(request.mask_path) as stored:
        mask = stored.convert("L").resize(size, Image.NEAREST)
    return Image.composite(result, source, mask)


def _colour(seed: int) -> tuple[int, int, int]:
    return (seed * 67 % 256, seed * 131 % 256, seed * 197 % 256)
