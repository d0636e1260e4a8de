"""model-registry: registers trained adapters under their job's name and serves them to agents."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re

import grpc
from sqlalchemy import delete, exists, or_, select
from sqlalchemy.exc import IntegrityError

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as pb
from tuneforge.api.model_registry.v1 import model_registry_service_pb2_grpc as pb_grpc
from tuneforge.core import errors, subjects
from tuneforge.core import validation as val
from tuneforge.core.bus import derived_event_id
from tuneforge.core.errors import (
    ServiceError,
    failed_precondition,
    not_found,
    plan_required,
)
from tuneforge.core.grpc_server import current_workspace
from tuneforge.core.rpc import Page, file_chunks, timestamp
from tuneforge.core.service import BaseService
from tuneforge.core.storage import ArtifactStore
from tuneforge.model_registry.models import AssignmentRow, ModelRow
from tuneforge.plugins import base_model_messages, get_registry

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ModelRegistryService"].full_name
REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
# TRL's assistant-mask markers, with or without whitespace control: ``{%- generation %}`` etc.
_GENERATION_TAG = re.compile(r"\{%(-?)\s*(?:end)?generation\s*(-?)%\}")


def serving_chat_template(training_template: str) -> str:
    """The training template without ``{% generation %}``/``{% endgeneration %}``: those tags are
    a transformers extension that plain Jinja (vLLM, llama.cpp, TGI) rejects. A tag with
    whitespace control becomes an empty comment with the same control, so the rendered text is
    byte-identical to what training saw."""

    def plain(match: re.Match) -> str:
        left, right = match.group(1), match.group(2)
        return f"{{#{left}{right}#}}" if left or right else ""

    return _GENERATION_TAG.sub(plain, training_template)


def model_id_for(workspace_id: str, job_id: str) -> str:
    """A job's model id: one per job, the same on every redelivery of its registration."""
    return "mdl_" + hashlib.sha256(f"{workspace_id}/{job_id}".encode()).hexdigest()[:20]


