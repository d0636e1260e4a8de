"""Transactional outbox: an event is stored in the same transaction as the state change it
announces, and a relay publishes it (``Nats-Msg-Id`` = event id makes re-publishing harmless).
A crash between commit and publish loses nothing: the relay publishes on restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

import nats.errors
from google.protobuf.message import DecodeError, Message
from sqlalchemy import Integer, LargeBinary, String, delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tuneforge.core import subjects, telemetry
from tuneforge.core.bus import Bus
from tuneforge.core.db import Database, UTCDateTime, utcnow

log = logging.getLogger(__name__)


class OutboxBase(DeclarativeBase):
    pass


class OutboxRow(OutboxBase):
    __tablename__ = "event_outbox"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(128))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The trace context of the span that queued the event (telemetry.trace_carrier): the relay's
    # publish continues that trace. NULL when not tracing.
    trace_context: Mapped[str | None] = mapped_column(String(1024), nullable=True)


class OutboxDeadRow(OutboxBase):
    """An event the relay can never publish (too large for NATS, unknown subject, undecodable):
    set aside with the reason so that the events queued after it still go out."""

    __tablename__ = "event_outbox_dead"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    subject: Mapped[str] = mapped_column(String(128))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    error: Mapped[str] = mapped_column(String(2000))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    set_aside_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


UNPUBLISHABLE = (nats.errors.MaxPayloadError, KeyError, DecodeError, TypeError)


class Outbox:
    def __init__(self, db: Database, bus: Bus):
        self.db = db
        self.bus = bus
        self._wake = asyncio.Event()

    def add(self, session: AsyncSession, subject: str, message: Message) -> None:
        """Queue an event inside the caller's transaction."""
        expected = subjects.message_type(subject)  # a pool's work subject included
        if expected is None:
            raise KeyError(f"no message type for subject {subject}")
        if not isinstance(message, expected):
            raise TypeError(f"{subject} carries {expected.__name__}")
        session.add(OutboxRow(subject=subject, payload=message.SerializeToString(),
                              trace_context=telemetry.trace_carrier()))

    def notify(self) -> None:
        """Call after the transaction committed: the relay publishes at once."""
        self._wake.set()

    async def flush(self) -> int:
        sent = 0
        while True:
            async with self.db.session() as session:
                rows = (await session.execute(select(OutboxRow).order_by(OutboxRow.id).limit(100))).scalars().all()
            if not rows:
                return sent
            for row in rows:
                try:
                    message_type = subjects.message_type(row.subject)
                    if message_type is None:
                        raise KeyError(f"no message type for subject {row.subject}")
                    message = message_type.FromString(row.payload)
                    with telemetry.continued_trace(row.trace_context):
                        await self.bus.publish(row.subject, message)
                except UNPUBLISHABLE as exc:  # would block every later event forever: set it aside
                    await self._set_aside(row, f"{type(exc).__name__}: {exc}")
                    continue
                async with self.db.session() as session, session.begin():
                    await session.execute(delete(OutboxRow).where(OutboxRow.id == row.id))
                sent += 1

    async def _set_aside(self, row: OutboxRow, error: str) -> None:
        log.error("outbox event %s on %s can never be published (%s); kept in %s", row.id, row.subject, error,
                  OutboxDeadRow.__tablename__)
        async with self.db.session() as session, session.begin():
            session.add(OutboxDeadRow(subject=row.subject, payload=row.payload, error=error[:2000],
                                      created_at=row.created_at))
            await session.execute(delete(OutboxRow).where(OutboxRow.id == row.id))

    async def relay(self, interval: float = 1.0) -> None:
        """Publish pending events forever (wakes on ``notify`` or every ``interval`` seconds)."""
        while True:
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away, the database busy: everything stays queued
                log.warning("outbox relay failed (%s: %s); retrying", type(exc).__name__, exc)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
