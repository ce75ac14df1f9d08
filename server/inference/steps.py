"""The per-image step callback of a diffusers pipeline run (``callback_on_step_end``).

Torch-free at import: previews are imported when the first step runs.
"""

from __future__ import annotations

from typing import Any

from server.core.errors import JobCancelled
from server.core.generation import CancelCheck, GenerationRequest, StepCallback, StepUpdate


class StepTracker:
    """The ``callback_on_step_end`` of one image: cancellation, x0 previews, step updates.

    Keeps the previous latents (starting with the initial noise) because x0 needs two consecutive
    latents. Raises ``JobCancelled`` at a step boundary, which aborts the pipeline before its decode.
    """

    def __init__(self, request: GenerationRequest, image_index: int, initial_latents: Any,
                 on_step: StepCallback, is_cancelled: CancelCheck):
        self.request = request
        self.image_index = image_index
        self.prev_latents = initial_latents
        self.on_step = on_step
        self.is_cancelled = is_cancelled
        self.sigmas: list[float] | None = None

    def __call__(self, pipe: Any, i: int, _t: Any, callback_kwargs: dict) -> dict:
        if self.is_cancelled():
            raise JobCancelled()
        from server.inference.previews import estimate_x0, render_preview

        latents = callback_kwargs["latents"]
        step, total = i + 1, self.request.steps_run
        preview = None
        interval = max(1, self.request.preview_interval)
        if self.request.preview_method != "none" and (step % interval == 0 or step == total):
            if self.sigmas is None:  # one device->host copy per image, not per step
                # An edit starts part-way down the schedule (img2img/inpaint set the begin index).
                begin = getattr(pipe.scheduler, "begin_index", None) or 0
                self.sigmas = [float(s) for s in pipe.scheduler.sigmas[begin:]]
            if self.prev_latents is None:  # an edit's first step: its starting latents are the pipeline's own
                x0 = latents.float()
            else:
                x0 = estimate_x0(self.prev_latents, latents, self.sigmas[i], self.sigmas[i + 1])
            preview = render_preview(self.request.preview_method, pipe, x0, self.request.preview_max_side)
        self.prev_latents = latents
        self.on_step(StepUpdate(image_index=self.image_index, step=step, total_steps=total, preview=preview))
        # Checked again so a cancel that arrived during this step costs no further transformer pass.
        if self.is_cancelled():
            raise JobCancelled()
        return callback_kwargs
