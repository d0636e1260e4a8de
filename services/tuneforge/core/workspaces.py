"""Workspaces as every service sees them: a local copy kept from ``workspace.updated`` events.

The job-scheduler creates workspaces and API keys and publishes each change; every service stores
what authentication and plan checks need in its own database (API keys only as SHA-256 hashes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import secrets
import time

from sqlalchemy import ForeignKey, Integer, String, delete, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.core.db import Database

API_KEY_PREFIX = "tfk_"
# How long an authenticated key is trusted without looking at the database again. Updates that
# this process applies clear its cache at once; the bound is for updates applied by another
# process sharing the database (a replica of the same service).
AUTH_CACHE_SECONDS = 5.0


def hash_api_key(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


class DirectoryBase(DeclarativeBase):
    pass


class WorkspaceRow(DirectoryBase):
    __tablename__ = "workspaces"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    plan: Mapped[int] = mapped_column(Integer)
    owner_email: Mapped[str] = mapped_column(String(320))
    revision: Mapped[int] = mapped_column(Integer, default=0)


class ApiKeyRow(DirectoryBase):
    __tablename__ = "api_keys"
    key_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspaces.id", ondelete="CASCADE"), index=True)


@dataclasses.dataclass(frozen=True)
class Workspace:
    id: str
    name: str
    plan: int  # common_pb2.Plan value
    owner_email: str

    @property
    def plan_name(self) -> str:
        return common_pb2.Plan.Name(self.plan).removeprefix("PLAN_").lower()

    @property
    def can_train(self) -> bool:
        return self.plan == common_pb2.PLAN_ENTERPRISE


class WorkspaceDirectory:
    def __init__(self, db: Database):
        self.db = db
        # key hash -> workspace, for keys that authenticated; cleared per workspace on every applied
        # update (a revoked key, a plan change). ``_generation`` counts applied updates so that a
        # look-up that read the database before an update cannot cache what the update removed.
        self._by_key: dict[str, Workspace] = {}
        self._trusted_until: dict[str, float] = {}  # key hash -> time.monotonic() to re-check at
        self._generation = 0
        self._lookups: dict[str, tuple[int, asyncio.Future]] = {}  # key hash -> (generation, look-up)

    async def apply(self, update: ev.WorkspaceUpdated) -> bool:
        """Store a workspace update unless a newer revision is already stored. Idempotent."""
        async with self.db.session() as session, session.begin():
            row = await session.get(WorkspaceRow, update.workspace_id)
            if row is not None and row.revision >= update.revision:
                return False
            if row is None:
                row = WorkspaceRow(id=update.workspace_id)
                session.add(row)
            row.name = update.name
            row.plan = int(update.plan)
            row.owner_email = update.owner_email
            row.revision = update.revision
            await session.flush()
            await session.execute(delete(ApiKeyRow).where(ApiKeyRow.workspace_id == update.workspace_id))
            for key_hash in dict.fromkeys(update.api_key_hashes):
                session.add(ApiKeyRow(key_hash=key_hash, workspace_id=update.workspace_id))
        self._generation += 1
        self._by_key = {h: w for h, w in self._by_key.items() if w.id != update.workspace_id}
        return True

    async def authenticate(self, api_key: str) -> Workspace | None:
        if not api_key.startswith(API_KEY_PREFIX):
            return None
        key_hash = hash_api_key(api_key)
        cached = self._by_key.get(key_hash)
        if cached and time.monotonic() < self._trusted_until.get(key_hash, 0.0):
            return cached
        # One database look-up per key at a time: when the trust of a busy key runs out, the calls
        # that arrive meanwhile share the look-up in flight instead of each opening a session
        # (unless an update was applied since it started: then they read for themselves).
        pending = self._lookups.get(key_hash)
        if pending is None or pending[0] != self._generation:
            pending = (self._generation, asyncio.ensure_future(self._look_up(key_hash)))
            self._lookups[key_hash] = pending
            pending[1].add_done_callback(
                lambda _t, key_hash=key_hash, pending=pending: self._lookups.get(key_hash) is pending
                and self._lookups.pop(key_hash))
        return await asyncio.shield(pending[1])

    async def _look_up(self, key_hash: str) -> Workspace | None:
        generation = self._generation
        async with self.db.session() as session:
            row = (
                await session.execute(
                    select(WorkspaceRow).join(ApiKeyRow).where(ApiKeyRow.key_hash == key_hash)
                )
            ).scalar_one_or_none()
        if row is None:
            return None
        ws = _to_workspace(row)
        if generation == self._generation:  # no update applied meanwhile: the row is current
            self._by_key[key_hash] = ws
            if len(self._trusted_until) > 4 * len(self._by_key) + 1024:  # bounded: drop expired entries
                self._trusted_until = {h: t for h, t in self._trusted_until.items() if h in self._by_key}
            self._trusted_until[key_hash] = time.monotonic() + AUTH_CACHE_SECONDS
        return ws


def _to_workspace(row: WorkspaceRow) -> Workspace:
    return Workspace(id=row.id, name=row.name, plan=row.plan, owner_email=row.owner_email)
