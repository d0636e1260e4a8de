"""Shared helpers for RPC handlers: timestamps, offset page tokens, streamed file downloads."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Iterable

from google.protobuf.timestamp_pb2 import Timestamp

from tuneforge.api.common.v1 import common_pb2
from tuneforge.core.storage import ArtifactStore

DOWNLOAD_CHUNK = 256 * 1024


def timestamp(value: dt.datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


@dataclasses.dataclass(frozen=True)
class Page:
    offset: int
    size: int

    @classmethod
    def of(cls, request, default: int = 50, maximum: int = 200) -> "Page":
        """From a request's ``page_size`` / ``page_token`` (an offset; a bad token starts over)."""
        size = min(max(request.page_size or default, 1), maximum)
        token = request.page_token
        ok = token.isascii() and token.isdigit() and len(token) <= 12  # "²".isdigit(); SQLite's 64 bits
        return cls(offset=int(token) if ok else 0, size=size)

    def next_token(self, rows_fetched: int) -> str:
        """Fetch ``size + 1`` rows; a next page exists when more than ``size`` came back."""
        return str(self.offset + self.size) if rows_fetched > self.size else ""


async def file_chunks(
    store: ArtifactStore, prefix: str, paths: Iterable[str], chunk_size: int = DOWNLOAD_CHUNK,
) -> AsyncIterator[common_pb2.FileChunk]:
    """The files ``prefix/path`` as download chunks, read block by block off the event loop
    (never a whole file in memory); an empty file is one empty chunk with ``eof``."""
    for path in paths:
        blocks = store.iter_chunks(f"{prefix}/{path}", chunk_size)
        try:
            offset = 0
            block = await asyncio.to_thread(next, blocks, b"")
            while True:
                following = await asyncio.to_thread(next, blocks, b"") if block else b""
                yield common_pb2.FileChunk(path=path, offset=offset, data=block, eof=not following)
                if not following:
                    break
                offset += len(block)
                block = following
        finally:
            blocks.close()  # closes the file too when the client stops reading
