"""Typed client stubs with the API key and a deadline on every call."""

from __future__ import annotations

import dataclasses

import grpc

from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2_grpc as dsb_grpc
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2_grpc as js_grpc
from tuneforge.api.model_registry.v1 import model_registry_service_pb2_grpc as mr_grpc
from tuneforge.api.notifier.v1 import notifier_service_pb2_grpc as nt_grpc
from tuneforge.api.trainer.v1 import trainer_service_pb2_grpc as tr_grpc
from tuneforge.core import telemetry

DEFAULT_TIMEOUT = 30.0
# A call with a streamed response (WatchJob, downloads) may run long, but never unbounded: this is
# its deadline unless the caller passes ``timeout=``.
DEFAULT_STREAM_TIMEOUT = 3600.0


class _AuthDeadline:
    """Adds the bearer key and a default deadline. grpc.aio files an interceptor under the first
    interceptor type it is an instance of, so each call shape gets its own subclass below."""

    def __init__(self, token: str | None, timeout: float | None):
        self.token = token
        self.timeout = timeout

    def _details(self, details: grpc.aio.ClientCallDetails, streaming_response: bool):
        metadata = list(details.metadata or [])
        if self.token and not any(k == "authorization" for k, _ in metadata):
            metadata.append(("authorization", f"Bearer {self.token}"))
        timeout = details.timeout
        if timeout is None:
            timeout = DEFAULT_STREAM_TIMEOUT if streaming_response else self.timeout
        return grpc.aio.ClientCallDetails(details.method, timeout, metadata, details.credentials, details.wait_for_ready)



class _UnaryUnary(_AuthDeadline, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details, False), request)


class _UnaryStream(_AuthDeadline, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details, True), request)


class _StreamUnary(_AuthDeadline, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details, False), request_iterator)


class _StreamStream(_AuthDeadline, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details, True), request_iterator)


def channel(target: str, token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT) -> grpc.aio.Channel:
    """A channel that sends ``token`` as a bearer API key and sets a default deadline on every
    call: ``timeout`` for unary responses, ``DEFAULT_STREAM_TIMEOUT`` for streamed ones (pass
    ``timeout=`` per call to choose another). Opened by a service that traces, its calls get
    client spans and carry the trace context in their metadata."""
    return grpc.aio.insecure_channel(
        target,
        interceptors=[*(cls(token, timeout) for cls in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)),
                      *telemetry.client_interceptors()],
        options=[("grpc.max_receive_message_length", 16 * 1024 * 1024)],
    )


@dataclasses.dataclass
class Clients:
    """Stubs of the five services."""

    dataset_builder: dsb_grpc.DatasetBuilderServiceStub
    job_scheduler: js_grpc.JobSchedulerServiceStub
    trainer: tr_grpc.TrainerServiceStub
    model_registry: mr_grpc.ModelRegistryServiceStub
    notifier: nt_grpc.NotifierServiceStub
    channels: list[grpc.aio.Channel]

    @classmethod
    def connect(cls, endpoints: dict[str, str], token: str | None) -> "Clients":
        chans = {name: channel(target, token) for name, target in endpoints.items()}
        return cls(
            dataset_builder=dsb_grpc.DatasetBuilderServiceStub(chans["dataset-builder"]),
            job_scheduler=js_grpc.JobSchedulerServiceStub(chans["job-scheduler"]),
            trainer=tr_grpc.TrainerServiceStub(chans["trainer"]),
            model_registry=mr_grpc.ModelRegistryServiceStub(chans["model-registry"]),
            notifier=nt_grpc.NotifierServiceStub(chans["notifier"]),
            channels=list(chans.values()),
        )

    async def close(self) -> None:
        for ch in self.channels:
            await ch.close()

    async def __aenter__(self) -> "Clients":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
