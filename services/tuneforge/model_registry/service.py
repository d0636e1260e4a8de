"""model-registry: registers trained adapters under their job's name and serves them to agents."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re

from sqlalchemy import delete, or_, select

from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as pb
from tuneforge.api.model_registry.v1 import model_registry_service_pb2_grpc as pb_grpc
from tuneforge.core import subjects
from tuneforge.core.bus import derived_event_id
from tuneforge.core.errors import failed_precondition, not_found
from tuneforge.core.grpc_server import current_workspace
from tuneforge.core.rpc import Page, file_chunks, timestamp
from tuneforge.core import validation as val
from tuneforge.core.service import BaseService
from tuneforge.core.storage import ArtifactStore
from tuneforge.model_registry.models import AssignmentRow, Base, ModelRow
from tuneforge.plugins import get_registry

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
    tables = (Base,)

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
        for key in keys:
            rel = key[len(source_prefix) + 1:]
            data = self.store.get_bytes(key)
            self.store.put_bytes(f"{prefix}/{rel}", data)
            files.append({"path": rel, "size_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        return files


class ModelRegistryServicer(pb_grpc.ModelRegistryServiceServicer):
    def __init__(self, app: ModelRegistry):
        self.app = app

    async def _find(self, session, ref: str) -> ModelRow:
        ws = current_workspace()
        val.check("invalid model reference", lambda v: val.model_ref(v, "model", ref))
        row = (
            await session.execute(
                select(ModelRow).where(ModelRow.workspace_id == ws.id, or_(ModelRow.id == ref, ModelRow.name == ref))
            )
        ).scalar_one_or_none()
        if row is None:
            raise not_found(f"model {ref!r}")
        return row

    async def _to_proto(self, session, row: ModelRow) -> pb.Model:
        agents = [a for (a,) in await session.execute(
            select(AssignmentRow.agent_id).where(AssignmentRow.model_id == row.id).order_by(AssignmentRow.agent_id)
        )]
        return pb.Model(
            id=row.id, name=row.name, description=row.description, base_model=row.base_model, method=row.method,
            job_id=row.job_id, dataset=common_pb2.DatasetSummary.FromString(row.dataset),
            metrics=common_pb2.TrainingMetrics.FromString(row.metrics),
            hyperparameters=common_pb2.Hyperparameters.FromString(row.hyperparameters),
            files=[common_pb2.ArtifactFile(**f) for f in json.loads(row.files)],
            adapter_path=row.adapter_path, agent_ids=agents, create_time=timestamp(row.created_at),
        )

    async def GetModel(self, request, context):
        async with self.app.db.session() as session:
            row = await self._find(session, request.model)
            return pb.GetModelResponse(model=await self._to_proto(session, row))

    async def ListModels(self, request, context):
        ws = current_workspace()
        val.check("invalid request", lambda v: val.page(v, request))
        page = Page.of(request, default=50, maximum=200)
        size, offset = page.size, page.offset
        async with self.app.db.session() as session:
            rows = (await session.execute(
                select(ModelRow).where(ModelRow.workspace_id == ws.id)
                .order_by(ModelRow.created_at.desc(), ModelRow.id).offset(offset).limit(size + 1)
            )).scalars().all()
            models = [await self._to_proto(session, r) for r in rows[:size]]
        return pb.ListModelsResponse(models=models, next_page_token=page.next_token(len(rows)))

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
            raise failed_precondition(f"{action} needs the Enterprise plan; this workspace is on {ws.plan_name}")

    async def AssignModelToAgent(self, request, context):
        self._enterprise("assigning models to agents")
        val.check("invalid agent id", lambda v: val.agent_id(v, "agent_id", request.agent_id))
        async with self.app.db.session() as session, session.begin():
            row = await self._find(session, request.model)
            if await session.get(AssignmentRow, (row.id, request.agent_id)) is None:
                session.add(AssignmentRow(model_id=row.id, agent_id=request.agent_id, workspace_id=row.workspace_id))
        async with self.app.db.session() as session:
            return pb.AssignModelToAgentResponse(model=await self._to_proto(session, await self._find(session, row.id)))

    async def UnassignModel(self, request, context):
        self._enterprise("assigning models to agents")
        val.check("invalid agent id", lambda v: val.agent_id(v, "agent_id", request.agent_id))
        async with self.app.db.session() as session, session.begin():
            row = await self._find(session, request.model)
            result = await session.execute(
                delete(AssignmentRow).where(AssignmentRow.model_id == row.id, AssignmentRow.agent_id == request.agent_id)
            )
            if result.rowcount == 0:
                raise not_found(f"assignment of {request.model!r} to agent {request.agent_id!r}")
        async with self.app.db.session() as session:
            return pb.UnassignModelResponse(model=await self._to_proto(session, await self._find(session, row.id)))

    async def DownloadModel(self, request, context):
        self._enterprise("downloading adapter weights")
        async with self.app.db.session() as session:
            row = await self._find(session, request.model)
        paths = [f["path"] for f in json.loads(row.files)]
        async for chunk in file_chunks(self.app.store, row.adapter_path, paths):
            yield pb.DownloadModelResponse(chunk=chunk)

    async def DeleteModel(self, request, context):
        async with self.app.db.session() as session, session.begin():
            row = await self._find(session, request.model)
            await session.execute(delete(AssignmentRow).where(AssignmentRow.model_id == row.id))
            await session.delete(row)
            prefix = row.adapter_path.rsplit("/", 1)[0]
        await asyncio.to_thread(self.app.store.delete_prefix, prefix)
        return pb.DeleteModelResponse()

