"""LoRA adapters: the operator's directory (``--lora-dir``), content hashes, and request validation.

An adapter is a ``.safetensors`` file directly in the directory, named by its file name without the
extension. Requests name adapters; names are looked up in the directory's listing only, so no
request can reach a path. A job's spec carries each adapter as a ``LoraRef`` (name, SHA-256 of the
file's bytes, weight): a replaced file is another job, never a stale cached image.

Hashes are computed once per file and cached by (mtime_ns, size); every method here may read
files, so callers on the event loop run them in a thread. Import-light (no torch): API nodes use it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from server.core.errors import AdapterRejected, InvalidRequest
from server.core.profiles import ModelProfile

SUFFIX = ".safetensors"
# Documented in README ("LoRA adapters"): a weight scales the adapter's delta; 0 is the model itself.
MIN_WEIGHT, MAX_WEIGHT = -2.0, 2.0
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own bound on its JSON header
_HASH_CHUNK = 1 << 20
_LAYER_INDEX = re.compile(r"(layers|refiner|transformer_blocks)[._](\d+)[._]")
# Key fragments that identify the model family an adapter was trained for (after any of the
# layouts diffusers converts for Z-Image: ``transformer.``, ``diffusion_model.``, ``lora_unet_``
# prefixes; CogView4's loader converts none, see ``_cogview4_loader_reads``).
_FAMILY_MARKERS = {
    "ZImagePipeline": ("attention", "feed_forward", "refiner", "adaLN_modulation"),
    "CogView4Pipeline": ("transformer_blocks", "attn1", "norm1"),
}


@dataclass(frozen=True)
class LoraRef:
    """One adapter of a job: part of the job's identity (``JobSpec.loras``)."""

    name: str
    sha256: str
    weight: float

    @property
    def adapter_name(self) -> str:
        """The PEFT adapter name: by content, so two names for one file are one loaded adapter."""
        return "lora_" + self.sha256[:24]


@dataclass(frozen=True)
class LoraFile:
    name: str
    path: Path
    size: int
    sha256: str
    in_features: int | None  # the attention query projection's input width, when the keys show it
    family: str | None  # pipeline class the keys fit, None: no known layer

    def fits(self, profile: ModelProfile) -> bool:
        """Whether the keys name layers of ``profile``'s model (family and width)."""
        if self.family != profile.pipeline_class:
            return False
        return self.in_features is None or profile.lora_width is None or self.in_features == profile.lora_width


