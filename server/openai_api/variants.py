"""Encoded variants of finished images (a stored PNG as jpeg/webp at a given compression), kept
in a bounded LRU so a repeat of the same request costs a lookup, not a fresh encode; and a bound
on concurrent re-encodes, so a flood of them queues instead of taking every core from the
requests that need none.

PNG answers are the stored files read as they are: nothing to cache, no slot needed.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict

Key = tuple[str, str, int]  # (file name, format, compression)


class VariantCache:
    def __init__(self, max_bytes: int, max_encodes: int, metrics=None):
        self.max_bytes = max_bytes
        self.slots = asyncio.Semaphore(max(1, max_encodes))  # bound re-encodes across requests
        self.metrics = metrics
        self._items: OrderedDict[Key, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # used from the encode threads

    def has_all(self, keys: list[Key]) -> bool:
        with self._lock:
            return all(key in self._items for key in keys)

    def get(self, key: Key) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
        self._count("hit" if data is not None else "miss")
        return data

    def put(self, key: Key, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self._bytes += len(data) - (len(old) if old is not None else 0)
            self._items[key] = data
            while self._bytes > self.max_bytes:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.variant_lookups.labels(outcome).inc()