class ModelRegistry(BaseService):
    name = "model-registry"

    def __init__(self, settings):
        super().__init__(settings)
        self.store = ArtifactStore(settings.resolved_artifact_url())

    def grpc_services(self):
        return [(pb_grpc.add_ModelRegistryServiceServicer_to_server, ModelRegistryServicer(self), SERVICE_NAME)]

    async def on_start(self) -> None:
        await self.bus.consume("model-registry", [subjects.MODEL_REGISTRATION_REQUESTED], self.on_registration_requested,
                               on_dead_letter=self.on_registration_given_up)

    async def on_registration_requested(self, _subject, event: ev.ModelRegistrationRequested, _msg) -> None:
        """Register the job's model once: the model id derives from the job (so a redelivery that
        copies the adapter again writes the same place), the row is unique per job, and the
        answer's event id derives from the request's (JetStream keeps one)."""
        meta = event.meta
        async with self.db.session() as session:
            existing = (
                await session.execute(
                    select(ModelRow).where(ModelRow.workspace_id == meta.workspace_id, ModelRow.job_id == meta.job_id)
                )
            ).scalar_one_or_none()
            clash = (
                await session.execute(
                    select(ModelRow.id).where(
                        ModelRow.workspace_id == meta.workspace_id, ModelRow.name == event.model_name,
                        ModelRow.job_id != meta.job_id,
                    )
                )
            ).first()
        if existing is None and clash:
            await self.emit(subjects.MODEL_REGISTRATION_FAILED, ev.ModelRegistrationFailed(
                meta=self._result_meta(meta, subjects.MODEL_REGISTRATION_FAILED),
                reason=f"a model named {event.model_name!r} already exists in the workspace",
                failure_kind=common_pb2.FAILURE_KIND_USER,
            ))
            return
        if existing is None:
            model_id = model_id_for(meta.workspace_id, meta.job_id)
            prefix = f"registry/{meta.workspace_id}/{model_id}/adapter"
            try:
                files = await asyncio.to_thread(self._copy_adapter, event.adapter_path, prefix)
            except (FileNotFoundError, ValueError) as exc:
                await self.emit(subjects.MODEL_REGISTRATION_FAILED, ev.ModelRegistrationFailed(
                    meta=self._result_meta(meta, subjects.MODEL_REGISTRATION_FAILED),
                    reason=f"the trained adapter is incomplete: {exc}",
                    failure_kind=common_pb2.FAILURE_KIND_SYSTEM,
                ))
                return
            row = ModelRow(
                id=model_id, workspace_id=meta.workspace_id, name=event.model_name,
                description=event.description, base_model=event.base_model, method=event.method,
                job_id=meta.job_id, dataset=event.dataset.SerializeToString(),
                metrics=event.metrics.SerializeToString(),
                hyperparameters=event.hyperparameters.SerializeToString(),
                adapter_path=prefix, files=json.dumps(files),
            )
            async with self.db.session() as session, session.begin():
                session.add(row)  # a concurrent twin fails here (unique per job) and is retried as a repeat
                self.outbox.add(session, subjects.MODEL_REGISTRATION_SUCCEEDED, ev.ModelRegistrationSucceeded(
                    meta=self._result_meta(meta, subjects.MODEL_REGISTRATION_SUCCEEDED), model_id=model_id,
                    model_name=row.name,
                ))
            self.outbox.notify()
        else:  # redelivered: announce again, idempotently
            await self.emit(subjects.MODEL_REGISTRATION_SUCCEEDED, ev.ModelRegistrationSucceeded(
                meta=self._result_meta(meta, subjects.MODEL_REGISTRATION_SUCCEEDED), model_id=existing.id,
                model_name=existing.name,
            ))

    async def on_registration_given_up(self, _subject, event: ev.ModelRegistrationRequested | None, error: str) -> None:
        """Registration failed on every delivery (core.bus.RedeliveryPolicy): the job fails as a
        system error instead of staying REGISTERING forever."""
        if event is None:
            return
        await self.emit(subjects.MODEL_REGISTRATION_FAILED, ev.ModelRegistrationFailed(
            meta=self._result_meta(event.meta, subjects.MODEL_REGISTRATION_FAILED),
            reason=f"the model could not be registered after {self.bus.redelivery.max_deliver} attempts: {error}",
            failure_kind=common_pb2.FAILURE_KIND_SYSTEM,
        ))

    def _result_meta(self, cause: ev.EventMeta, subject: str) -> ev.EventMeta:
        return self.bus.meta(cause.workspace_id, cause.job_id, event_id=derived_event_id(cause.event_id, subject))

    def _copy_adapter(self, source_prefix: str, prefix: str) -> list[dict]:
        keys = self.store.list(source_prefix)
        names = {k[len(source_prefix) + 1:] for k in keys}
        missing = [f for f in REQUIRED_FILES if f not in names]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)} missing under {source_prefix}")
        files = []
        for key in keys:  # copied inside the store (server-side on S3); hashed from the copy, streamed
            rel = key[len(source_prefix) + 1:]
            self.store.copy(key, f"{prefix}/{rel}")
            size, sha256 = self.store.digest(f"{prefix}/{rel}")
            files.append({"path": rel, "size_bytes": size, "sha256": sha256})
        return files


# Agents a MODEL_IN_USE refusal names before "and N more".
NAMED_AGENTS = 20
# A write that lost a race to another request (the one-model-per-agent index, a model deleted
# meanwhile) is read again and decided again, at most this many times.
WRITE_ATTEMPTS = 3


class _Raced(Exception):
    """The rows changed between this transaction's read and its write: decide again."""


