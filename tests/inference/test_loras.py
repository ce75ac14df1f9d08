"""LoRA adapters on the real diffusers path with the tiny Z-Image: weight 1 changes the image, weight
0 and 'no adapter' are the plain model to the last bit, two adapters combine, nothing of one job's
adapters reaches the next job (text-to-image, edits, the SDNQ uint4 variant), the LRU drops adapters,
a file that does not load leaves the pipeline clean."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

import numpy as np
import pytest
from PIL import Image

from server.core import inputs
from server.core.errors import InvalidRequest
from server.core.generation import GenerationRequest
from server.core.loras import LoraRef
from tests.conftest import SHARED_CACHE
from tests.lora_helpers import adapted_generator, lora_ref, write_adapter

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    write_adapter(root / "alpha.safetensors", SHARED_CACHE, seed=1)
    write_adapter(root / "beta.safetensors", SHARED_CACHE, seed=2)
    write_adapter(root / "alpha_kohya.safetensors", SHARED_CACHE, seed=1, layout="kohya")
    write_adapter(root / "wide.safetensors", SHARED_CACHE, seed=3, width=128)
    return root


@pytest.fixture(scope="module")
def generator(lora_dir):
    yield from adapted_generator(lora_dir, SHARED_CACHE, max_count=2)


ref = lora_ref


def image(generator, *loras: LoraRef, variant=None, **overrides) -> np.ndarray:
    values = dict(model="tiny-z-image", variant=variant, prompt="a red fox", negative_prompt=None, width=64,
                  height=64, steps=2, guidance_scale=0.0, seed=7, preview_method="none", loras=tuple(loras))
    values.update(overrides)
    [result] = generator.generate(GenerationRequest(**values), lambda update: None, lambda: False)
    return np.asarray(result)


def test_weight_one_changes_weight_zero_and_none_do_not_and_nothing_leaks(generator):
    plain = image(generator)
    with_alpha = image(generator, ref(generator, "alpha"))
    assert np.abs(with_alpha.astype(int) - plain).max() > 0
    assert np.array_equal(image(generator, ref(generator, "alpha", 0.0)), plain)
    assert np.array_equal(image(generator), plain)  # A -> B -> A: the two A images to the last bit
    assert np.array_equal(image(generator, ref(generator, "alpha")), with_alpha)  # and B again is B


def test_two_adapters_combine_and_the_converted_layout_is_the_same_adapter(generator):
    alpha, beta = image(generator, ref(generator, "alpha")), image(generator, ref(generator, "beta"))
    both = image(generator, ref(generator, "alpha"), ref(generator, "beta"))
    assert not np.array_equal(both, alpha) and not np.array_equal(both, beta)
    assert np.array_equal(image(generator, ref(generator, "alpha_kohya")), alpha)


def test_lru_deletes_the_least_recently_used_adapter(generator):
    image(generator, ref(generator, "alpha"))
    image(generator, ref(generator, "beta"))
    image(generator, ref(generator, "alpha_kohya"))  # max_count 2 (same content as alpha: one adapter)
    image(generator, ref(generator, "beta"), ref(generator, "alpha"))
    pipe = generator.pipeline_for("tiny-z-image")
    loaded = set(pipe.get_list_adapters().get("transformer", []))
    assert loaded == set(generator.adapters.loaded()) and len(loaded) == 2


def test_an_adapter_that_does_not_load_leaves_the_pipeline_clean(generator):
    plain = image(generator)
    before = set(generator.pipeline_for("tiny-z-image").get_list_adapters().get("transformer", []))
    with pytest.raises(InvalidRequest) as caught:
        image(generator, ref(generator, "wide"))
    assert "wide" in caught.value.message and caught.value.param == "loras"
    assert set(generator.pipeline_for("tiny-z-image").get_list_adapters().get("transformer", [])) == before
    assert np.array_equal(image(generator), plain)


def test_a_changed_file_is_refused_by_hash(generator):
    stale = LoraRef(name="alpha", sha256="0" * 64, weight=1.0)
    with pytest.raises(InvalidRequest, match="alpha"):
        image(generator, stale)


def test_edits_take_adapters_and_leak_nothing(generator, tmp_path):
    picture = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    import io

    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    buffer.seek(0)
    stored = inputs.ingest(tmp_path, buffer, None, 10**6)
    edit = dict(image_path=str(inputs.input_path(tmp_path, stored.image_sha)), strength=0.6, steps=4)
    plain = image(generator, **edit)
    assert not np.array_equal(image(generator, ref(generator, "alpha"), **edit), plain)
    assert np.array_equal(image(generator, **edit), plain)


def test_sdnq_uint4_layers_are_wrapped_unfused(generator):
    """PEFT wraps SDNQ's quantized linear layers: the quantized base runs, the delta is added."""
    from peft.tuners.lora import Linear as LoraLinear
    from sdnq.layers import SDNQLinear

    plain = image(generator, variant="uint4")
    adapted = image(generator, ref(generator, "alpha"), variant="uint4")
    assert not np.array_equal(adapted, plain)
    assert np.array_equal(image(generator, variant="uint4"), plain)
    layer = generator.pipeline_for("tiny-z-image", "uint4").transformer.layers[0].attention.to_q
    assert isinstance(layer, LoraLinear) and isinstance(layer.base_layer, SDNQLinear)
    image(generator, ref(generator, "alpha"), variant="uint4")  # active again, weight 1
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        name = layer.active_adapters[0]
        delta = layer.lora_B[name](layer.lora_A[name](x)) * layer.scaling[name]
        assert torch.allclose(layer(x), layer.base_layer(x) + delta, atol=1e-5)
