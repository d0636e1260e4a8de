"""The model-registry as the "Hosting & Models" view for agents: ListModels filters and the base
catalog, one model per agent (several agents per model), DeleteModel refused while assigned, and
every change an event on the bus. Real services on loopback, real nats-server, real SQLite (and
PostgreSQL where one runs at 127.0.0.1:5432); models registered through the real registration
event."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import time

import grpc
import nats
import nats.errors
import pytest
from conftest import workspace
from sqlalchemy import (
    Column,
    DateTime,
    ForeignKey,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    select,
)
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.exc import IntegrityError
from test_databases import database_url  # noqa: F401  (the sqlite / postgresql fixture)
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.api.model_registry.v1 import model_registry_service_pb2_grpc as mr_grpc
from tuneforge.core import errors, subjects
from tuneforge.core.client import channel
from tuneforge.core.storage import ArtifactStore
from tuneforge.core.workspaces import hash_api_key
from tuneforge.plugins import get_registry

SC = grpc.StatusCode
FOLLOWED = (subjects.MODEL_ASSIGNED, subjects.MODEL_UNASSIGNED, subjects.MODEL_DELETED)


async def _register(app, workspace_id: str, name: str, base_model: str, method: str) -> None:
    """Put an adapter where a trainer would, and publish the event the job-scheduler sends."""
    store = ArtifactStore(app.settings.resolved_artifact_url())
    source = f"jobs/{workspace_id}/job_{name}/adapter"
    store.put_bytes(f"{source}/adapter_config.json", json.dumps({"r": 8}).encode())
    store.put_bytes(f"{source}/adapter_model.safetensors", b"weights of " + name.encode())
    await app.bus.publish(subjects.MODEL_REGISTRATION_REQUESTED, ev.ModelRegistrationRequested(
        meta=app.bus.meta(workspace_id, f"job_{name}"), model_name=name, base_model=base_model, method=method,
        adapter_path=source, hyperparameters=common_pb2.Hyperparameters(lora_rank=8, lora_alpha=16),
    ))


async def _registered(clients, name: str) -> mr.Model:
    deadline = time.monotonic() + 20
    while True:
        try:
            return (await clients.model_registry.GetModel(mr.GetModelRequest(model=name))).model
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == SC.NOT_FOUND and time.monotonic() < deadline, exc
            await asyncio.sleep(0.05)


async def _models(clients, models: list[tuple[str, str, str]]) -> dict[str, mr.Model]:
    """Register ``(name, base_model, method)`` one after the other (so newest-first is their
    reverse order); the registered models by name."""
    ws = (await clients.job_scheduler.GetWorkspace(js.GetWorkspaceRequest())).workspace
    out = {}
    for name, base_model, method in models:
        await _register(clients.app, ws.id, name, base_model, method)
        out[name] = await _registered(clients, name)
    return out


async def _refused(call, code: SC) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    return info.value


def _names(reply: mr.ListModelsResponse) -> list[str]:
    return [m.name for m in reply.models]


# -- ListModels: filters, the catalog, pages ---------------------------------------------------------

async def test_list_models_filters_by_base_model_method_and_agent_and_pages_with_them(services):
    endpoints, _ = services
    clients = await workspace(endpoints)
    clients.app = services.apps["model-registry"]
    other = await workspace(endpoints, email="other@example.com")
    other.app = clients.app
    try:
        await _models(clients, [("m-a", "llama-3.1-8b", "sft"), ("m-b", "llama-3.1-8b", "dpo"),
                                ("m-c", "qwen-2.5-14b", "sft"), ("m-d", "llama-3.1-8b", "sft"),
                                ("m-e", "qwen-2.5-14b", "dpo")])
        await _models(other, [("o-a", "llama-3.1-8b", "sft")])  # another workspace's: never listed
        registry = clients.model_registry
        await registry.AssignModelToAgent(mr.AssignModelToAgentRequest(model="m-c", agent_id="agent-x"))
        await registry.AssignModelToAgent(mr.AssignModelToAgentRequest(model="m-c", agent_id="agent-y"))

        assert _names(await registry.ListModels(mr.ListModelsRequest())) == ["m-e", "m-d", "m-c", "m-b", "m-a"]
        llama = mr.ListModelsRequest(base_model="llama-3.1-8b")
        assert _names(await registry.ListModels(llama)) == ["m-d", "m-b", "m-a"]
        assert _names(await registry.ListModels(mr.ListModelsRequest(method="sft"))) == ["m-d", "m-c", "m-a"]
        llama_dpo = mr.ListModelsRequest(base_model="llama-3.1-8b", method="dpo")
        assert _names(await registry.ListModels(llama_dpo)) == ["m-b"]
        by_agent = await registry.ListModels(mr.ListModelsRequest(agent_id="agent-x"))
        assert _names(by_agent) == ["m-c"] and list(by_agent.models[0].agent_ids) == ["agent-x", "agent-y"]
        assert _names(await registry.ListModels(mr.ListModelsRequest(agent_id="agent-x", method="dpo"))) == []
        assert _names(await registry.ListModels(mr.ListModelsRequest(agent_id="agent-nobody"))) == []
        assert _names(await registry.ListModels(mr.ListModelsRequest(base_model="no-such-base"))) == []
        assert not (await registry.ListModels(llama)).base_models  # only when asked for

        # Pages with the filters: every llama model once, newest first, then no token.
        seen, token, pages = [], "", 0
        while True:
            reply = await registry.ListModels(mr.ListModelsRequest(base_model="llama-3.1-8b", page_size=2,
                                                                   page_token=token, include_base_models=True))
            pages += 1
            seen += _names(reply)
            # The catalog (of that base model) rides on the first page only.
            assert [b.id for b in reply.base_models] == (["llama-3.1-8b"] if pages == 1 else [])
            token = reply.next_page_token
            if not token:
                break
        assert pages == 2 and seen == ["m-d", "m-b", "m-a"]
        sft_pages = [await registry.ListModels(mr.ListModelsRequest(method="sft", page_size=1, page_token=t))
                     for t in ("", "1", "2")]
        assert [_names(p) for p in sft_pages] == [["m-d"], ["m-c"], ["m-a"]]
        assert [p.next_page_token for p in sft_pages] == ["1", "2", ""]

        # The catalog is exactly the job-scheduler's ListBaseModels (same plugin registry).
        full = await registry.ListModels(mr.ListModelsRequest(include_base_models=True, page_size=1))
        catalog = (await clients.job_scheduler.ListBaseModels(js.ListBaseModelsRequest())).base_models
        assert list(full.base_models) == list(catalog)
        assert [b.id for b in full.base_models] == sorted(get_registry().base_models)
        assert _names(full) == ["m-e"] and full.next_page_token == "1"

        bad = await _refused(registry.ListModels(mr.ListModelsRequest(agent_id="agent x!")), SC.INVALID_ARGUMENT)
        assert [f for f, _ in errors.field_violations(bad)] == ["agent_id"]
        bad = await _refused(registry.ListModels(mr.ListModelsRequest(method="s\x1bft", base_model="x" * 200)),
                             SC.INVALID_ARGUMENT)
        assert sorted(f for f, _ in errors.field_violations(bad)) == ["base_model", "method"]
    finally:
        await clients.close()
        await other.close()


# -- assignments, deletion and their events ---------------------------------------------------------

async def _follow(nats_url: str):
    """A real JetStream consumer on tuneforge.model.> (what another service would run)."""
    nc = await nats.connect(nats_url)
    psub = await nc.jetstream().pull_subscribe("tuneforge.model.>", durable="test-follower",
                                               stream=subjects.EVENTS_STREAM)
    return nc, psub


async def _next_events(psub, count: int, timeout: float = 20.0) -> list[tuple[str, object, dict]]:
    """The next ``count`` assignment / deletion events (registration events are skipped)."""
    got: list[tuple[str, object, dict]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} events arrived: {got}"
        try:
            msgs = await psub.fetch(10, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for msg in msgs:
            await msg.ack()
            if msg.subject in FOLLOWED:
                got.append((msg.subject, subjects.MESSAGE_TYPES[msg.subject].FromString(msg.data), msg.headers))
    return got


async def test_agents_share_a_model_use_one_each_and_every_change_is_an_event(services):
    endpoints, settings = services
    clients = await workspace(endpoints)
    clients.app = services.apps["model-registry"]
    nc, psub = await _follow(settings.nats_url)
    try:
        ws = (await clients.job_scheduler.GetWorkspace(js.GetWorkspaceRequest())).workspace
        models = await _models(clients, [("bot-one", "llama-3.1-8b", "sft"), ("bot-two", "qwen-2.5-14b", "dpo")])
        one, two = models["bot-one"], models["bot-two"]
        registry = clients.model_registry

        # Several agents on one model.
        await registry.AssignModelToAgent(mr.AssignModelToAgentRequest(model="bot-one", agent_id="agent-1"))
        reply = await registry.AssignModelToAgent(mr.AssignModelToAgentRequest(model=one.id, agent_id="agent-2"))
        assert list(reply.model.agent_ids) == ["agent-1", "agent-2"]

        # An agent uses one model: another is refused, naming the model it uses and `replace`.
        refused = await _refused(registry.AssignModelToAgent(
            mr.AssignModelToAgentRequest(model="bot-two", agent_id="agent-1")), SC.FAILED_PRECONDITION)
        assert errors.error_reason(refused) == errors.AGENT_HAS_MODEL
        assert "bot-one" in refused.details() and "replace" in refused.details()
        assert list((await registry.GetModel(mr.GetModelRequest(model="bot-two"))).model.agent_ids) == []

        # With replace it moves, in one step.
        reply = await registry.AssignModelToAgent(
            mr.AssignModelToAgentRequest(model="bot-two", agent_id="agent-1", replace=True))
        assert list(reply.model.agent_ids) == ["agent-1"]
        assert list((await registry.GetModel(mr.GetModelRequest(model="bot-one"))).model.agent_ids) == ["agent-2"]
        # The same pair again: a no-op (and, below, no event).
        reply = await registry.AssignModelToAgent(mr.AssignModelToAgentRequest(model="bot-two", agent_id="agent-1"))
        assert list(reply.model.agent_ids) == ["agent-1"]

        # ListAssignments: everything by agent id, by model, by agent.
        everything = (await registry.ListAssignments(mr.ListAssignmentsRequest())).assignments
        assert [(a.agent_id, a.model_id, a.model_name, a.base_model) for a in everything] == [
            ("agent-1", two.id, "bot-two", "qwen-2.5-14b"), ("agent-2", one.id, "bot-one", "llama-3.1-8b")]
        assert all(a.create_time.seconds > 0 for a in everything)
        by_model = (await registry.ListAssignments(mr.ListAssignmentsRequest(model="bot-one"))).assignments
        assert [a.agent_id for a in by_model] == ["agent-2"]
        by_agent = (await registry.ListAssignments(mr.ListAssignmentsRequest(agent_id="agent-1"))).assignments
        assert [(a.agent_id, a.model_name) for a in by_agent] == [("agent-1", "bot-two")]
        assert not (await registry.ListAssignments(mr.ListAssignmentsRequest(agent_id="agent-9"))).assignments
        await _refused(registry.ListAssignments(mr.ListAssignmentsRequest(model="no-such-model")), SC.NOT_FOUND)

        # DeleteModel is refused while an agent uses the model, and allowed once none does.
        refused = await _refused(registry.DeleteModel(mr.DeleteModelRequest(model="bot-one")), SC.FAILED_PRECONDITION)
        assert errors.error_reason(refused) == errors.MODEL_IN_USE
        assert "agent-2" in refused.details() and "unassign" in refused.details()
        assert (await registry.GetModel(mr.GetModelRequest(model="bot-one"))).model.id == one.id
        await registry.UnassignModel(mr.UnassignModelRequest(model="bot-one", agent_id="agent-2"))
        await registry.DeleteModel(mr.DeleteModelRequest(model="bot-one"))
        await _refused(registry.GetModel(mr.GetModelRequest(model="bot-one")), SC.NOT_FOUND)
        store = ArtifactStore(settings.resolved_artifact_url())
        assert store.list(one.adapter_path) == [] and store.list(two.adapter_path)
        # The sentinel: the last change. Every event the registry published before it arrives
        # before it (the outbox publishes in commit order), so an event from the refused calls or
        # the repeated assignment would show in the list below.
        await registry.AssignModelToAgent(mr.AssignModelToAgentRequest(model="bot-two", agent_id="agent-last"))

        events = await _next_events(psub, 6)
        assert [(s, m.model_id, getattr(m, "agent_id", "")) for s, m, _ in events] == [
            (subjects.MODEL_ASSIGNED, one.id, "agent-1"),
            (subjects.MODEL_ASSIGNED, one.id, "agent-2"),
            (subjects.MODEL_ASSIGNED, two.id, "agent-1"),  # the move: one event, naming what it left
            (subjects.MODEL_UNASSIGNED, one.id, "agent-2"),
            (subjects.MODEL_DELETED, one.id, ""),
            (subjects.MODEL_ASSIGNED, two.id, "agent-last"),
        ]
        assert [m.replaced_model_id for s, m, _ in events if s == subjects.MODEL_ASSIGNED] == ["", "", one.id, ""]
        assert [m.model_name for _, m, _ in events] == ["bot-one"] * 2 + ["bot-two"] + ["bot-one"] * 2 + ["bot-two"]
        for _subject, message, headers in events:
            assert message.meta.workspace_id == ws.id
            assert message.meta.job_id == (one.job_id if message.model_id == one.id else two.job_id)
            assert message.meta.producer == "model-registry"
            assert headers["Nats-Msg-Id"] == message.meta.event_id
        assert len({m.meta.event_id for _, m, _ in events}) == 6
    finally:
        await psub.unsubscribe()
        await nc.close()
        await clients.close()


async def test_assignments_need_enterprise_but_anyone_may_list_them(services):
    endpoints, _ = services
    clients = await workspace(endpoints, plan=common_pb2.PLAN_STARTER)
    try:
        refused = await _refused(clients.model_registry.AssignModelToAgent(
            mr.AssignModelToAgentRequest(model="some-model", agent_id="agent-1")), SC.FAILED_PRECONDITION)
        assert errors.error_reason(refused) == errors.PLAN_REQUIRED
        assert not (await clients.model_registry.ListAssignments(mr.ListAssignmentsRequest())).assignments
    finally:
        await clients.close()


# -- a database of the previous version, on SQLite and PostgreSQL --------------------------------------

def _previous_schema() -> MetaData:
    """The model-registry's tables as the previous version created them: agent_assignments
    without the one-model-per-agent index."""
    meta = MetaData()
    Table("models", meta,
          Column("id", String(40), primary_key=True), Column("workspace_id", String(64), index=True),
          Column("name", String(64)), Column("description", Text), Column("base_model", String(64)),
          Column("method", String(32)), Column("job_id", String(40)), Column("dataset", LargeBinary),
          Column("metrics", LargeBinary), Column("hyperparameters", LargeBinary),
          Column("adapter_path", String(512)), Column("files", Text), Column("created_at", DateTime(timezone=True)),
          UniqueConstraint("workspace_id", "name", name="uq_model_name"),
          UniqueConstraint("workspace_id", "job_id", name="uq_model_job"))
    Table("agent_assignments", meta,
          Column("model_id", String(40), ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
          Column("agent_id", String(128), primary_key=True), Column("workspace_id", String(64), index=True),
          Column("created_at", DateTime(timezone=True)))
    return meta


async def test_a_previous_versions_database_gains_one_model_per_agent_at_start(
        database_url, nats_server, tmp_path):  # noqa: F811
    from tuneforge.core.db import Database
    from tuneforge.core.settings import Settings
    from tuneforge.model_registry.models import AssignmentRow
    from tuneforge.model_registry.service import ModelRegistry

    old = _previous_schema()
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    db = Database(database_url)
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(old.create_all)
            await conn.execute(insert(old.tables["models"]), [
                {"id": f"mdl_{n}", "workspace_id": "ws_old", "name": n, "description": "", "base_model": "llama-3.1-8b",
                 "method": "sft", "job_id": f"job_{n}", "dataset": b"", "metrics": b"", "hyperparameters": b"",
                 "adapter_path": f"registry/ws_old/mdl_{n}/adapter", "files": "[]", "created_at": t0}
                for n in ("old1", "old2", "old3")])
            await conn.execute(insert(old.tables["agent_assignments"]), [  # agent-a on two models: allowed then
                {"model_id": "mdl_old1", "agent_id": "agent-a", "workspace_id": "ws_old", "created_at": t0},
                {"model_id": "mdl_old2", "agent_id": "agent-a", "workspace_id": "ws_old",
                 "created_at": t0 + dt.timedelta(hours=1)},
                {"model_id": "mdl_old1", "agent_id": "agent-b", "workspace_id": "ws_old", "created_at": t0},
                {"model_id": "mdl_old3", "agent_id": "agent-b", "workspace_id": "ws_other", "created_at": t0},
            ])
    finally:
        await db.close()

    settings = Settings(data_dir=tmp_path / "state", nats_url=nats_server.url, model_registry_database_url=database_url)
    app = ModelRegistry(settings)
    port = await app.start(port=0)
    key = "tfk_upgrade-test-key"
    chan = channel(f"127.0.0.1:{port}", key)
    try:
        async with app.db.engine.connect() as conn:
            indexes = await conn.run_sync(lambda c: sa_inspect(c).get_indexes("agent_assignments"))
        assert any(i["name"] == "uq_assignment_agent" and i["unique"] for i in indexes), indexes
        async with app.db.session() as session:
            kept = (await session.execute(select(AssignmentRow.workspace_id, AssignmentRow.agent_id,
                                                 AssignmentRow.model_id)
                                          .order_by(AssignmentRow.workspace_id, AssignmentRow.agent_id))).all()
        # agent-a keeps its newest model; agents with one model (in any workspace) keep theirs.
        assert [tuple(r) for r in kept] == [("ws_old", "agent-a", "mdl_old2"), ("ws_old", "agent-b", "mdl_old1"),
                                            ("ws_other", "agent-b", "mdl_old3")]
        with pytest.raises(IntegrityError):  # the database itself now refuses a second model
            async with app.db.session() as session, session.begin():
                session.add(AssignmentRow(model_id="mdl_old3", agent_id="agent-a", workspace_id="ws_old"))

        # The service works on the upgraded tables: the workspace arrives as it does in production.
        await app.bus.publish(subjects.WORKSPACE_UPDATED, ev.WorkspaceUpdated(
            meta=app.bus.meta("ws_old"), workspace_id="ws_old", name="Old", plan=common_pb2.PLAN_ENTERPRISE,
            owner_email="old@example.com", api_key_hashes=[hash_api_key(key)], revision=1))
        registry = mr_grpc.ModelRegistryServiceStub(chan)
        deadline = time.monotonic() + 20
        while True:
            try:
                assigned = (await registry.ListAssignments(mr.ListAssignmentsRequest())).assignments
                break
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == SC.UNAUTHENTICATED and time.monotonic() < deadline, exc
                await asyncio.sleep(0.05)
        assert [(a.agent_id, a.model_id) for a in assigned] == [("agent-a", "mdl_old2"), ("agent-b", "mdl_old1")]

        # Concurrent assignments of one new agent to three models: one model wins, the rest are
        # refused as an agent on another model (or are repeats of the winner), nothing else.
        outcomes = await asyncio.gather(*(
            registry.AssignModelToAgent(mr.AssignModelToAgentRequest(model=f"old{1 + i % 3}", agent_id="racer"))
            for i in range(9)), return_exceptions=True)
        won = {o.model.name for o in outcomes if not isinstance(o, Exception)}
        assert len(won) == 1, outcomes
        for o in outcomes:
            if isinstance(o, Exception):
                assert o.code() == SC.FAILED_PRECONDITION and errors.error_reason(o) == errors.AGENT_HAS_MODEL, o
        racer = (await registry.ListAssignments(mr.ListAssignmentsRequest(agent_id="racer"))).assignments
        assert [a.model_name for a in racer] == list(won)
        await registry.UnassignModel(mr.UnassignModelRequest(model=won.pop(), agent_id="racer"))

        # Replace, refuse deletion while used, delete once free.
        await registry.AssignModelToAgent(mr.AssignModelToAgentRequest(model="old3", agent_id="agent-a", replace=True))
        refused = await _refused(registry.DeleteModel(mr.DeleteModelRequest(model="old3")), SC.FAILED_PRECONDITION)
        assert errors.error_reason(refused) == errors.MODEL_IN_USE and "agent-a" in refused.details()
        await registry.DeleteModel(mr.DeleteModelRequest(model="old2"))
        await _refused(registry.GetModel(mr.GetModelRequest(model="old2")), SC.NOT_FOUND)
    finally:
        await chan.close()
        await app.stop(grace=0.5)

    # A second start finds the index in place and changes nothing.
    app = ModelRegistry(settings)
    await app.start(port=0)
    try:
        async with app.db.session() as session:
            rows = (await session.execute(select(AssignmentRow.agent_id, AssignmentRow.model_id)
                                          .where(AssignmentRow.workspace_id == "ws_old")
                                          .order_by(AssignmentRow.agent_id))).all()
        assert [tuple(r) for r in rows] == [("agent-a", "mdl_old3"), ("agent-b", "mdl_old1")]
    finally:
        await app.stop(grace=0.5)