class LoraDirectory:
    """The adapters in ``root`` (None: the feature is off and every adapter request is a 400)."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self._cache: dict[Path, tuple[tuple[int, int], LoraFile]] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def files(self) -> dict[str, LoraFile]:
        """Every adapter by name (blocking: lists the directory, hashes new or changed files)."""
        if self.root is None:
            return {}
        try:
            entries = sorted(p for p in self.root.iterdir() if p.suffix == SUFFIX and p.is_file())
        except OSError:
            return {}
        found = {}
        for path in entries:
            item = self._describe(path)
            if item is not None:
                found[item.name] = item
        return found

    def find(self, name: str, param: str = "loras") -> LoraFile:
        """The adapter called ``name`` (blocking); ``InvalidRequest`` naming ``param`` if none."""
        if self.root is None:
            raise InvalidRequest("LoRA adapters are not enabled on this server (start it with --lora-dir).",
                                 param=param)
        listing = self.files()
        if name not in listing:  # the listing only: a name is never joined onto a path
            known = ", ".join(sorted(listing)) or "none"
            raise InvalidRequest(f"Unknown LoRA adapter '{name[:80]}'; available: {known}.", param=param)
        return listing[name]

    def resolve(self, requested: list[tuple[str, float]], profile: ModelProfile, variant: str | None,
                max_count: int) -> tuple[LoraRef, ...]:
        """Check a request's ``[(name, weight)]`` for ``profile``/``variant`` and pin each file's hash
        (blocking). ``InvalidRequest`` with ``param`` ``loras`` or ``loras[i].name|weight``."""
        if not requested:
            return ()
        if len(requested) > max_count:
            raise InvalidRequest(f"At most {max_count} LoRA adapters per request (got {len(requested)}).",
                                 param="loras")
        if not profile.supports_loras(variant or profile.default_variant):
            raise InvalidRequest(f"The model '{profile.model_id}' ({variant}) cannot take LoRA adapters.",
                                 param="loras")
        refs: list[LoraRef] = []
        for index, (name, weight) in enumerate(requested):
            weight = float(weight)
            if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
                raise InvalidRequest(f"LoRA weight must be between {MIN_WEIGHT} and {MAX_WEIGHT} (got {weight}).",
                                     param=f"loras[{index}].weight")
            item = self.find(name, param=f"loras[{index}].name")
            if not item.fits(profile):
                raise InvalidRequest(f"The LoRA adapter '{name}' fits no layer of {profile.model_id}.",
                                     param=f"loras[{index}].name")
            if any(ref.sha256 == item.sha256 for ref in refs):
                raise InvalidRequest(f"The LoRA adapter '{name}' is listed twice (same file content).",
                                     param=f"loras[{index}].name")
            refs.append(LoraRef(name=name, sha256=item.sha256, weight=weight))
        return tuple(refs)

    def path_for(self, ref: LoraRef) -> Path:
        """The file of ``ref`` in this directory (blocking); ``AdapterRejected`` naming the adapter
        when it is missing or its content differs (a worker whose directory differs from the API node's)."""
        try:
            item = self.find(ref.name)
        except InvalidRequest as exc:  # on a worker: the job fails with the client's 400
            raise AdapterRejected(exc.message) from None
        if item.sha256 != ref.sha256:
            raise AdapterRejected(f"The LoRA adapter '{ref.name}' on this worker differs from the one the job was "
                                  f"submitted with (sha256 {item.sha256[:12]} != {ref.sha256[:12]}).")
        return item.path

    def _describe(self, path: Path) -> LoraFile | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        key = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            cached = self._cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            sha = _sha256(path)
            shapes = read_header(path)
        except (OSError, ValueError):
            return None  # not a readable safetensors file: not an adapter
        width, family = _inspect(shapes)
        item = LoraFile(name=path.stem, path=path, size=stat.st_size, sha256=sha, in_features=width, family=family)
        with self._lock:
            self._cache[path] = (key, item)
        return item


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_header(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's JSON header (no tensor is read)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise ValueError("too short for safetensors")
        length = int.from_bytes(prefix, "little")
        if length > _MAX_HEADER_BYTES:
            raise ValueError("safetensors header too large")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError("safetensors header is not an object")
    return {k: list(v.get("shape", [])) for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _inspect(shapes: dict[str, list[int]]) -> tuple[int | None, str | None]:
    """(query projection input width, model family) from LoRA key names and shapes."""
    lora_keys = [k for k in shapes if any(m in k for m in ("lora_A", "lora_down", "lora_B", "lora_up"))]
    if not lora_keys:
        return None, None
    family = None
    for pipeline_class, markers in _FAMILY_MARKERS.items():
        if any(_LAYER_INDEX.search(k) for k in lora_keys) and any(m in k for k in lora_keys for m in markers):
            family = pipeline_class
            break
    if family == "CogView4Pipeline" and not _cogview4_loader_reads(shapes):
        family = None
    width = None
    for key in lora_keys:
        if "to_q" in key and ("lora_A" in key or "lora_down" in key) and len(shapes[key]) == 2:
            width = shapes[key][1]
            break
    return width, family


def _cogview4_loader_reads(shapes: dict[str, list[int]]) -> bool:
    """Whether ``CogView4Pipeline.load_lora_weights`` (diffusers 0.42) loads anything from these keys.

    Unlike Z-Image's loader it converts no other layout: it refuses a file with a key lacking
    ``lora`` (``dora_scale`` keys dropped first; ``diffusion_model.*.alpha`` keys fail here) and
    loads only keys under ``transformer.`` (bare PEFT names and ``lora_unet_`` keys load nothing, with
    a warning). Such a file would pass the submit check and fail every job on the GPU thread."""
    keys = [k for k in shapes if "dora_scale" not in k]
    return all("lora" in k for k in keys) and any(k.startswith("transformer.") for k in keys)


async def resolve_async(directory: LoraDirectory, requested: list | None, profile: ModelProfile,
                        variant: str | None, max_count: int) -> tuple[LoraRef, ...]:
    """``LoraDirectory.resolve`` off the event loop (it may hash files) for wire items with
    ``name`` and ``weight``; nothing requested: no adapters (the feature may be off)."""
    if not requested:
        return ()
    pairs = [(item.name, item.weight) for item in requested]
    return await asyncio.to_thread(directory.resolve, pairs, profile, variant, max_count)
