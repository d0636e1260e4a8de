"""Shared helpers for RPC handlers: timestamps and offset page tokens."""

from __future__ import annotations

import dataclasses
import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp


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
        return cls(offset=int(token) if token.isdigit() else 0, size=size)

    def next_token(self, rows_fetched: int) -> str:
        """Fetch ``size + 1`` rows; a next page exists when more than ``size`` came back."""
        return str(self.offset + self.size) if rows_fetched > self.size else ""
