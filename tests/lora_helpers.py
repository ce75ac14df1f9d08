"""Tiny LoRA adapters for the tiny Z-Image and tiny CogView4 transformers, built offline with ``peft``
at test time: diffusers' own layout (the pipeline class's ``save_lora_weights``, which its
``load_lora_weights`` reads) and, for Z-Image, the non-diffusers layout (``diffusion_model.`` prefix,
``lora_down``/``lora_up`` + ``alpha``) that diffusers' lora_conversion_utils converts."""

from __future__ import annotations

import functools
from pathlib import Path

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# tiny model name -> (pipeline class, transformer class); both transformers name their attention
# projections to_q/to_k/to_v/to_out.0 (Z-Image: layers.N.attention, CogView4: transformer_blocks.N.attn1).
MODELS = {"z-image": ("ZImagePipeline", "ZImageTransformer2DModel"),
          "cogview4": ("CogView4Pipeline", "CogView4Transformer2DModel")}


def _transformer(cache_dir: str, model: str, width: int | None):
    import diffusers

    from server.inference import tiny_models

    cls = getattr(diffusers, MODELS[model][1])
    folder = tiny_models.tiny_model_dir(Path(cache_dir), model) / "transformer"
    if width is None:
        return cls.from_pretrained(folder)
    # a transformer of another width: its adapter fits no layer of the tiny model
    config = dict(cls.load_config(folder))
    if model == "z-image":
        config["dim"] = width
        config["n_heads"] = config["n_kv_heads"] = width // sum(config["axes_dims"])
    else:
        config["num_attention_heads"] = width // config["attention_head_dim"]
    return cls.from_config(config)


@functools.lru_cache(maxsize=None)
def _state_dict(cache_dir: str, seed: int, rank: int, width: int | None, model: str = "z-image") -> dict:
    import torch
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = _transformer(cache_dir, model, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS,
                                           init_lora_weights=False), adapter_name="make")
        state = get_peft_model_state_dict(transformer, adapter_name="make")
    return {key: value.detach().clone().contiguous() for key, value in state.items()}


def write_adapter(path: Path, cache_dir: Path, seed: int = 1, rank: int = 4, layout: str = "diffusers",
                  width: int | None = None, model: str = "z-image") -> Path:
    """Write an adapter for the tiny ``model`` (``width``: built for another width) to ``path``."""
    import diffusers
    from safetensors.torch import save_file

    import torch

    state = _state_dict(str(cache_dir), seed, rank, width, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "diffusers":
        pipeline_class = getattr(diffusers, MODELS[model][0])
        pipeline_class.save_lora_weights(str(path.parent), transformer_lora_layers=state, weight_name=path.name)
    elif layout == "peft":  # PEFT's own names, without the pipeline's ``transformer.`` prefix
        save_file(state, str(path))
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


def write_broken(path: Path, cache_dir: Path, model: str = "z-image") -> Path:
    """An adapter whose header looks right for the tiny ``model`` (family, to_q width) but one of
    whose tensors has the wrong shape: it passes the submit check and fails to load."""
    import diffusers

    import torch

    state = dict(_state_dict(str(cache_dir), 9, 4, None, model))
    key = next(k for k in state if k.endswith("to_v.lora_B.weight"))
    state[key] = torch.ones(state[key].shape[0] // 2, state[key].shape[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    pipeline_class = getattr(diffusers, MODELS[model][0])
    pipeline_class.save_lora_weights(str(path.parent), transformer_lora_layers=state, weight_name=path.name)
    return path


def adapted_generator(lora_dir: Path, cache_dir: Path, max_count: int):
    """Body of a module fixture: a CPU ``DiffusersGenerator`` whose adapters come from ``lora_dir``
    (at most ``max_count`` loaded), on one torch thread while it is in use."""
    import torch

    from server.core.loras import LoraDirectory
    from server.inference.loras import Adapters
    from server.model import DiffusersGenerator

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    adapters = Adapters(LoraDirectory(lora_dir), max_count=max_count, max_bytes=1 << 30)
    try:
        yield DiffusersGenerator(cache_dir, device="cpu", max_resident=2, adapters=adapters)
    finally:
        torch.set_num_threads(previous)


def lora_ref(generator, name: str, weight: float = 1.0):
    """The ``LoraRef`` a request for adapter ``name`` resolves to (its file's content hash)."""
    from server.core.loras import LoraRef

    return LoraRef(name=name, sha256=generator.adapters.directory.find(name).sha256, weight=weight)
