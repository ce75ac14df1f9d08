"""The generation contract between the job core and the model layer.

The job core calls ``Generator.generate`` from its single GPU thread; implementations must not touch
the event loop. ``on_step`` is called after every denoising step (it must be cheap; the job core
forwards it thread-safely); ``is_cancelled`` is polled at every step boundary and, when true, the
generator stops within one step and never VAE-decodes (it raises ``server.core.errors.JobCancelled``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

if TYPE_CHECKING:
    from PIL.Image import Image

    from server.core.loras import LoraRef


@dataclass(frozen=True)
class GenerationRequest:
    """What one pipeline run needs; a normalized job spec maps onto it one to one."""

    model: str
    variant: str | None
    prompt: str
    negative_prompt: str | None
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    n: int = 1
    preview_method: str = "fast"  # "fast" (linear latent->RGB) | "vae" (full decode of x0) | "none"
    preview_interval: int = 1  # steps between previews; the last step always previews
    preview_max_side: int = 512
    # Edits (image_to_image): the stored input image (RGB PNG), and for inpainting the mask (L PNG,
    # white = repaint); ``strength`` in (0, 1]. None for text-to-image.
    image_path: str | None = None
    mask_path: str | None = None
    strength: float | None = None
    # LoRA adapters to activate for this job (exactly these; none: adapters disabled)
    loras: "tuple[LoraRef, ...]" = ()

    @property
    def is_edit(self) -> bool:
        return self.image_path is not None

    @property
    def steps_run(self) -> int:
        return steps_run(self.steps, self.strength)


@dataclass(frozen=True)
class StepUpdate:
    image_index: int  # 0-based image of the n in the request
    step: int  # 1-based: steps completed for this image
    total_steps: int
    preview: "Image | None" = None  # set on preview steps only


StepCallback = Callable[[StepUpdate], None]
CancelCheck = Callable[[], bool]


class Generator(Protocol):
    def generate(
        self, request: GenerationRequest, on_step: StepCallback, is_cancelled: CancelCheck
    ) -> "list[Image]":
        """Return ``request.n`` images, image i seeded with ``seed + i``; deterministic per device."""
        ...

    def load(self, model: str, variant: str | None) -> None:
        """Make the model resident (downloading nothing when offline); raise ``ModelLoadError``."""
        ...

    def describe(self) -> dict:
        """Device, dtype and loaded models, for /health."""
        ...


class Upscaler(Protocol):
    def upscale(self, image: "Image", is_cancelled: CancelCheck | None = None) -> "Image":
        """Return the image 4x larger (RGB or RGBA kept). ``is_cancelled`` is polled before every
        tile; when true the upscaler stops within one tile and raises ``JobCancelled`` (so a cancel
        or a shutdown never waits for a whole large upscale)."""
        ...


def steps_run(steps: int, strength: float | None) -> int:
    """The steps a diffusers img2img/inpaint pipeline really runs for ``steps`` at ``strength``
    (its ``get_timesteps``, float for float); all of them without a strength."""
    if strength is None:
        return steps
    return steps - int(max(steps - min(steps * strength, steps), 0))


def preview_interval_for(steps: int, percent: int = 10) -> int:
    """Steps between previews for 'every ``percent``% of steps': every step when steps <= 100/percent."""
    return max(1, round(steps * percent / 100))
