"""A workspace's API keys: create, list (by prefix only), revoke (README "Workspaces and API keys").

The rules:

* The administrator token manages the keys of any workspace; ``workspace_id`` is then required.
* A workspace key manages its own workspace's keys only (``workspace_id`` empty or its own); another
  workspace's id is NOT_FOUND, exactly as an id that does not exist.
* A workspace key cannot revoke its workspace's last active key (FAILED_PRECONDITION): create
  another one first. The administrator can (a leaked key, a locked workspace) and recovers the
  workspace by creating a new key for it.
* Keys are stored only as SHA-256 hashes. A listing shows the key id, the prefix (``tfk_`` and the
  next 8 characters), the label and the creation time; never the secret or its hash.
* Every change rewrites the workspace's active hashes and bumps its revision in one transaction
  that first takes the workspace row's write lock (``UPDATE ... revision = revision + 1``), so
  concurrent changes are serialised and the highest revision always carries the latest set. The
  ``workspace.updated`` event carries it to every service (core.workspaces.WorkspaceDirectory
  drops its cached keys of the workspace on apply); the job-scheduler applies it at once.
"""

from __future__ import annotations

import secrets

import grpc
from sqlalchemy import exists, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as pb
from tuneforge.core.db import Database, utcnow
from tuneforge.core.errors import ServiceError, bad_request, not_found
from tuneforge.core.grpc_server import caller_is_admin, current_workspace
from tuneforge.core.rpc import timestamp
from tuneforge.core.workspaces import API_KEY_PREFIX, hash_api_key, new_api_key
from tuneforge.job_scheduler.models import ApiKeyRecordRow, WorkspaceSecretRow

PREFIX_CHARS = 8  # characters after "tfk_" shown in listings
MAX_LABEL = 100
MAX_ID = 64
LEGACY_LABEL = "(created before keys were listed)"


def key_prefix(api_key: str) -> str:
    return api_key[: len(API_KEY_PREFIX) + PREFIX_CHARS]


def new_record(workspace_id: str, api_key: str, label: str) -> ApiKeyRecordRow:
    return ApiKeyRecordRow(id="key_" + secrets.token_hex(10), workspace_id=workspace_id,
                           key_hash=hash_api_key(api_key), prefix=key_prefix(api_key), label=label,
                           created_at=utcnow())


def to_proto(row: ApiKeyRecordRow) -> pb.ApiKey:
    return pb.ApiKey(id=row.id, prefix=row.prefix, label=row.label, create_time=timestamp(row.created_at))


async def backfill(db: Database) -> int:
    """Give keys created before key records existed (a workspace with hashes but no records) a
    record, so they are listed and revocable. One query when there is nothing to do."""
    async with db.session() as session:
        legacy = (await session.execute(
            select(WorkspaceSecretRow).where(
                WorkspaceSecretRow.api_key_hashes != "",
                ~exists().where(ApiKeyRecordRow.workspace_id == WorkspaceSecretRow.id))
        )).scalars().all()
    added = 0
    for ws in legacy:
        try:
            async with db.session() as session, session.begin():
                for key_hash in dict.fromkeys(h for h in ws.api_key_hashes.split(",") if h):
                    session.add(ApiKeyRecordRow(id="key_" + secrets.token_hex(10), workspace_id=ws.id,
                                                key_hash=key_hash, prefix="", label=LEGACY_LABEL,
                                                created_at=ws.created_at))
                    added += 1
        except IntegrityError:  # another replica did it first
            pass
    return added


def _workspace_id(requested: str) -> str:
    """The workspace whose keys the caller may manage (see the module's rules)."""
    if len(requested) > MAX_ID:
        raise bad_request("invalid workspace id", [("workspace_id", f"at most {MAX_ID} characters")])
    if caller_is_admin():
        if not requested:
            raise bad_request("which workspace?", [("workspace_id", "required with the administrator token")])
        return requested
    own = current_workspace().id
    if requested and requested != own:
        raise not_found(f"workspace {requested!r}")
    return own


