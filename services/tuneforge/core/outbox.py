"""Transactional outbox: an event is stored in the same transaction as the state change it
announces, and a relay publishes it (``Nats-Msg-Id`` = event id makes re-publishing harmless).
A crash between commit and publish loses nothing: the relay publishes on restart."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging

from google.protobuf.message import Message
from sqlalchemy import Integer, LargeBinary, String, delete, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tuneforge.core import subjects
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


class Outbox:
    def __init__(self, db: Database, bus: Bus):
        self.db = db
        self.bus = bus
        self._wake = asyncio.Event()

    def add(self, session: AsyncSession, subject: str, message: Message) -> None:
        """Queue an event inside the caller's transaction."""
        if not isinstance(message, subjects.MESSAGE_TYPES[subject]):
            raise TypeError(f"{subject} carries {subjects.MESSAGE_TYPES[subject].__name__}")
        session.add(OutboxRow(subject=subject, payload=message.SerializeToString()))

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
                message = subjects.MESSAGE_TYPES[row.subject].FromString(row.payload)
                await self.bus.publish(row.subject, message)
                async with self.db.session() as session, session.begin():
                    await session.execute(delete(OutboxRow).where(OutboxRow.id == row.id))
                sent += 1

    async def relay(self, interval: float = 1.0) -> None:
        """Publish pending events forever (wakes on ``notify`` or every ``interval`` seconds)."""
        while True:
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("outbox relay failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()
