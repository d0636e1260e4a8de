"""trainer service: the gRPC face (backends, worker status) of a training worker."""

from __future__ import annotations

import logging

from google.protobuf.timestamp_pb2 import Timestamp

from tuneforge.api.trainer.v1 import trainer_service_pb2 as pb
from tuneforge.api.trainer.v1 import trainer_service_pb2_grpc as pb_grpc
from tuneforge.core.grpc_server import current_workspace
from tuneforge.core.service import BaseService
from tuneforge.plugins import get_registry
from tuneforge.trainer.worker import TrainingWorker

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TrainerService"].full_name


class Trainer(BaseService):
    name = "trainer"

    def __init__(self, settings):
        super().__init__(settings)
        self.worker: TrainingWorker | None = None

    def grpc_services(self):
        return [(pb_grpc.add_TrainerServiceServicer_to_server, TrainerServicer(self), SERVICE_NAME)]

    async def on_start(self) -> None:
        self.worker = TrainingWorker(self.settings, self.bus)
        self.spawn(self.worker.run(), "training-worker")

    async def on_stop(self) -> None:
        if self.worker:
            self.worker.stop()


def _device() -> str:
    import torch  # the trainer is the one service that may import torch

    return "cuda:0" if torch.cuda.is_available() else "cpu"


class TrainerServicer(pb_grpc.TrainerServiceServicer):
    def __init__(self, app: Trainer):
        self.app = app

    async def ListBackends(self, request, context):
        current_workspace()
        registry = get_registry()
        store = self.app.settings.resolved_model_store()
        models = []
        for spec in sorted(registry.base_models.values(), key=lambda s: s.id):
            folder = store / spec.id
            marker = folder / "tuneforge_standin.json"
            models.append(pb.BaseModelInfo(id=spec.id, family=spec.family,
                                           available=(folder / "config.json").exists(), standin=marker.exists()))
        return pb.ListBackendsResponse(
            methods=[pb.TrainingMethodInfo(name=m.name, display_name=m.display_name, dataset_kind=m.dataset_kind)
                     for m in sorted(registry.methods.values(), key=lambda m: m.name)],
            base_models=models,
            plugins=registry.plugin_names,
            device=_device(),
        )

    async def GetWorkerStatus(self, request, context):
        workspace = current_workspace()
        s = self.app.worker.status
        start = Timestamp()
        start.FromSeconds(int(s.start_time))
        reply = pb.GetWorkerStatusResponse(worker_id=s.worker_id, runs_completed=s.runs_completed, start_time=start)
        # The job in hand is shown to its own workspace only: another's job id must not leak.
        if s.current_job_id and s.current_workspace_id == workspace.id:
            reply.current_job_id, reply.current_attempt, reply.current_step = (
                s.current_job_id, s.current_attempt, s.current_step)
        return reply