async def _lock(session: AsyncSession, workspace_id: str) -> WorkspaceSecretRow:
    """Take the workspace row's write lock by bumping its revision; NOT_FOUND when there is none."""
    result = await session.execute(
        update(WorkspaceSecretRow).where(WorkspaceSecretRow.id == workspace_id)
        .values(revision=WorkspaceSecretRow.revision + 1)
    )
    if result.rowcount == 0:
        raise not_found(f"workspace {workspace_id!r}")
    return await session.get(WorkspaceSecretRow, workspace_id, populate_existing=True)


async def _active(session: AsyncSession, workspace_id: str) -> list[ApiKeyRecordRow]:
    return list((await session.execute(
        select(ApiKeyRecordRow).where(ApiKeyRecordRow.workspace_id == workspace_id,
                                      ApiKeyRecordRow.revoked_at.is_(None))
        .order_by(ApiKeyRecordRow.created_at, ApiKeyRecordRow.id)
    )).scalars().all())


class ApiKeys:
    """The three RPCs; ``app`` is the JobScheduler (database, outbox, directory, publish_workspace)."""

    def __init__(self, app):
        self.app = app

    async def _changed(self, session: AsyncSession, row: WorkspaceSecretRow):
        row.api_key_hashes = ",".join(r.key_hash for r in await _active(session, row.id))
        return await self.app.publish_workspace(session, row)

    async def _published(self, update) -> None:
        await self.app.directory.apply(update)  # this service at once; the others by the event
        self.app.outbox.notify()

    async def create(self, request: pb.CreateApiKeyRequest) -> pb.CreateApiKeyResponse:
        workspace_id = _workspace_id(request.workspace_id)
        label = request.label.strip()
        if len(label) > MAX_LABEL or not label.isprintable():
            raise bad_request("invalid label", [("label", f"at most {MAX_LABEL} printable characters")])
        api_key = new_api_key()
        async with self.app.db.session() as session, session.begin():
            row = await _lock(session, workspace_id)
            record = new_record(workspace_id, api_key, label)
            session.add(record)
            await session.flush()
            update_event = await self._changed(session, row)
        await self._published(update_event)
        return pb.CreateApiKeyResponse(key=to_proto(record), api_key=api_key)

    async def list(self, request: pb.ListApiKeysRequest) -> pb.ListApiKeysResponse:
        workspace_id = _workspace_id(request.workspace_id)
        async with self.app.db.session() as session:
            if await session.get(WorkspaceSecretRow, workspace_id) is None:
                raise not_found(f"workspace {workspace_id!r}")
            rows = await _active(session, workspace_id)
        return pb.ListApiKeysResponse(keys=[to_proto(r) for r in rows])

    async def revoke(self, request: pb.RevokeApiKeyRequest) -> pb.RevokeApiKeyResponse:
        workspace_id = _workspace_id(request.workspace_id)
        wanted = request.key_id
        if not wanted or len(wanted) > MAX_ID:
            raise bad_request("invalid key id", [("key_id", f"a key id (key_...) or prefix (tfk_...), "
                                                            f"1-{MAX_ID} characters")])
        async with self.app.db.session() as session, session.begin():
            row = await _lock(session, workspace_id)
            active = await _active(session, workspace_id)
            matches = [r for r in active if wanted in (r.id, r.prefix)]
            if not matches:
                raise not_found(f"API key {wanted!r}")
            if len(matches) > 1:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"{len(matches)} keys start with {wanted!r}; revoke by key id (key_...)")
            record = matches[0]
            if len(active) == 1 and not caller_is_admin():
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    "this is the workspace's last API key: create another one first "
                    "(tuneforge workspaces keys create), then revoke this one")
            record.revoked_at = utcnow()
            await session.flush()
            update_event = await self._changed(session, row)
        await self._published(update_event)
        return pb.RevokeApiKeyResponse(key=to_proto(record))
