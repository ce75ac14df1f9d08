"""The adapter directory: names from the listing only, SHA-256 cached by (mtime, size), the key
layouts recognised from the header alone (no torch), request checks naming the param."""

from __future__ import annotations

import hashlib
import json
import os
import struct

import pytest

from server.core.errors import AdapterRejected, InvalidRequest
from server.core.loras import LoraDirectory, LoraRef
from server.core.profiles import get_profile


def safetensors(path, shapes: dict[str, list[int]]) -> bytes:
    """A valid safetensors file of zero-filled float32 tensors (written without torch)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + bytes(offset)
    path.write_bytes(data)
    return data


def z_image(path, width=64, layout="diffusers"):
    if layout == "diffusers":
        keys = {"transformer.layers.0.attention.to_q.lora_A.weight": [4, width],
                "transformer.layers.0.attention.to_q.lora_B.weight": [width, 4]}
    else:
        keys = {"lora_unet_layers_0_attention_to_q.lora_down.weight": [4, width],
                "lora_unet_layers_0_attention_to_q.lora_up.weight": [width, 4]}
    return safetensors(path, keys)


def test_listing_names_hashes_and_fit(tmp_path):
    data = z_image(tmp_path / "style.safetensors")
    z_image(tmp_path / "kohya.safetensors", layout="kohya")
    z_image(tmp_path / "big.safetensors", width=3840)
    (tmp_path / "notes.txt").write_text("not an adapter")
    (tmp_path / "sub").mkdir()
    z_image(tmp_path / "sub" / "hidden.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 4)
    files = LoraDirectory(tmp_path).files()
    assert sorted(files) == ["big", "kohya", "style"]
    assert files["style"].sha256 == hashlib.sha256(data).hexdigest() and files["style"].size == len(data)
    tiny, real, cog = get_profile("tiny-z-image"), get_profile("z-image-turbo"), get_profile("tiny-cogview4")
    assert files["style"].fits(tiny) and files["kohya"].fits(tiny) and not files["style"].fits(real)
    assert files["big"].fits(real) and not files["style"].fits(cog)


def test_hash_is_cached_by_mtime_and_size(tmp_path):
    path = tmp_path / "style.safetensors"
    z_image(path)
    directory = LoraDirectory(tmp_path)
    first = directory.find("style").sha256
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] = 1  # same size, other content, same mtime: the cached hash is kept (not re-read)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert directory.find("style").sha256 == first
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # touched: hashed again
    assert directory.find("style").sha256 == hashlib.sha256(bytes(data)).hexdigest() != first


@pytest.mark.parametrize("requested, param", [
    ([("style", 1.0)] * 5, "loras"),
    ([("style", 2.01)], "loras[0].weight"),
    ([("../style", 1.0)], "loras[0].name"),
    ([("style.safetensors", 1.0)], "loras[0].name"),
    ([("style", 1.0), ("copy", 0.5)], "loras[1].name"),  # the same content twice
])
def test_resolve_refuses_naming_the_param(tmp_path, requested, param):
    z_image(tmp_path / "style.safetensors")
    z_image(tmp_path / "copy.safetensors")
    with pytest.raises(InvalidRequest) as caught:
        LoraDirectory(tmp_path).resolve(requested, get_profile("tiny-z-image"), None, 4)
    assert caught.value.param == param


def test_resolve_pins_hashes_and_a_worker_refuses_other_content(tmp_path):
    z_image(tmp_path / "style.safetensors")
    directory = LoraDirectory(tmp_path)
    [ref] = directory.resolve([("style", 1)], get_profile("tiny-z-image"), None, 4)
    assert ref == LoraRef("style", directory.find("style").sha256, 1.0)
    assert directory.path_for(ref) == tmp_path / "style.safetensors"
    with pytest.raises(AdapterRejected, match="style"):
        directory.path_for(LoraRef("style", "0" * 64, 1.0))
    with pytest.raises(AdapterRejected, match="not enabled"):
        LoraDirectory(None).path_for(ref)


def test_adapters_are_part_of_the_job_identity_and_survive_storage():
    from server.core.spec import JobSpec, Limits, SpecInput, normalize

    profile = get_profile("tiny-z-image")
    plain = normalize(SpecInput(prompt="x", model=profile.model_id, seed=1), profile, Limits())
    ref = LoraRef("style", "a" * 64, 0.5)
    specs = [normalize(SpecInput(prompt="x", model=profile.model_id, seed=1, loras=loras), profile, Limits())
             for loras in ((ref,), (LoraRef("style", "a" * 64, 0.8),), (LoraRef("style", "b" * 64, 0.5),))]
    assert len({plain.job_id, *(spec.job_id for spec in specs)}) == 4
    stored = JobSpec.from_dict(json.loads(json.dumps(specs[0].to_dict())))
    assert stored == specs[0] and stored.job_id == specs[0].job_id and stored.loras == (ref,)
    old_record = {k: v for k, v in plain.to_dict().items() if k != "loras"}  # stored before adapters existed
    assert JobSpec.from_dict(old_record) == plain
