"""LoRA adapters on the model layer: load, keep (LRU by count and bytes), activate per job.

One ``AdapterSet`` per resident pipeline (its transformer holds the PEFT layers; the img2img and
inpaint pipelines made with ``from_pipe`` share that transformer, so they see the same adapters).

Per job, ``activate`` makes exactly the job's adapters active with the job's weights
(``set_adapters``), or, for a job without adapters, disables every adapter layer (``disable_lora``):
a disabled PEFT layer returns its base layer's output untouched, so a job without adapters gets the
pixels it gets on a pipeline that never saw one. Adapters stay unfused: fusing into SDNQ's
quantized weights would dequantize-add-requantize and lose most of the adapter, and unfused layers
need no undo between jobs. PEFT wraps SDNQ's ``SDNQLinear`` (a ``torch.nn.Linear`` subclass) like
any linear layer: the quantized base runs as before, the low-rank delta is added in full precision.

Runs on the GPU thread only (one job at a time); peft and diffusers are imported lazily.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from server.core.errors import AdapterRejected
from server.core.loras import LoraRef

logger = logging.getLogger(__name__)


class AdapterSet:
    """The adapters loaded into one pipeline, least recently used first."""

    def __init__(self, pipe: Any, max_count: int, max_bytes: int):
        self.pipe = pipe
        self.max_count = max(1, int(max_count))
        self.max_bytes = int(max_bytes)
        self._loaded: OrderedDict[str, int] = OrderedDict()  # adapter name -> file size
        self._enabled = False  # adapter layers switched on (PEFT layers exist only after a load)

    @property
    def loaded(self) -> tuple[str, ...]:
        return tuple(self._loaded)

    def activate(self, refs: tuple[LoraRef, ...], path_for: Callable[[LoraRef], Path]) -> None:
        """Make exactly ``refs`` active with their weights; none: every adapter disabled.

        Loads missing adapters (``AdapterRejected`` naming the adapter when its file does not load;
        the pipeline is left as it was), then evicts beyond the bounds, never one of ``refs``."""
        if not refs:
            if self._enabled:
                self.pipe.disable_lora()
                self._enabled = False
            return
        for ref in refs:
            self._ensure(ref, path_for)
        self._evict(keep={ref.adapter_name for ref in refs})
        self.pipe.enable_lora()
        self.pipe.set_adapters([ref.adapter_name for ref in refs], [ref.weight for ref in refs])
        self._enabled = True

    def _ensure(self, ref: LoraRef, path_for: Callable[[LoraRef], Path]) -> None:
        name = ref.adapter_name
        if name in self._loaded:
            self._loaded.move_to_end(name)
            return
        path = path_for(ref)
        try:
            self.pipe.load_lora_weights(str(path), adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - any loader failure is this adapter's fault
            self._discard(name)
            logger.warning("LoRA adapter %s (%s) did not load: %s", ref.name, name, exc)
            raise AdapterRejected(f"The LoRA adapter '{ref.name}' does not load into this model: "
                                  f"{str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__}") from None
        if name not in self._adapter_names():  # keys matched no layer: diffusers only warns
            raise AdapterRejected(f"The LoRA adapter '{ref.name}' fits no layer of this model.")
        self._loaded[name] = path.stat().st_size
        logger.info("loaded LoRA adapter %s as %s (%d loaded)", ref.name, name, len(self._loaded))

    def _evict(self, keep: set[str]) -> None:
        """Drop least recently used adapters beyond ``max_count`` / ``max_bytes`` (not ``keep``)."""
        for name in list(self._loaded):
            if len(self._loaded) <= self.max_count and sum(self._loaded.values()) <= self.max_bytes:
                return
            if name not in keep:
                self._discard(name)
                logger.info("unloaded LoRA adapter %s", name)

    def _discard(self, name: str) -> None:
        self._loaded.pop(name, None)
        if name in self._adapter_names():
            self.pipe.delete_adapters([name])
        if not self._adapter_names():
            self._enabled = False

    def _adapter_names(self) -> set[str]:
        names = set()
        for adapters in self.pipe.get_list_adapters().values():
            names.update(adapters)
        return names


class Adapters:
    """The ``AdapterSet`` of every resident pipeline, with the directory adapters come from
    (``None``: no ``--lora-dir``, a job with adapters is refused)."""

    def __init__(self, directory: Any = None, max_count: int = 8, max_bytes: int = 2 << 30):
        self.directory = directory  # server.core.loras.LoraDirectory | None
        self.max_count, self.max_bytes = max_count, max_bytes
        self._sets: dict[tuple[str, str], AdapterSet] = {}

    def activate(self, key: tuple[str, str], pipe: Any, refs: tuple[LoraRef, ...]) -> None:
        """Exactly ``refs`` active on ``pipe`` (the resident pipeline ``key``); none: disabled."""
        current = self._sets.get(key)
        if current is None or current.pipe is not pipe:
            if not refs:
                return  # this pipeline never had an adapter: nothing to disable
            current = self._sets[key] = AdapterSet(pipe, self.max_count, self.max_bytes)
        if refs and (self.directory is None or not self.directory.enabled):
            raise AdapterRejected("LoRA adapters are not enabled on this worker (no --lora-dir).")
        current.activate(refs, lambda ref: self.directory.path_for(ref))

    def forget(self, key: tuple[str, str]) -> None:
        """The pipeline ``key`` was unloaded: its adapters went with it."""
        self._sets.pop(key, None)

    def loaded(self) -> set[str]:
        """Adapter names (``LoraRef.adapter_name``) loaded into any resident pipeline."""
        return {name for adapter_set in list(self._sets.values()) for name in adapter_set.loaded}
