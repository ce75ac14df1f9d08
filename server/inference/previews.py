"""Step previews: the predicted clean latent x0 turned into a small RGB picture.

Both pipelines use flow-matching Euler steps ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v``, so two
consecutive latents give the velocity v and the clean-image estimate
``x0 = x_{i+1} - sigma_{i+1} * v``. Previewing x0 (not the noisy x_t) shows the final composition
from the first steps on; at the last step sigma is 0 and x0 equals the final latents.

Two renderers:
- ``fast``: a per-model linear map latent(16 ch) -> RGB plus bias (the factors ComfyUI and InvokeAI
  ship), then [-1, 1] -> [0, 255]. Output is 1/8 of the image size; costs about a millisecond.
- ``vae``: the full VAE decode of x0 with the pipeline's own decode math (full resolution, slow).
Both return PIL RGB images no larger than ``max_side`` on the longest side.

Torch is imported inside functions so that importing this module stays cheap.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

logger = logging.getLogger(__name__)

PREVIEW_METHODS = ("fast", "vae", "none")

# ComfyUI's Flux factors (Z-Image uses the FLUX.1 VAE). They act on latents in the sampling space,
# i.e. (z - shift) * scale, which is exactly the space of ZImagePipeline's latents.
_FLUX_FACTORS = (
    (-0.0346, 0.0244, 0.0681), (0.0034, 0.0210, 0.0687), (0.0275, -0.0668, -0.0433), (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329), (0.0004, 0.0383, 0.0115), (0.0405, 0.0861, 0.0915), (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180), (0.1008, 0.0755, -0.0421), (-0.0515, 0.0201, 0.0011), (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749), (-0.1264, -0.0522, -0.1103), (-0.0280, -0.0881, -0.0499), (-0.1262, -0.0982, -0.0778),
)
_FLUX_BIAS = (-0.0329, -0.0718, -0.0851)

# InvokeAI's CogView4 factors, fitted on scaling_factor * z; CogView4's scaling factor is 1.0, so
# this is the pipeline's latent space too. No bias.
_COGVIEW4_FACTORS = (
    (0.00408832, -0.00082485, -0.00214816), (0.00084172, 0.00132241, 0.00842067),
    (-0.00466737, -0.00983181, -0.00699561), (0.03698397, -0.04797235, 0.03585809),
    (0.00234701, -0.00124326, 0.00080869), (-0.00723903, -0.00388422, -0.00656606),
    (-0.00970917, -0.00467356, -0.00971113), (0.17292486, -0.03452463, -0.1457515),
    (0.02330308, 0.02942557, 0.02704329), (-0.00903131, -0.01499841, -0.01432564),
    (0.01250298, 0.0019407, -0.02168986), (0.01371188, 0.00498283, -0.01302135),
    (0.42396525, 0.4280575, 0.42148206), (0.00983825, 0.00613302, 0.00610316),
    (0.00473307, -0.00889551, -0.00915924), (-0.00955853, -0.00980067, -0.00977842),
)
_ZERO_BIAS = (0.0, 0.0, 0.0)

# Keyed by diffusers pipeline class name: (16x3 factors, 3 bias).
LATENT_RGB_FACTORS: dict[str, tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]] = {
    "ZImagePipeline": (_FLUX_FACTORS, _FLUX_BIAS),
    "ZImageImg2ImgPipeline": (_FLUX_FACTORS, _FLUX_BIAS),  # edits: the same VAE space
    "ZImageInpaintPipeline": (_FLUX_FACTORS, _FLUX_BIAS),
    "CogView4Pipeline": (_COGVIEW4_FACTORS, _ZERO_BIAS),
}


def estimate_x0(prev_latents: "torch.Tensor", latents: "torch.Tensor", sigma_prev: float, sigma: float) -> "torch.Tensor":
    """x0 from two consecutive flow-matching latents (x_i at ``sigma_prev``, x_{i+1} at ``sigma``).

    Returns float32. When the sigmas coincide (no information about v) the current latents are returned.
    """
    cur = latents.float()
    delta = float(sigma) - float(sigma_prev)
    if delta == 0.0:
        return cur
    velocity = (cur - prev_latents.float()) / delta
    return cur - float(sigma) * velocity


def latents_to_rgb_fast(latents: "torch.Tensor", factors: Any, bias: Any, max_side: int) -> "Image":
    """Linear latent -> RGB preview of the first image in ``latents`` (B, C, h, w); output h x w.

    ``factors`` is C x 3 (rows = latent channels), ``bias`` 3 values; the result in [-1, 1] is mapped
    to [0, 255] and clamped, as ComfyUI does.
    """
    import torch

    x = latents[0].float()
    f = torch.as_tensor(factors, dtype=torch.float32, device=x.device)
    b = torch.as_tensor(bias, dtype=torch.float32, device=x.device)
    if f.shape != (x.shape[0], 3):
        raise ValueError(f"latent->RGB factors are {tuple(f.shape)}, latents have {x.shape[0]} channels")
    rgb = torch.einsum("chw,cr->hwr", x, f) + b
    pixels = ((rgb + 1.0) * 127.5).clamp(0, 255).round().to(torch.uint8).cpu().numpy()
    from PIL import Image as PILImage

    return downscale(PILImage.fromarray(pixels), max_side)


def fast_preview(pipe: Any, x0: "torch.Tensor", max_side: int) -> "Image":
    """The ``fast`` preview for a diffusers pipeline, with its class's factors from ``LATENT_RGB_FACTORS``."""
    factors, bias = LATENT_RGB_FACTORS[type(pipe).__name__]
    return latents_to_rgb_fast(x0, factors, bias, max_side)


