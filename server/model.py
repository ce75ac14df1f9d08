"""The diffusers-backed ``Generator``: loads pipelines, runs them, streams steps and previews.

``DiffusersGenerator`` owns every loaded pipeline (no module-level model state). Real repositories
load from the Hugging Face cache (``HF_HOME``); ``tiny:<name>`` repositories are built offline by
``server.inference.tiny_models`` into ``<cache_dir>/tiny/<name>`` and then loaded with the very same
``PipelineClass.from_pretrained(path)`` call. Torch and diffusers are imported lazily, so importing
this module is cheap.

Threading: ``generate`` is called from one thread at a time (the job core's GPU thread); ``load``
and ``describe`` may come from other threads. Loads are serialized by one lock; the table of
resident pipelines by another, so ``describe`` never waits for a load or a generation.
"""

from __future__ import annotations

import gc
import logging
import pathlib
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from server.core.errors import GenerationFailed, InvalidRequest, JobCancelled, ModelLoadError, OutOfMemory, ServerError
from server.core.generation import CancelCheck, GenerationRequest, StepCallback
from server.core.profiles import ModelProfile, get_profile
from server.inference import edits
from server.inference.loras import Adapters
from server.inference.steps import StepTracker

if TYPE_CHECKING:
    from PIL.Image import Image

logger = logging.getLogger(__name__)

_MAX_REASON_CHARS = 160


def _one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, shortened: safe to show a client, no traceback."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= _MAX_REASON_CHARS else text[: _MAX_REASON_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


