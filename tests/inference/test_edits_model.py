"""Edits on the real diffusers path with the tiny Z-Image: img2img and inpaint pipelines from the
loaded pipeline, the mask honoured, steps x strength, previews, CogView4 refused."""

from __future__ import annotations

import io
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SDNQ_USE_TORCH_COMPILE", "0")

import numpy as np
import pytest
from PIL import Image

from server.core import inputs
from server.core.errors import InvalidRequest
from server.core.generation import GenerationRequest
from server.model import DiffusersGenerator

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield DiffusersGenerator(tmp_path_factory.mktemp("edit-cache"), device="cpu", max_resident=2)
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    out = tmp_path_factory.mktemp("edit-out")
    image = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype("uint8"))
    mask = Image.new("RGBA", (96, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 48, 64))  # left half transparent: edit it
    sources = []
    for picture in (image, mask):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG")
        buffer.seek(0)
        sources.append(buffer)
    edit = inputs.ingest(out, sources[0], sources[1], 10**6)
    return out, edit, np.asarray(image, dtype=np.int16)


def edit_request(stored, masked: bool, **overrides) -> GenerationRequest:
    out, edit, _ = stored
    values = dict(model="tiny-z-image", variant=None, prompt="a red fox", negative_prompt=None, width=96, height=64,
                  steps=9, guidance_scale=0.0, seed=3, preview_method="fast", preview_interval=1,
                  image_path=str(inputs.input_path(out, edit.image_sha)),
                  mask_path=str(inputs.input_path(out, edit.mask_sha)) if masked else None,
                  strength=1.0 if masked else 0.6)
    values.update(overrides)
    return GenerationRequest(**values)


def test_img2img_runs_steps_times_strength_with_previews_on_the_same_weights(generator, stored):
    updates = []
    images = generator.generate(edit_request(stored, masked=False), updates.append, lambda: False)
    assert images[0].size == (96, 64) and images[0].mode == "RGB"
    assert [(u.step, u.total_steps) for u in updates] == [(s, 6) for s in range(1, 7)]  # 9 x 0.6 -> 6
    assert all(u.preview is not None for u in updates)
    base = generator.pipeline_for("tiny-z-image")
    derived = generator.edit_pipeline_for("tiny-z-image")
    assert type(derived).__name__ == "ZImageImg2ImgPipeline"
    assert derived.transformer is base.transformer and derived.vae is base.vae  # from_pipe: no second copy


def test_inpaint_keeps_pixels_outside_the_mask_and_changes_inside(generator, stored):
    _, _, original = stored
    updates = []
    images = generator.generate(edit_request(stored, masked=True), updates.append, lambda: False)
    result = np.asarray(images[0], dtype=np.int16)
    assert np.abs(result[:, 48:] - original[:, 48:]).max() <= 2  # opaque in the mask: kept
    assert np.abs(result[:, :48] - original[:, :48]).mean() > 10  # transparent: repainted
    assert len(updates) == 9


def test_edit_at_another_size_resizes_the_input_first(generator, stored):
    images = generator.generate(edit_request(stored, masked=True, width=128, height=64, steps=2), lambda u: None,
                                lambda: False)
    assert images[0].size == (128, 64)


def test_cogview4_refuses_edits(generator, stored):
    with pytest.raises(InvalidRequest, match="cannot edit") as caught:
        generator.generate(edit_request(stored, masked=False, model="tiny-cogview4"), lambda u: None, lambda: False)
    assert caught.value.param == "model"