def vae_preview(pipe: Any, x0: "torch.Tensor", max_side: int) -> "Image":
    """The ``vae`` preview: decode x0 exactly as the pipeline decodes its final latents."""
    import torch

    vae = pipe.vae
    with torch.inference_mode():  # also safe when called outside the pipeline's no-grad context
        latents = x0[:1].to(vae.dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:  # Z-Image (FLUX VAE) shifts; CogView4 does not
            latents = latents + shift
        decoded = vae.decode(latents, return_dict=False)[0]
    image = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
    return downscale(image.convert("RGB"), max_side)


def render_preview(method: str, pipe: Any, x0: "torch.Tensor", max_side: int) -> "Image | None":
    """Dispatch on ``method`` ("fast" | "vae" | "none"); raises ``ValueError`` for anything else."""
    if method == "none":
        return None
    if method == "fast":
        return fast_preview(pipe, x0, max_side)
    if method == "vae":
        return vae_preview(pipe, x0, max_side)
    raise ValueError(f"unknown preview method '{method}'; expected one of {', '.join(PREVIEW_METHODS)}")


def downscale(image: "Image", max_side: int) -> "Image":
    """Shrink (never enlarge) so the longest side is at most ``max_side``, keeping the aspect ratio."""
    from PIL import Image as PILImage

    longest = max(image.size)
    if max_side <= 0 or longest <= max_side:
        return image
    scale = max_side / longest
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, PILImage.Resampling.BILINEAR)


def fit_latent_rgb_factors(latents: "torch.Tensor", pixels: "torch.Tensor", downsample: int = 8):
    """Least-squares fit of ``pixels ~ latents x F + bias``; returns (F as C x 3, bias as 3) tensors.

    ``latents`` is (B, C, h, w) in the pipeline's space, ``pixels`` the matching VAE decodes
    (B, 3, h*downsample, w*downsample) in [-1, 1]. Pixels are average-pooled to the latent grid first.
    This is how published tables are made, and how one is made for any (e.g. tiny) VAE.
    """
    import torch

    target = torch.nn.functional.avg_pool2d(pixels.float(), downsample)
    x = latents.float().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    design = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)
    solution = torch.linalg.lstsq(design.cpu(), y.cpu()).solution
    return solution[:-1], solution[-1]