class DiffusersGenerator:
    """``server.core.generation.Generator`` over diffusers ``ZImagePipeline`` / ``CogView4Pipeline``.

    ``device`` None picks "cuda" when available, else "cpu"; the dtype is bfloat16 on CUDA and
    float32 on CPU. At most ``max_resident`` pipelines stay loaded (least recently used goes
    first). ``use_quantized_matmul`` turns on SDNQ's quantized matmul for quantized components on
    CUDA. ``adapters`` holds LoRA adapters per resident pipeline (``server.inference.loras``).
    """

    def __init__(self, cache_dir: pathlib.Path, device: str | None = None, max_resident: int = 1,
                 use_quantized_matmul: bool = True, adapters: Adapters | None = None):
        self.cache_dir = pathlib.Path(cache_dir)
        self._requested_device = device
        self._device: str | None = None
        self.max_resident = max(1, int(max_resident))
        self.use_quantized_matmul = use_quantized_matmul
        self._pipes: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._edit_pipes: dict[tuple[str, str, str], Any] = {}  # (model, variant, class) -> from_pipe view
        self._state_lock = threading.Lock()  # guards _pipes and _device
        self._load_lock = threading.RLock()  # serializes loads and evictions
        self.adapters = adapters if adapters is not None else Adapters()

    def adopt_pipeline(self, model: str, variant: str, pipe: Any) -> None:
        """Serve an already built pipeline as ``model``/``variant`` (benchmarks with random weights)."""
        with self._state_lock:
            self._pipes[(model, variant)] = pipe

    # -- Generator protocol -------------------------------------------------------------------

    def load(self, model: str, variant: str | None) -> None:
        """Make ``model``/``variant`` resident; ``ModelNotFound``, ``InvalidRequest`` or ``ModelLoadError``."""
        profile = get_profile(model)
        self._ensure_loaded(profile, self._resolve_variant(profile, variant))

    def describe(self) -> dict:
        """``{"device", "dtype", "loaded": [{"model", "variant"}]}`` (least recently used first)."""
        device = self._resolve_device()
        with self._state_lock:
            loaded = [{"model": m, "variant": v} for (m, v) in self._pipes]
        return {"device": device, "dtype": self._dtype_name(device), "loaded": loaded}

    def generate(self, request: GenerationRequest, on_step: StepCallback, is_cancelled: CancelCheck) -> "list[Image]":
        """Run ``request.n`` images seeded ``seed + i``; see ``server.core.generation.Generator``.

        Raises ``InvalidRequest`` (size/steps/variant), ``ModelLoadError``, ``JobCancelled``,
        ``OutOfMemory`` or ``GenerationFailed``.
        """
        profile = get_profile(request.model)
        variant = self._resolve_variant(profile, request.variant)
        self._validate(profile, request)
        if request.is_edit and not profile.supports_edits:
            raise InvalidRequest(f"The model '{profile.model_id}' cannot edit images.", param="model")
        pipe = self._ensure_loaded(profile, variant)
        self.adapters.activate((profile.model_id, variant), pipe, request.loras)
        edit = None
        if request.is_edit:
            edit = edits.load_inputs(request)
            pipe = self._edit_pipeline(profile, variant, pipe, masked=edit.mask is not None)
        images = []
        for index in range(request.n):
            if is_cancelled():
                raise JobCancelled()
            images.append(self._run_one(pipe, profile, request, index, on_step, is_cancelled, edit))
        return images

    # -- helpers for callers and tests --------------------------------------------------------

    def pipeline_for(self, model: str, variant: str | None = None) -> Any:
        """The resident diffusers pipeline for ``model``/``variant``, loading it if needed."""
        profile = get_profile(model)
        return self._ensure_loaded(profile, self._resolve_variant(profile, variant))

    def edit_pipeline_for(self, model: str, variant: str | None = None, masked: bool = False) -> Any:
        """The img2img (or, ``masked``, inpaint) pipeline over the resident ``model``/``variant``."""
        profile = get_profile(model)
        resolved = self._resolve_variant(profile, variant)
        return self._edit_pipeline(profile, resolved, self.pipeline_for(model, variant), masked)

    def unload_all(self) -> None:
        """Drop every resident pipeline and free cached device memory."""
        with self._load_lock:
            with self._state_lock:
                for key in list(self._pipes):
                    self.adapters.forget(key)
                self._pipes.clear()
                self._edit_pipes.clear()
            self._free_memory()

    @property
    def device(self) -> str:
        return self._resolve_device()

    # -- internals ----------------------------------------------------------------------------

    def _resolve_device(self) -> str:
        with self._state_lock:
            if self._device is None:
                if self._requested_device is not None:
                    self._device = self._requested_device
                else:
                    import torch

                    self._device = "cuda" if torch.cuda.is_available() else "cpu"
            return self._device

    @staticmethod
    def _dtype_name(device: str) -> str:
        return "bfloat16" if device.startswith("cuda") else "float32"

    def _torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self._dtype_name(self._resolve_device()))

    @staticmethod
    def _resolve_variant(profile: ModelProfile, variant: str | None) -> str:
        chosen = variant if variant is not None else profile.default_variant
        if chosen not in profile.repos:
            allowed = ", ".join(profile.variants)
            raise InvalidRequest(
                f"The model '{profile.model_id}' has no variant '{variant}'. Allowed variants: {allowed}.",
                param="model_type",
            )
        return chosen

    @staticmethod
    def _validate(profile: ModelProfile, request: GenerationRequest) -> None:
        """Size and step rules of the profile; ``InvalidRequest`` naming the rule and the param."""
        for param, value in (("width", request.width), ("height", request.height)):
            if value % profile.size_multiple != 0:
                raise InvalidRequest(
                    f"{param} must be a multiple of {profile.size_multiple} (got {value}).", param=param
                )
            if not profile.min_size <= value <= profile.max_size:
                raise InvalidRequest(
                    f"{param} must be between {profile.min_size} and {profile.max_size} pixels (got {value}).",
                    param=param,
                )
        if not 1 <= request.steps <= profile.max_steps:
            raise InvalidRequest(f"steps must be between 1 and {profile.max_steps} (got {request.steps}).",
                                 param="steps")
        if request.n < 1:
            raise InvalidRequest(f"n must be at least 1 (got {request.n}).", param="n")

    def _ensure_loaded(self, profile: ModelProfile, variant: str) -> Any:
        key = (profile.model_id, variant)
        with self._load_lock:
            with self._state_lock:
                if key in self._pipes:
                    self._pipes.move_to_end(key)
                    return self._pipes[key]
            self._evict_for_one_more()
            pipe = self._load_pipeline(profile, variant)
            with self._state_lock:
                self._pipes[key] = pipe
            return pipe

    def _edit_pipeline(self, profile: ModelProfile, variant: str, base: Any, masked: bool) -> Any:
        """The img2img or inpaint pipeline over ``base``'s modules (``from_pipe``: no second copy
        of the weights), made once per resident pipeline."""
        key = (profile.model_id, variant, edits.INPAINT if masked else edits.IMG2IMG)
        with self._state_lock:
            pipe = self._edit_pipes.get(key)
        if pipe is None:
            pipe = edits.derive(base, masked)
            with self._state_lock:
                self._edit_pipes[key] = pipe
        return pipe

    def _evict_for_one_more(self) -> None:
        """Unload least recently used pipelines until one more fits (before loading: peak memory)."""
        evicted = False
        with self._state_lock:
            while len(self._pipes) >= self.max_resident:
                (model, variant), _ = self._pipes.popitem(last=False)
                self.adapters.forget((model, variant))
                for key in [k for k in self._edit_pipes if k[:2] == (model, variant)]:
                    del self._edit_pipes[key]  # they share the evicted weights
                logger.info("unloading %s (%s)", model, variant)
                evicted = True
        if evicted:
            self._free_memory()

    def _free_memory(self) -> None:
        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _load_pipeline(self, profile: ModelProfile, variant: str) -> Any:
        """``PipelineClass.from_pretrained`` of the variant's repo (or built tiny folder), on the device."""
        from server.inference import tiny_models

        repo = profile.repos[variant]
        try:
            import diffusers

            if profile.pipeline_class == "ZImagePipeline":
                # Must precede from_pretrained: it registers the SDNQ quantizer; without it
                # transformers silently mis-loads the quantized text encoder.
                import sdnq  # noqa: F401
            pipeline_class = getattr(diffusers, profile.pipeline_class)
            if tiny_models.is_tiny_repo(repo):
                source = str(tiny_models.tiny_model_dir(self.cache_dir, repo[len(tiny_models.TINY_PREFIX):]))
            else:
                source = repo
            pipe = pipeline_class.from_pretrained(source, dtype=self._torch_dtype())
            pipe.to(self._resolve_device())
            pipe.set_progress_bar_config(disable=True)
        except Exception as exc:  # noqa: BLE001 - every load failure becomes one clear line
            logger.warning("loading %s failed: %s", repo, _one_line(exc))
            logger.debug("load failure details", exc_info=True)
            raise ModelLoadError(self._load_error_message(profile, variant, repo, exc)) from None
        self._apply_quantized_matmul(pipe)
        logger.info("loaded %s (%s) from %s on %s", profile.model_id, variant, source, self._resolve_device())
        return pipe

    @staticmethod
    def _load_error_message(profile: ModelProfile, variant: str, repo: str, exc: BaseException) -> str:
        from server.inference import tiny_models

        if tiny_models.is_tiny_repo(repo):
            remedy = "check that the cache directory is writable and the Python packages are installed"
        else:
            from huggingface_hub import constants

            remedy = (
                f"download the weights into the Hugging Face cache ({constants.HF_HUB_CACHE}; set HF_HOME to move it) "
                "with network access and HF_HUB_OFFLINE unset, or run the offline demo with `--model tiny-z-image`"
            )
        return (
            f"Could not load model '{profile.model_id}' (variant {variant}) from repository '{repo}' "
            f"({_one_line(exc)}). Remedy: {remedy}."
        ).replace("\n", " ")

    def _apply_quantized_matmul(self, pipe: Any) -> None:
        """SDNQ's quantized matmul for quantized components (CUDA only; eager CPU gains nothing)."""
        if not (self.use_quantized_matmul and self._resolve_device().startswith("cuda")):
            return
        try:
            from sdnq import SDNQConfig
            from sdnq.loader import apply_sdnq_options_to_model
        except ImportError:
            return
        for name, component in list(pipe.components.items()):
            if not isinstance(getattr(component, "quantization_config", None), SDNQConfig):
                continue
            try:
                updated = apply_sdnq_options_to_model(component, use_quantized_matmul=True)
                if updated is not None and updated is not component:
                    setattr(pipe, name, updated)
            except Exception:  # noqa: BLE001 - an optimization: fall back to dequantized matmul
                logger.warning("SDNQ quantized matmul unavailable for %s", name, exc_info=True)

    def _initial_latents(self, pipe: Any, request: GenerationRequest, generator: Any) -> Any:
        """The pipeline's own initial noise (same shape, dtype and RNG draw as ``prepare_latents``).

        Made here because x0 previews of step 1 need the latents before the first step.
        """
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        scale = pipe.vae_scale_factor
        shape = (1, pipe.transformer.config.in_channels, request.height // scale, request.width // scale)
        return randn_tensor(shape, generator=generator, device=pipe._execution_device, dtype=torch.float32)

    def _run_one(self, pipe: Any, profile: ModelProfile, request: GenerationRequest, index: int,
                 on_step: StepCallback, is_cancelled: CancelCheck, edit: "edits.EditImages | None" = None) -> "Image":
        import torch

        generator = torch.Generator(device=pipe._execution_device).manual_seed(request.seed + index)
        failure: ServerError | None = None
        try:
            with torch.inference_mode():
                kwargs: dict[str, Any] = {
                    "prompt": [request.prompt],  # a fresh list: the pipeline rewrites list prompts in place
                    "width": request.width,
                    "height": request.height,
                    "num_inference_steps": request.steps,
                    "guidance_scale": request.guidance_scale,
                    "generator": generator,
                    "callback_on_step_end_tensor_inputs": ["latents"],
                }
                if edit is None:
                    kwargs["latents"] = self._initial_latents(pipe, request, generator)
                else:  # the pipeline makes the starting latents from the image
                    kwargs.update(edits.pipeline_kwargs(edit, request))
                kwargs["callback_on_step_end"] = StepTracker(request, index, kwargs.get("latents"), on_step, is_cancelled)
                if profile.supports_negative_prompt and request.negative_prompt:
                    kwargs["negative_prompt"] = [request.negative_prompt]
                image = pipe(**kwargs).images[0].convert("RGB")
                return image if edit is None else edits.keep_unmasked(image, edit)
        except (JobCancelled, ServerError):
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to the domain errors below
            failure = self._map_failure(exc, request)
        # Outside the except block: the traceback (and the tensors its frames hold) is gone now,
        # so emptying the CUDA cache can actually return the memory.
        if isinstance(failure, OutOfMemory):
            self._free_memory()
        raise failure

    def _map_failure(self, exc: Exception, request: GenerationRequest) -> ServerError:
        if _is_oom(exc):
            logger.warning("out of memory generating %dx%d on %s", request.width, request.height, self.device)
            return OutOfMemory(
                f"Out of memory on {self.device} generating {request.width}x{request.height}; "
                "try a smaller size or fewer images, or retry when the device is less busy."
            )
        logger.warning("generation failed", exc_info=exc)
        return GenerationFailed(f"Generation failed: {_one_line(exc)}")
