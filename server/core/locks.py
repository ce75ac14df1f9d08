"""Per-key asyncio locks (the engine serializes the submits of one job id with them)."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager


class KeyedLocks:
    """One asyncio lock per key, dropped when nobody holds or waits for it.

    Counting users (not ``lock.locked()``) matters: between a holder's release and the waiter's
    wake-up the lock reads unlocked, and deleting it then let a newcomer run beside the waiter."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @asynccontextmanager
    async def hold(self, key: str):
        lock, users = self._entries.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)
