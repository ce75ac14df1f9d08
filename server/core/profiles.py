"""Per-model profiles: plain data the adapters and the job core need without loading any weights.

A profile says where the weights come from and what a request may ask of the model. Loading lives
in ``server.model``; this module must stay import-light (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelProfile:
    model_id: str
    pipeline_class: str  # "ZImagePipeline" | "CogView4Pipeline"
    repos: dict[str, str]  # variant -> Hugging Face repo id, or "tiny:<name>" for offline builds
    default_variant: str | None
    default_steps: int
    default_guidance: float
    default_size: int = 1024
    min_size: int = 256
    max_size: int = 2048
    size_multiple: int = 16
    max_steps: int = 100
    supports_negative_prompt: bool = False
    is_demo: bool = False  # random weights: say so loudly wherever the model is listed
    description: str = ""
    # LoRA adapters: the attention query projection's input width (an adapter's lora_A of ``to_q``
    # must match it; None: not checked), and variants that cannot take adapters (none today: PEFT
    # wraps SDNQ's quantized linear layers unfused, see README "LoRA adapters").
    lora_width: int | None = None
    no_lora_variants: tuple[str, ...] = ()
    variants: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.repos))

    @property
    def supports_edits(self) -> bool:
        """img2img and inpainting: diffusers has them for Z-Image, not for CogView4."""
        return self.pipeline_class == "ZImagePipeline"

    def supports_loras(self, variant: str | None) -> bool:
        """Both pipelines have diffusers' LoRA loader mixin (ZImage..., CogView4LoraLoaderMixin)."""
        return self.pipeline_class in ("ZImagePipeline", "CogView4Pipeline") and variant not in self.no_lora_variants


PROFILES: dict[str, ModelProfile] = {
    profile.model_id: profile
    for profile in (
        ModelProfile(
            model_id="z-image-turbo",
            pipeline_class="ZImagePipeline",
            repos={
                "uint4": "Disty0/Z-Image-Turbo-SDNQ-uint4-svd-r32",
                "int8": "Disty0/Z-Image-Turbo-SDNQ-int8",
            },
            default_variant="uint4",
            default_steps=9,
            default_guidance=0.0,
            lora_width=3840,
            description="Z-Image-Turbo, SDNQ-quantized",
        ),
        ModelProfile(
            model_id="cogview4",
            pipeline_class="CogView4Pipeline",
            repos={"bf16": "THUDM/CogView4-6B"},
            default_variant="bf16",
            default_steps=50,
            default_guidance=5.0,
            supports_negative_prompt=True,
            lora_width=4096,
            description="CogView4-6B in bf16",
        ),
        ModelProfile(
            model_id="tiny-z-image",
            pipeline_class="ZImagePipeline",
            repos={"fp32": "tiny:z-image", "uint4": "tiny:z-image-uint4"},
            default_variant="fp32",
            default_steps=9,
            default_guidance=0.0,
            default_size=256,
            min_size=64,
            max_size=1024,
            is_demo=True,
            lora_width=64,
            description="random-weight demo model (ZImagePipeline); images are noise-like",
        ),
        ModelProfile(
            model_id="tiny-cogview4",
            pipeline_class="CogView4Pipeline",
            repos={"fp32": "tiny:cogview4"},
            default_variant="fp32",
            default_steps=10,
            default_guidance=5.0,
            default_size=256,
            min_size=64,
            max_size=1024,
            supports_negative_prompt=True,
            is_demo=True,
            lora_width=32,
            description="random-weight demo model (CogView4Pipeline); images are noise-like",
        ),
    )
}


def get_profile(model_id: str) -> ModelProfile:
    """The profile of a served model id; raises ``ModelNotFound`` naming the known ids."""
    from server.core.errors import ModelNotFound

    try:
        return PROFILES[model_id]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ModelNotFound(f"The model '{model_id}' does not exist. Known models: {known}.", param="model") from None
