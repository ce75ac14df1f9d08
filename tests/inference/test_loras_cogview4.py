"""LoRA adapters on the real diffusers path with the tiny CogView4 (``CogView4Pipeline``'s own loader):
the submit check tells CogView4 adapters from Z-Image ones by their keys and ``to_q`` width; weight 1
changes the image, weight 0 and 'no adapter' are the plain model to the last bit, a weight scales the
delta, nothing of one job's adapters reaches the next job (also across the two resident pipelines),
and an adapter for another model is refused as the client's 400 with the pipeline left clean."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

import numpy as np
import pytest

from server.core.errors import InvalidRequest
from server.core.generation import GenerationRequest
from server.core.loras import LoraDirectory, LoraRef
from server.core.profiles import get_profile
from tests.conftest import SHARED_CACHE
from tests.lora_helpers import adapted_generator, lora_ref, write_adapter

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

COGVIEW = "tiny-cogview4"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    write_adapter(root / "cv_alpha.safetensors", SHARED_CACHE, seed=1, model="cogview4")
    write_adapter(root / "cv_beta.safetensors", SHARED_CACHE, seed=2, model="cogview4")
    write_adapter(root / "cv_wide.safetensors", SHARED_CACHE, seed=3, model="cogview4", width=64)
    write_adapter(root / "cv_kohya.safetensors", SHARED_CACHE, seed=1, model="cogview4", layout="kohya")
    write_adapter(root / "cv_peft.safetensors", SHARED_CACHE, seed=1, model="cogview4", layout="peft")
    write_adapter(root / "z_alpha.safetensors", SHARED_CACHE, seed=1)
    return root


@pytest.fixture(scope="module")
def generator(lora_dir):
    yield from adapted_generator(lora_dir, SHARED_CACHE, max_count=4)


ref = lora_ref


def image(generator, *loras: LoraRef, model: str = COGVIEW, **overrides) -> np.ndarray:
    values = dict(model=model, variant=None, prompt="a red fox", negative_prompt=None, width=64, height=64,
                  steps=2, guidance_scale=5.0 if model == COGVIEW else 0.0, seed=7, preview_method="none",
                  loras=tuple(loras))
    values.update(overrides)
    [result] = generator.generate(GenerationRequest(**values), lambda update: None, lambda: False)
    return np.asarray(result)


def adapter_names(generator) -> set[str]:
    return set(generator.pipeline_for(COGVIEW).get_list_adapters().get("transformer", []))


def test_the_listing_tells_cogview4_adapters_from_z_image_ones(lora_dir):
    files = LoraDirectory(lora_dir).files()
    cogview, tiny_z, real_cogview = get_profile(COGVIEW), get_profile("tiny-z-image"), get_profile("cogview4")
    assert (files["cv_alpha"].family, files["cv_alpha"].in_features) == ("CogView4Pipeline", 32)
    assert files["cv_alpha"].fits(cogview) and not files["cv_alpha"].fits(tiny_z)
    assert not files["cv_alpha"].fits(real_cogview)  # the 6B model's to_q takes 4096 features
    assert files["z_alpha"].fits(tiny_z) and not files["z_alpha"].fits(cogview)
    assert files["cv_wide"].in_features == 64 and not files["cv_wide"].fits(cogview)
    # CogView4's loader converts no other layout (Z-Image's does): these would load nothing
    for name in ("cv_kohya", "cv_peft"):
        assert files[name].family is None and not files[name].fits(cogview) and not files[name].fits(tiny_z)


@pytest.mark.parametrize("name", ["cv_kohya", "cv_peft"])
def test_the_layouts_the_listing_refuses_do_not_load(generator, name):
    """The other side of the listing's rule: CogView4Pipeline.load_lora_weights loads nothing from them."""
    before = adapter_names(generator)
    with pytest.raises(InvalidRequest) as caught:
        image(generator, ref(generator, name))
    assert name in caught.value.message and caught.value.param == "loras"
    assert adapter_names(generator) == before


def test_weight_one_changes_weight_zero_and_none_do_not_and_nothing_leaks(generator):
    plain = image(generator)
    with_alpha = image(generator, ref(generator, "cv_alpha"))
    assert np.abs(with_alpha.astype(int) - plain).max() > 0
    assert np.array_equal(image(generator, ref(generator, "cv_alpha", 0.0)), plain)
    assert np.array_equal(image(generator), plain)
    with_beta = image(generator, ref(generator, "cv_beta"))
    assert not np.array_equal(with_beta, plain) and not np.array_equal(with_beta, with_alpha)
    assert np.array_equal(image(generator, ref(generator, "cv_alpha")), with_alpha)  # A -> B -> A
    image(generator, ref(generator, "z_alpha"), model="tiny-z-image")  # the other resident pipeline
    assert np.array_equal(image(generator), plain)


def test_a_weight_scales_the_adapter_delta(generator):
    from peft.tuners.lora import Linear as LoraLinear

    image(generator, ref(generator, "cv_alpha", 0.5))
    layer = generator.pipeline_for(COGVIEW).transformer.transformer_blocks[0].attn1.to_q
    assert isinstance(layer, LoraLinear) and layer.active_adapters == [ref(generator, "cv_alpha").adapter_name]
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        name = layer.active_adapters[0]
        delta = layer.lora_B[name](layer.lora_A[name](x))  # rank == alpha: PEFT's own scaling is 1
        assert torch.allclose(layer(x), layer.base_layer(x) + 0.5 * delta, atol=1e-5)


def test_an_adapter_for_another_model_is_refused_at_submit(generator):
    directory = generator.adapters.directory
    for name in ("z_alpha", "cv_wide"):
        with pytest.raises(InvalidRequest) as caught:
            directory.resolve([(name, 1.0)], get_profile(COGVIEW), None, max_count=4)
        assert caught.value.param == "loras[0].name" and name in caught.value.message
    with pytest.raises(InvalidRequest):
        directory.resolve([("cv_alpha", 1.0)], get_profile("tiny-z-image"), None, max_count=4)


@pytest.mark.parametrize("name", ["z_alpha", "cv_wide"])
def test_an_adapter_that_does_not_load_leaves_the_pipeline_clean(generator, name):
    """Past the submit check (a worker's own check): keys of no CogView4 layer, or the wrong width."""
    plain = image(generator)
    before = adapter_names(generator)
    with pytest.raises(InvalidRequest) as caught:
        image(generator, ref(generator, name))
    assert name in caught.value.message and caught.value.param == "loras"
    assert adapter_names(generator) == before
    assert np.array_equal(image(generator), plain)
