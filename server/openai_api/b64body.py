"""Answers that carry whole images as base64 (``b64_json``, the SSE final events), produced while
they are sent instead of built as one string per client.

The answer is rendered once with a placeholder token for every image (``Slots.add``); the text is
then split at the tokens (``Slots.parts``) and sent piece by piece, each image's base64 made block
by block from its stored file (or from the cached re-encoded bytes) in a worker thread. Base64 needs
no JSON escaping, so the bytes are exactly those of the fully built answer, while a client that
reads slowly (or not at all) pins a few blocks, not 17 MB (issue 16).
"""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import BinaryIO
from pathlib import Path

from starlette.responses import Response, StreamingResponse

BLOCK = 3 * 65_536  # raw bytes per piece: a multiple of 3, so the pieces' base64 joins without padding


@dataclass(frozen=True)
class Source:
    """One image's bytes: a stored file, opened when the answer is planned (``file``), or bytes
    already in memory (``data``)."""

    file: BinaryIO | None = None
    data: bytes | None = None
    size: int = 0

    @classmethod
    def of_file(cls, path: Path) -> "Source":
        """Blocking (open, stat): call it off the event loop. The file is opened now, before the
        answer's status and Content-Length go out, so a file deleted meanwhile (retention) is still
        read in full through this handle instead of cutting the promised body short."""
        file = open(path, "rb")  # noqa: SIM115 - closed by ``blocks`` or when the Source is dropped
        return cls(file=file, size=os.fstat(file.fileno()).st_size)

    @classmethod
    def of_bytes(cls, data: bytes) -> "Source":
        return cls(data=data, size=len(data))

    @property
    def b64_len(self) -> int:
        return 4 * ((self.size + 2) // 3)

    def blocks(self) -> Iterator[bytes]:
        """The base64, block by block (blocking file reads: iterate it in a thread)."""
        if self.data is not None:
            for start in range(0, len(self.data), BLOCK):
                yield base64.b64encode(self.data[start:start + BLOCK])
            return
        with self.file as fh:
            while block := fh.read(BLOCK):
                yield base64.b64encode(block)


class Piece(bytes):
    """A piece of an answer that is not its last: an SSE event sent in several pieces is open
    until its last piece (plain ``bytes``) was sent (``streaming.EventGate`` keeps heartbeats out)."""


class Slots:
    """Placeholder tokens standing for images' base64 in a rendered answer."""

    def __init__(self) -> None:
        self._nonce = secrets.token_hex(8)  # tokens cannot collide with any other text of the answer
        self._sources: dict[str, Source] = {}

    def add(self, source: Source) -> str:
        token = f"@b64-{self._nonce}-{len(self._sources)}@"
        self._sources[token] = source
        return token

    def parts(self, text: str) -> list[bytes | Source]:
        """``text`` split at the tokens: its own bytes, and the sources in their place."""
        out: list[bytes | Source] = []
        rest = text
        while True:
            cut = rest.find(f"@b64-{self._nonce}-")
            if cut < 0:
                out.append(rest.encode())
                return out
            end = rest.index("@", cut + 1) + 1
            out.append(rest[:cut].encode())
            out.append(self._sources[rest[cut:end]])
            rest = rest[end:]


def length(parts: list[bytes | Source]) -> int:
    return sum(len(p) if isinstance(p, bytes) else p.b64_len for p in parts)


async def pieces(parts: list[bytes | Source]) -> AsyncIterator[bytes]:
    """The answer's bytes in pieces: every piece but the last is a ``Piece``. File reads and base64
    run in a worker thread, one block at a time."""
    pending: bytes | None = None
    for part in parts:
        chunks = [part] if isinstance(part, bytes) else _blocks_off_loop(part)
        async for chunk in _aiter(chunks):
            if not chunk:
                continue
            if pending is not None:
                yield Piece(pending)
            pending = chunk
    if pending is not None:
        yield bytes(pending)


async def _aiter(chunks) -> AsyncIterator[bytes]:
    if isinstance(chunks, list):
        for chunk in chunks:
            yield chunk
    else:
        async for chunk in chunks:
            yield chunk


async def _blocks_off_loop(source: Source) -> AsyncIterator[bytes]:
    blocks = source.blocks()
    try:
        while (block := await asyncio.to_thread(next, blocks, None)) is not None:
            yield block
    finally:
        blocks.close()  # closes the file; no await here, the generator may be closing on cancellation


def json_answer(text: str, slots: Slots) -> Response:
    """A JSON answer rendered with ``slots``' tokens, sent with its exact ``Content-Length``, each
    image's base64 made from its source while the body is sent."""
    parts = slots.parts(text)
    if len(parts) == 1:
        return Response(parts[0], media_type="application/json")
    return StreamingResponse(pieces(parts), media_type="application/json",
                             headers={"content-length": str(length(parts))})