class ModelRegistryServicer(pb_grpc.ModelRegistryServiceServicer):
    """The registry's RPCs. Every change to assignments or models is announced on the bus
    (``tuneforge.model.>``) through the outbox, in the transaction that makes it, so another
    service can follow which agent uses which model without polling."""

    def __init__(self, app: ModelRegistry):
        self.app = app

    async def _find(self, session, ref: str, *, lock: str = "") -> ModelRow:
        """The caller's model by id or name. ``lock`` ("share" or "update") takes a row lock on
        PostgreSQL, so an assignment and a deletion of one model never interleave (SQLite has
        one writer at a time, and the writes below are guarded on their own)."""
        ws = current_workspace()
        val.check("invalid model reference", lambda v: val.model_ref(v, "model", ref))
        query = select(ModelRow).where(ModelRow.workspace_id == ws.id, or_(ModelRow.id == ref, ModelRow.name == ref))
        if lock:
            query = query.with_for_update(read=lock == "share")
        row = (await session.execute(query)).scalar_one_or_none()
        if row is None:
            raise not_found(f"model {ref!r}")
        return row

    async def _agents_of(self, session, model_ids: list[str]) -> dict[str, list[str]]:
        """Agent ids per model, sorted, for a page of models in one query."""
        agents: dict[str, list[str]] = {m: [] for m in model_ids}
        if model_ids:
            rows = await session.execute(
                select(AssignmentRow.model_id, AssignmentRow.agent_id)
                .where(AssignmentRow.model_id.in_(model_ids)).order_by(AssignmentRow.agent_id)
            )
            for model_id, agent_id in rows:
                agents[model_id].append(agent_id)
        return agents

    @staticmethod
    def _to_proto(row: ModelRow, agents: list[str]) -> pb.Model:
        return pb.Model(
            id=row.id, name=row.name, description=row.description, base_model=row.base_model, method=row.method,
            job_id=row.job_id, dataset=common_pb2.DatasetSummary.FromString(row.dataset),
            metrics=common_pb2.TrainingMetrics.FromString(row.metrics),
            hyperparameters=common_pb2.Hyperparameters.FromString(row.hyperparameters),
            files=[common_pb2.ArtifactFile(**f) for f in json.loads(row.files)],
            adapter_path=row.adapter_path, agent_ids=agents, create_time=timestamp(row.created_at),
        )

    async def _model(self, ref: str) -> pb.Model:
        async with self.app.db.session() as session:
            row = await self._find(session, ref)
            return self._to_proto(row, (await self._agents_of(session, [row.id]))[row.id])

    def _meta(self, row: ModelRow) -> ev.EventMeta:
        """A new fact each time (a fresh event id): assigning, unassigning and assigning again are
        three events. The job id is the model's job, so a follower can tie it to the run."""
        return self.app.bus.meta(row.workspace_id, row.job_id)

    async def GetModel(self, request, context):
        return pb.GetModelResponse(model=await self._model(request.model))

    async def ListModels(self, request, context):
        """This workspace's fine-tuned models, newest first, filtered by base model, method and
        assigned agent; with ``include_base_models`` the first page also carries the base catalog
        (what a "Hosting & Models" view shows beside them). A page token is an offset: valid with
        the filters it was issued for."""
        ws = current_workspace()
        val.check(
            "invalid request",
            lambda v: val.page(v, request),
            lambda v: val.keyword(v, "base_model", request.base_model),
            lambda v: val.keyword(v, "method", request.method),
            lambda v: not request.agent_id or val.agent_id(v, "agent_id", request.agent_id),
        )
        page = Page.of(request, default=50, maximum=200)
        query = select(ModelRow).where(ModelRow.workspace_id == ws.id)
        if request.base_model:
            query = query.where(ModelRow.base_model == request.base_model)
        if request.method:
            query = query.where(ModelRow.method == request.method)
        if request.agent_id:
            query = query.where(ModelRow.id.in_(
                select(AssignmentRow.model_id).where(AssignmentRow.workspace_id == ws.id,
                                                     AssignmentRow.agent_id == request.agent_id)
            ))
        async with self.app.db.session() as session:
            rows = (await session.execute(
                query.order_by(ModelRow.created_at.desc(), ModelRow.id).offset(page.offset).limit(page.size + 1)
            )).scalars().all()
            agents = await self._agents_of(session, [r.id for r in rows[:page.size]])
        catalog = base_model_messages(request.base_model) if request.include_base_models and page.offset == 0 else []
        return pb.ListModelsResponse(
            models=[self._to_proto(r, agents[r.id]) for r in rows[:page.size]],
            next_page_token=page.next_token(len(rows)), base_models=catalog,
        )

    async def ResolveModel(self, request, context):
        async with self.app.db.session() as session:
            row = await self._find(session, request.name)
        files = {f["path"]: f for f in json.loads(row.files)}
        # A model whose family plugin was uninstalled still resolves: without source and template.
        spec = get_registry().base_models.get(row.base_model)
        store = self.app.store
        adapter_uri = f"{store.url}/{row.adapter_path}"
        # vLLM reads the adapter from a local directory: the store's own for a local store, else
        # the directory a user downloads the adapter to (DownloadModel), named after the model.
        local_dir = f"{store.root}/{row.adapter_path}" if store.is_local else f"./{row.name}"
        hp = common_pb2.Hyperparameters.FromString(row.hyperparameters)
        return pb.ResolveModelResponse(
            model_id=row.id, base_model=row.base_model, adapter_path=row.adapter_path,
            adapter_sha256=files["adapter_model.safetensors"]["sha256"],
            base_model_source=spec.source if spec else "",
            adapter_uri=adapter_uri,
            chat_template=serving_chat_template(spec.training_chat_template) if spec else "",
            vllm_lora_module=f"{row.name}={local_dir}",
            lora_rank=hp.lora_rank,
        )

    def _enterprise(self, action: str) -> None:
        ws = current_workspace()
        if not ws.can_train:
            raise plan_required(f"{action} needs the Enterprise plan; this workspace is on {ws.plan_name}")

    async def AssignModelToAgent(self, request, context):
        """An agent uses one model, a model serves any number of agents. The pair that exists
        already is a no-op (no event). An agent on another model is refused (AGENT_HAS_MODEL)
        unless ``replace``: then it moves in one transaction, announced by ONE ModelAssigned whose
        ``replaced_model_id`` names the model it left (no ModelUnassigned for that move)."""
        self._enterprise("assigning models to agents")
        ws = current_workspace()
        agent = request.agent_id
        val.check("invalid request", lambda v: val.model_ref(v, "model", request.model),
                  lambda v: val.agent_id(v, "agent_id", agent))
        for attempt in range(WRITE_ATTEMPTS):
            try:
                async with self.app.db.session() as session, session.begin():
                    row = await self._find(session, request.model, lock="share")
                    current = (await session.execute(
                        select(AssignmentRow)
                        .where(AssignmentRow.workspace_id == ws.id, AssignmentRow.agent_id == agent)
                    )).scalar_one_or_none()
                    if current is not None and current.model_id == row.id:
                        break  # already so: nothing changed, nothing to announce
                    replaced = ""
                    if current is not None:
                        if not request.replace:
                            used = await session.get(ModelRow, current.model_id)
                            used_name = f"{used.name!r} ({used.id})" if used else repr(current.model_id)
                            raise failed_precondition(
                                f"agent {agent!r} already uses model {used_name}; an agent uses one model: assign "
                                f"again with replace to move it to {row.name!r}, or unassign it first",
                                errors.AGENT_HAS_MODEL)
                        moved = await session.execute(delete(AssignmentRow).where(
                            AssignmentRow.model_id == current.model_id, AssignmentRow.agent_id == agent))
                        if moved.rowcount != 1:
                            raise _Raced
                        replaced = current.model_id
                    session.add(AssignmentRow(model_id=row.id, agent_id=agent, workspace_id=ws.id))
                    await session.flush()  # the unique index or the foreign key speaks here
                    self.app.outbox.add(session, subjects.MODEL_ASSIGNED, ev.ModelAssigned(
                        meta=self._meta(row), model_id=row.id, model_name=row.name, agent_id=agent,
                        replaced_model_id=replaced,
                    ))
                self.app.outbox.notify()
                break
            except (IntegrityError, _Raced):
                # Another request assigned this agent, or deleted the model, since we read: read again.
                log.info("assignment of agent %s raced (attempt %d of %d)", agent, attempt + 1, WRITE_ATTEMPTS)
        else:
            raise _busy(f"agent {agent!r}")
        return pb.AssignModelToAgentResponse(model=await self._model(row.id))

    async def UnassignModel(self, request, context):
        self._enterprise("assigning models to agents")
        val.check("invalid request", lambda v: val.model_ref(v, "model", request.model),
                  lambda v: val.agent_id(v, "agent_id", request.agent_id))
        async with self.app.db.session() as session, session.begin():
            row = await self._find(session, request.model)
            result = await session.execute(
                delete(AssignmentRow).where(AssignmentRow.model_id == row.id, AssignmentRow.agent_id == request.agent_id)
            )
            if result.rowcount == 0:
                raise not_found(f"assignment of {request.model!r} to agent {request.agent_id!r}")
            self.app.outbox.add(session, subjects.MODEL_UNASSIGNED, ev.ModelUnassigned(
                meta=self._meta(row), model_id=row.id, model_name=row.name, agent_id=request.agent_id,
            ))
        self.app.outbox.notify()
        return pb.UnassignModelResponse(model=await self._model(row.id))

    async def ListAssignments(self, request, context):
        """Which agent uses which model, by agent id; ``model`` and ``agent_id`` narrow it (an
        unknown model is NOT_FOUND; an agent without a model gives an empty list)."""
        ws = current_workspace()
        val.check("invalid request",
                  lambda v: not request.model or val.model_ref(v, "model", request.model),
                  lambda v: not request.agent_id or val.agent_id(v, "agent_id", request.agent_id))
        query = (select(AssignmentRow, ModelRow).join(ModelRow, ModelRow.id == AssignmentRow.model_id)
                 .where(AssignmentRow.workspace_id == ws.id))
        if request.agent_id:
            query = query.where(AssignmentRow.agent_id == request.agent_id)
        async with self.app.db.session() as session:
            if request.model:
                query = query.where(AssignmentRow.model_id == (await self._find(session, request.model)).id)
            rows = (await session.execute(query.order_by(AssignmentRow.agent_id))).all()
        return pb.ListAssignmentsResponse(assignments=[
            pb.Assignment(agent_id=a.agent_id, model_id=m.id, model_name=m.name, base_model=m.base_model,
                          create_time=timestamp(a.created_at))
            for a, m in rows
        ])

    async def DownloadModel(self, request, context):
        self._enterprise("downloading adapter weights")
        async with self.app.db.session() as session:
            row = await self._find(session, request.model)
        paths = [f["path"] for f in json.loads(row.files)]
        async for chunk in file_chunks(self.app.store, row.adapter_path, paths):
            yield pb.DownloadModelResponse(chunk=chunk)

    async def DeleteModel(self, request, context):
        """Refused (MODEL_IN_USE) while an agent uses the model: deleting it would leave the agent
        without the adapter it serves. The delete itself is guarded by the same condition, so an
        assignment committed after the check is never cascaded away unannounced."""
        for attempt in range(WRITE_ATTEMPTS):
            try:
                async with self.app.db.session() as session, session.begin():
                    row = await self._find(session, request.model, lock="update")
                    agents = (await self._agents_of(session, [row.id]))[row.id]
                    if agents:
                        named = ", ".join(agents[:NAMED_AGENTS])
                        more = f" and {len(agents) - NAMED_AGENTS} more" if len(agents) > NAMED_AGENTS else ""
                        raise failed_precondition(
                            f"model {row.name!r} is used by {len(agents)} agent(s): {named}{more}; "
                            "unassign it from them first (UnassignModel), then delete it", errors.MODEL_IN_USE)
                    gone = await session.execute(delete(ModelRow).where(
                        ModelRow.id == row.id, ~exists().where(AssignmentRow.model_id == row.id)))
                    if gone.rowcount != 1:
                        raise _Raced
                    self.app.outbox.add(session, subjects.MODEL_DELETED, ev.ModelDeleted(
                        meta=self._meta(row), model_id=row.id, model_name=row.name,
                    ))
                break
            except _Raced:
                log.info("deletion of model %s raced (attempt %d of %d)", row.id, attempt + 1, WRITE_ATTEMPTS)
        else:
            raise _busy(f"model {request.model!r}")
        self.app.outbox.notify()
        await asyncio.to_thread(self.app.store.delete_prefix, row.adapter_path.rsplit("/", 1)[0])
        return pb.DeleteModelResponse()


def _busy(what: str) -> ServiceError:
    """ABORTED: other requests kept changing ``what`` while this one tried; the client may retry."""
    return ServiceError(grpc.StatusCode.ABORTED, f"{what} was changed concurrently {WRITE_ATTEMPTS} times; try again")
