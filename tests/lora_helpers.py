"""Tiny LoRA adapters for the tiny Z-Image transformer, built offline with ``peft`` at test time:
diffusers' own layout (``save_lora_weights``) and the non-diffusers layout (``diffusion_model.``
prefix, ``lora_down``/``lora_up`` + ``alpha``) that diffusers' lora_conversion_utils converts."""

from __future__ import annotations

import functools
from pathlib import Path

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@functools.lru_cache(maxsize=None)
def _state_dict(cache_dir: str, seed: int, rank: int, width: int | None) -> dict:
    import torch
    from diffusers import ZImageTransformer2DModel
    from peft import LoraConfig, get_peft_model_state_dict

    from server.inference import tiny_models

    folder = tiny_models.tiny_model_dir(Path(cache_dir), "z-image") / "transformer"
    if width is None:
        transformer = ZImageTransformer2DModel.from_pretrained(folder)
    else:  # a transformer of another width: its adapter fits no layer of the tiny model
        config = dict(ZImageTransformer2DModel.load_config(folder))
        config["dim"] = width
        config["n_heads"] = config["n_kv_heads"] = width // sum(config["axes_dims"])
        transformer = ZImageTransformer2DModel.from_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS,
                                           init_lora_weights=False), adapter_name="make")
        state = get_peft_model_state_dict(transformer, adapter_name="make")
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def write_adapter(path: Path, cache_dir: Path, seed: int = 1, rank: int = 4, layout: str = "diffusers",
                  width: int | None = None) -> Path:
    """Write an adapter for the tiny Z-Image (``width``: built for another width) to ``path``."""
    from diffusers import ZImagePipeline
    from safetensors.torch import save_file

    import torch

    state = _state_dict(str(cache_dir), seed, rank, width)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        ZImagePipeline.save_lora_weights(str(path.parent), transformer_lora_layers=state, weight_name=path.name)
    else:
        converted = {}
        for key, value in state.items():
            module = key.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight")
            kind = "lora_down" if key.endswith("lora_A.weight") else "lora_up"
            converted[f"diffusion_model.{module}.{kind}.weight"] = value
            converted[f"diffusion_model.{module}.alpha"] = torch.tensor(float(rank))
        save_file(converted, str(path))
    return path


def write_unrelated(path: Path) -> Path:
    """A safetensors file with LoRA-named keys that name no layer of any served model."""
    import torch
    from safetensors.torch import save_file

    save_file({"transformer.no_such_block.proj.lora_A.weight": torch.zeros(4, 64),
               "transformer.no_such_block.proj.lora_B.weight": torch.zeros(64, 4)}, str(path))
    return path


def write_broken(path: Path, cache_dir: Path) -> Path:
    """An adapter whose header looks right for the tiny Z-Image (family, to_q width) but one of
    whose tensors has the wrong shape: it passes the submit check and fails to load."""
    from diffusers import ZImagePipeline

    import torch

    state = dict(_state_dict(str(cache_dir), 9, 4, None))
    key = next(k for k in state if k.endswith("to_v.lora_B.weight"))
    state[key] = torch.ones(state[key].shape[0] // 2, state[key].shape[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    ZImagePipeline.save_lora_weights(str(path.parent), transformer_lora_layers=state, weight_name=path.name)
    return path
