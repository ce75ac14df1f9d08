"""Tiny random-weight pipelines, built offline and saved like a Hugging Face repository.

``tiny_model_dir(cache_dir, name)`` returns ``<cache_dir>/tiny/<name>``, a folder written by
``save_pretrained`` of a real diffusers pipeline class (``ZImagePipeline`` or ``CogView4Pipeline``)
whose components are miniature but architecturally faithful: same latent layout (16 channels,
8x VAE downsampling, sizes a multiple of 16), same scheduler family, same tokenizer kinds (built
in memory, no hub). The server then loads it with ``PipelineClass.from_pretrained(dir)``: exactly
the path real weights take. Builds are deterministic (fixed seed, isolated RNG) and written to a
temporary folder that is renamed into place, so concurrent processes never see a half-written
model. Images from these models are noise-like: they exist to exercise the mechanism.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import tempfile
from typing import Callable

logger = logging.getLogger(__name__)

TINY_PREFIX = "tiny:"
_SEED = 1234
# Byte-level tokens need no merges; a prompt of N bytes gives about N tokens.
_QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_GLM_SPECIALS = ("<|endoftext|>", "[gMASK]", "<sop>")
# Minimal Qwen3-style chat template: the pipeline calls it with add_generation_prompt=True and
# enable_thinking=True.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def is_tiny_repo(repo: str) -> bool:
    """True for the ``tiny:<name>`` repository strings used in profiles."""
    return repo.startswith(TINY_PREFIX)


def tiny_names() -> tuple[str, ...]:
    """The names ``tiny_model_dir`` can build."""
    return tuple(_BUILDERS)


def tiny_model_dir(cache_dir: pathlib.Path, name: str) -> pathlib.Path:
    """Build (once) and return the saved folder of the tiny pipeline ``name``.

    Raises ``KeyError`` for an unknown name. Reuses an existing complete folder (one holding
    ``model_index.json``); otherwise builds into a temporary sibling folder and renames it into
    place. When another process wins the race, its folder is used and ours is discarded.
    """
    if name not in _BUILDERS:
        raise KeyError(f"unknown tiny model '{name}'; known: {', '.join(_BUILDERS)}")
    root = pathlib.Path(cache_dir) / "tiny"
    target = root / name
    if (target / "model_index.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        pipe = _BUILDERS[name]()
        pipe.save_pretrained(tmp)
        try:
            os.rename(tmp, target)  # atomic on one filesystem; fails if target exists
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
        logger.info("built tiny model %s at %s", name, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _byte_alphabet() -> list[str]:
    """GPT-2's 256 printable stand-ins for bytes (what ByteLevel pre-tokenizers emit)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab = {tok: i for i, tok in enumerate(_byte_alphabet())}
    for tok in _QWEN_SPECIALS:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": list(_QWEN_SPECIALS[1:])})
    tokenizer.chat_template = _QWEN_CHAT_TEMPLATE
    return tokenizer


def _glm_tokenizer():
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(_GLM_SPECIALS)}
    for tok in _byte_alphabet():
        vocab[tok] = len(vocab)
    backend = Tokenizer(BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    # GLM-4 prepends "[gMASK]<sop>" to every prompt.
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", special_tokens=[("[gMASK]", 1), ("<sop>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|endoftext|>", eos_token="<|endoftext|>", padding_side="left"
    )


def _tiny_vae(scaling_factor: float, shift_factor: float | None):
    from diffusers import AutoencoderKL

    # Four levels give the real 8x downsampling; 16 latent channels match the real layout.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        latent_channels=16,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _build_z_image():
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer = _qwen_tokenizer()
        text_encoder = Qwen3Model(
            Qwen3Config(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=1024,
                tie_word_embeddings=True,
            )
        )
        # head dim 64/2 = 32 = sum(axes_dims); captions (<= 512 tokens) stay far below axes_lens[0].
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=2,
            n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=32,
            rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 12, 12], axes_lens=[1024, 128, 128],
        )
        vae = _tiny_vae(scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def _build_z_image_uint4():
    """The tiny Z-Image with its transformer SDNQ-quantized (uint4 + SVD), like the Disty0 repos."""
    from sdnq import sdnq_post_load_quant

    pipe = _build_z_image()
    # minimum_allowed_numel=0: tiny layers would otherwise be silently left unquantized.
    pipe.transformer = sdnq_post_load_quant(
        pipe.transformer, weights_dtype="uint4", use_svd=True, svd_rank=4, minimum_allowed_numel=0
    )
    return pipe


def _build_cogview4():
    import torch
    from diffusers import CogView4Pipeline, CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        tokenizer = _glm_tokenizer()
        # A shrunk vocab needs pad_token_id inside it (the default is far outside).
        text_encoder = GlmModel(
            GlmConfig(
                hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, head_dim=16, vocab_size=512, pad_token_id=0,
                max_position_embeddings=2048,
            )
        )
        transformer = CogView4Transformer2DModel(
            patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
            num_attention_heads=2, text_embed_dim=32, time_embed_dim=16, condition_dim=8,
            pos_embed_max_size=128, sample_size=128, rope_axes_dim=(256, 256),
        )
        vae = _tiny_vae(scaling_factor=1.0, shift_factor=None)
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    return CogView4Pipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


_BUILDERS: dict[str, Callable[[], object]] = {
    "z-image": _build_z_image,
    "z-image-uint4": _build_z_image_uint4,
    "cogview4": _build_cogview4,
}
