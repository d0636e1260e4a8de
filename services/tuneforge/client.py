"""A typed Python client for tuneforge's five services, for scripts and internal services.

The agent-configuration lookup, against the stack of a data directory ($TUNEFORGE_DATA_DIR or
``.tuneforge``) with the workspace key in $TUNEFORGE_API_KEY::

    from tuneforge.client import Client, NotFound

    with Client.discover() as client:
        try:
            model = client.resolve_model("support-bot")
        except NotFound:
            model = None  # no such model in this workspace: keep the agent on its base model
        else:
            print(model.base_model, model.adapter_uri, model.vllm_lora_module)

The same with asyncio, against one gateway address (or a mapping ``{"job-scheduler": "host:port",
...}`` with one address per service)::

    from tuneforge.client import AsyncClient

    async with AsyncClient("tuneforge.internal:50051", api_key=key) as client:
        created = await client.create_job({"name": "support-bot", "base_model": "llama-3.2-1b",
                                           "method": "sft", "topics": ["billing"]})
        async for event in client.watch_job(created.job.id):
            print(event.sequence, event.kind, event.message)

What the client does for its caller:

* **The API key** goes with every call as ``authorization: Bearer <key>``.
* **Deadlines.** Every call has one: ``timeout`` (default 30 s) for a unary call, an hour for a
  streamed response, or what the caller passes as ``timeout=``. The deadline is the caller's
  budget for the whole call, retries included: no attempt and no back-off runs past it, and a
  call that reaches it raises :class:`DeadlineExceeded` (never retried).
* **Retries** (``retries``, default 3, after the first attempt) on UNAVAILABLE only — the server
  was not reached, restarting, or shed the call — with exponential back-off and jitter, and only
  for calls that are safe to repeat: reads (``Get*``, ``List*``, ``Resolve*``, ``Validate*``,
  ``Summarize*``, ``Download*``, ``Watch*``), ``CreateJob`` (it carries an idempotency key,
  ``request_id``: the client makes one up when the caller gives none, and the server answers a
  repeated key with the job it already created) and ``BuildDataset`` (a snapshot is
  content-addressed: the same request finds the same snapshot). Everything else —
  ``CancelJob``, ``AssignModelToAgent``, ``UnassignModel``, ``DeleteModel``, ``ImportExamples``,
  ``DeleteExamples``, ``CreateWorkspace``, ``CreateApiKey``, ``RevokeApiKey``,
  ``SendTestNotification`` — is never retried: an UNAVAILABLE may come after the server acted but
  before its answer arrived, and the same request sent again is a different request on the wire
  (a second cancel or unassign fails, a delete answers NOT_FOUND, a second key or workspace is
  created, an import is counted twice). The caller knows whether repeating is right; the client
  does not. A streamed response is retried only before its first message (the caller has seen
  nothing yet); :meth:`AsyncClient.watch_job` resumes from the last event it saw instead, and the
  downloads start over (the files are rewritten whole).
* **Typed errors**: every failed call, unary or streamed, sync or async, raises a subclass of
  :class:`TuneforgeError` (``.code``, ``.message``, ``.details``), chosen by status code and, for
  FAILED_PRECONDITION, by the server's ``google.rpc.ErrorInfo`` reason: ``PlanRequired``,
  ``ModelInUse``, ``AgentHasModel``. :class:`InvalidArgument` carries the server's
  ``field_violations`` as ``(field, description)`` pairs.

The generated stubs stay reachable as ``client.job_scheduler``, ``client.dataset_builder``,
``client.model_registry``, ``client.trainer`` and ``client.notifier``, with the same method names
and request messages, and the same key, deadlines, retries and typed errors.

:class:`Client` is the blocking flavour: it runs an :class:`AsyncClient` on an event loop of its
own, in a private thread, so it works from code without an event loop and from any thread, also
while another loop runs elsewhere in the process. From a coroutine, use :class:`AsyncClient`
(a blocking call inside a running loop stalls that loop until it returns). One
:class:`AsyncClient` belongs to the event loop it is first used in.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import os
import random
import threading
import time
import types
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import grpc
from google.protobuf import any_pb2, json_format
from grpc_status import rpc_status

from tuneforge import sdk
from tuneforge.api.dataset_builder.v1 import dataset_builder_service_pb2 as dsb
from tuneforge.api.dataset_builder.v1 import (
    dataset_builder_service_pb2_grpc as dsb_grpc,
)
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2_grpc as js_grpc
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.api.model_registry.v1 import model_registry_service_pb2_grpc as mr_grpc
from tuneforge.api.notifier.v1 import notifier_service_pb2 as nt
from tuneforge.api.notifier.v1 import notifier_service_pb2_grpc as nt_grpc
from tuneforge.api.trainer.v1 import trainer_service_pb2 as tr
from tuneforge.api.trainer.v1 import trainer_service_pb2_grpc as tr_grpc
from tuneforge.core import errors as _errors
from tuneforge.core import telemetry
from tuneforge.core.client import DEFAULT_STREAM_TIMEOUT, DEFAULT_TIMEOUT

__all__ = [
    "AgentHasModel", "AlreadyExists", "AsyncClient", "Cancelled", "Client", "DeadlineExceeded",
    "FailedPrecondition", "Internal", "InvalidArgument", "ModelInUse", "NotFound", "PermissionDenied",
    "PlanRequired", "ResourceExhausted", "TuneforgeError", "Unauthenticated", "Unavailable",
    "Unimplemented", "from_rpc_error", "is_retried",
]

DEFAULT_RETRIES = 3
DEFAULT_TRANSFER_TIMEOUT = 600.0  # imports, downloads and dataset builds move whole files


# -- typed errors --------------------------------------------------------------------------------
class TuneforgeError(Exception):
    """A failed call. ``code`` is the gRPC status code, ``message`` the server's message,
    ``details`` the ``google.protobuf.Any`` details of the rich status (BadRequest, ErrorInfo),
    ``reason`` the ErrorInfo reason ("" when none)."""

    status_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN  # what the class stands for

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, details: Iterable[any_pb2.Any] = (),
                 reason: str = "", field_violations: Iterable[tuple[str, str]] = ()):
        super().__init__(message)
        self.code: grpc.StatusCode = code or self.status_code
        self.message = message
        self.details: list[any_pb2.Any] = list(details)
        self.reason = reason
        self.field_violations: list[tuple[str, str]] = list(field_violations)

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.field_violations:
            text += "".join(f"\n  {field}: {description}" for field, description in self.field_violations)
        return text


class InvalidArgument(TuneforgeError):
    """The request is wrong; ``field_violations`` says where, as (field, description) pairs."""

    status_code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(TuneforgeError):
    status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(TuneforgeError):
    status_code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(TuneforgeError):
    status_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(TuneforgeError):
    """No API key, or one the server does not know (revoked, mistyped)."""

    status_code = grpc.StatusCode.UNAUTHENTICATED


class FailedPrecondition(TuneforgeError):
    """The request is valid but the state does not allow it now (a subclass names the reason)."""

    status_code = grpc.StatusCode.FAILED_PRECONDITION


class PlanRequired(FailedPrecondition):
    """The workspace's plan does not include the feature (Enterprise)."""


class ModelInUse(FailedPrecondition):
    """The model is assigned to an agent (unassign it first)."""


class AgentHasModel(FailedPrecondition):
    """The agent already uses another model (assign with ``replace=True`` to move it)."""


class ResourceExhausted(TuneforgeError):
    status_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(TuneforgeError):
    """The call's deadline passed (never retried: the deadline is the caller's budget)."""

    status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(TuneforgeError):
    """The service could not be reached (retried first where that is safe)."""

    status_code = grpc.StatusCode.UNAVAILABLE


class Cancelled(TuneforgeError):
    status_code = grpc.StatusCode.CANCELLED


class Internal(TuneforgeError):
    status_code = grpc.StatusCode.INTERNAL


class Unimplemented(TuneforgeError):
    """The server does not have this RPC (an older version)."""

    status_code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[TuneforgeError]] = {
    cls.status_code: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, PermissionDenied, Unauthenticated, FailedPrecondition,
                ResourceExhausted, DeadlineExceeded, Unavailable, Cancelled, Internal, Unimplemented)
}
_BY_REASON: dict[str, type[FailedPrecondition]] = {
    _errors.PLAN_REQUIRED: PlanRequired,
    _errors.MODEL_IN_USE: ModelInUse,
    _errors.AGENT_HAS_MODEL: AgentHasModel,
}


def from_rpc_error(error: grpc.RpcError) -> TuneforgeError:
    """The typed error for a gRPC error (grpc.aio's or the sync API's), with its rich details."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    message = (error.details() if callable(getattr(error, "details", None)) else "") or ""
    details: list[any_pb2.Any] = []
    if hasattr(error, "trailing_metadata"):
        try:
            status = rpc_status.from_call(error)
        except ValueError:  # details that contradict the status code: ignore them
            status = None
        if status is not None:
            details = list(status.details)
    violations = _errors.field_violations(error) if details else []
    reason = _errors.error_reason(error) if details else ""
    cls = _BY_CODE.get(code, TuneforgeError)
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        cls = _BY_REASON.get(reason, FailedPrecondition)
    return cls(message, code=code, details=details, reason=reason, field_violations=violations)


def _stream_broke(error: TuneforgeError) -> bool:
    """A stream that broke in transport (server restarting, connection reset), not a refusal."""
    if isinstance(error, Unavailable):
        return True
    return error.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) and any(
        s in error.message for s in ("RST_STREAM", "Stream removed", "Socket closed"))


# -- which calls are retried ---------------------------------------------------------------------
IDEMPOTENT_PREFIXES = ("Get", "List", "Resolve", "Validate", "Summarize", "Download", "Watch")
# Not reads, but the server makes a repeat harmless: CreateJob's request_id returns the job already
# created; BuildDataset finds the content-addressed snapshot it built.
SERVER_SAFE = frozenset({"CreateJob", "BuildDataset"})


def is_retried(method: str) -> bool:
    """Whether the client retries RPC ``method`` on UNAVAILABLE (see the module docstring)."""
    return method.startswith(IDEMPOTENT_PREFIXES) or method in SERVER_SAFE


TERMINAL_STATES = frozenset({js.JOB_STATE_SUCCEEDED, js.JOB_STATE_FAILED, js.JOB_STATE_CANCELLED})

# service -> (attribute, generated stub class, service descriptor)
_SERVICES: dict[str, tuple[str, type, Any]] = {
    "job-scheduler": ("job_scheduler", js_grpc.JobSchedulerServiceStub,
                      js.DESCRIPTOR.services_by_name["JobSchedulerService"]),
    "dataset-builder": ("dataset_builder", dsb_grpc.DatasetBuilderServiceStub,
                        dsb.DESCRIPTOR.services_by_name["DatasetBuilderService"]),
    "model-registry": ("model_registry", mr_grpc.ModelRegistryServiceStub,
                       mr.DESCRIPTOR.services_by_name["ModelRegistryService"]),
    "trainer": ("trainer", tr_grpc.TrainerServiceStub, tr.DESCRIPTOR.services_by_name["TrainerService"]),
    "notifier": ("notifier", nt_grpc.NotifierServiceStub, nt.DESCRIPTOR.services_by_name["NotifierService"]),
}
SERVICE_NAMES = tuple(_SERVICES)


def _discover(data_dir: str | os.PathLike | None, api_key: str | None) -> tuple[dict[str, str], str]:
    """Endpoints from the stack file of a data directory, and the API key."""
    from tuneforge.stack import read_stack_file

    directory = Path(data_dir or os.environ.get("TUNEFORGE_DATA_DIR") or ".tuneforge")
    endpoints = read_stack_file(directory)["endpoints"]
    key = api_key or os.environ.get("TUNEFORGE_API_KEY", "")
    if not key:
        raise ValueError("no API key: pass api_key= or set TUNEFORGE_API_KEY")
    return dict(endpoints), key


def _job_spec(spec: js.JobSpec | Mapping[str, Any]) -> js.JobSpec:
    """A JobSpec from a message or a dict in the proto's JSON shape (e.g. {"base_model": ...})."""
    if isinstance(spec, js.JobSpec):
        return spec
    if isinstance(spec, Mapping):
        return json_format.ParseDict(dict(spec), js.JobSpec())
    raise TypeError(f"spec must be a JobSpec or a mapping, not {type(spec).__name__}")


# -- asyncio flavour -----------------------------------------------------------------------------
class _AsyncMethod:
    """One RPC of a generated stub, called with the client's key, deadline, retries and errors."""

    def __init__(self, client: AsyncClient, service: str, method: Any, retry: bool = True):
        self._client = client
        self._service = service
        self.name: str = method.name
        self.client_streaming: bool = method.client_streaming
        self.server_streaming: bool = method.server_streaming
        self.retried = retry and is_retried(method.name) and not method.client_streaming
        self.__doc__ = f"{_SERVICES[service][2].full_name}.{method.name}"

    def _callable(self):
        return getattr(self._client._stub(self._service), self.name)

    def __call__(self, request: Any, *, timeout: float | None = None,
                 metadata: Iterable[tuple[str, str]] | None = None):
        """A coroutine (unary response) or an async iterator (streamed response)."""
        if self.name == "CreateJob" and not request.request_id:
            copy = js.CreateJobRequest()
            copy.CopyFrom(request)
            copy.request_id = uuid.uuid4().hex  # the idempotency key that makes retrying it safe
            request = copy
        client = self._client
        if self.server_streaming:
            budget = DEFAULT_STREAM_TIMEOUT if timeout is None else timeout
            return client._stream(self._callable, request, budget, metadata, self.retried)
        budget = client.timeout if timeout is None else timeout
        return client._unary(self._callable, request, budget, metadata, self.retried)


class AsyncService:
    """A generated stub's methods, through the client (``client.job_scheduler.GetJob(request)``)."""

    def __init__(self, client: AsyncClient, service: str, retry: bool = True):
        self.service = service
        for method in _SERVICES[service][2].methods:
            setattr(self, method.name, _AsyncMethod(client, service, method, retry))

    def __repr__(self) -> str:
        return f"<AsyncService {self.service}>"


class AsyncClient:
    """The asyncio client. ``target``: one "host:port" serving all five services (a gateway), or
    a mapping from service name ("job-scheduler", "dataset-builder", "model-registry", "trainer",
    "notifier") to "host:port" (services left out cannot be called). Channels open on first use.
    """

    job_scheduler: AsyncService
    dataset_builder: AsyncService
    model_registry: AsyncService
    trainer: AsyncService
    notifier: AsyncService

    def __init__(
        self,
        target: str | Mapping[str, str],
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        retry_backoff: float = 0.2,
        retry_backoff_max: float = 5.0,
        credentials: grpc.ChannelCredentials | None = None,
    ):
        if isinstance(target, str):
            if not target.strip():
                raise ValueError("target must be 'host:port' or a mapping of service name to 'host:port'")
            self._endpoints = {name: target for name in SERVICE_NAMES}
        elif isinstance(target, Mapping):
            unknown = sorted(set(target) - set(SERVICE_NAMES))
            if unknown:
                raise ValueError(f"unknown service(s) {', '.join(unknown)}; known: {', '.join(SERVICE_NAMES)}")
            self._endpoints = dict(target)
        else:
            raise TypeError(f"target must be a str or a mapping, not {type(target).__name__}")
        if timeout <= 0:
            raise ValueError("timeout must be positive (seconds)")
        if retries < 0:
            raise ValueError("retries must be 0 or more")
        if retry_backoff < 0 or retry_backoff_max < retry_backoff:
            raise ValueError("need 0 <= retry_backoff <= retry_backoff_max")
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.retry_backoff = float(retry_backoff)
        self.retry_backoff_max = float(retry_backoff_max)
        self._api_key = api_key or ""
        self._credentials = credentials
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, Any] = {}
        self._closed = False
        for service, (attribute, _, _) in _SERVICES.items():
            setattr(self, attribute, AsyncService(self, service))

    @classmethod
    def discover(cls, data_dir: str | os.PathLike | None = None, api_key: str | None = None,
                 **options: Any) -> AsyncClient:
        """A client for the stack running from ``data_dir`` (default $TUNEFORGE_DATA_DIR or
        ``.tuneforge``; ``tuneforge up`` writes its endpoints there) with ``api_key`` (default
        $TUNEFORGE_API_KEY)."""
        endpoints, key = _discover(data_dir, api_key)
        return cls(endpoints, key, **options)

    @property
    def endpoints(self) -> dict[str, str]:
        return dict(self._endpoints)

    # -- channels and calls ----------------------------------------------------------------------
    def _stub(self, service: str):
        if self._closed:
            raise RuntimeError("the client is closed")
        stub = self._stubs.get(service)
        if stub is None:
            target = self._endpoints.get(service)
            if target is None:
                raise ValueError(f"no endpoint for {service}: the client was given {', '.join(self._endpoints)}")
            channel = self._channels.get(target)
            if channel is None:
                options = [
                    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                    # reconnect soon after a restart, so that a retry finds the server back
                    ("grpc.initial_reconnect_backoff_ms", 200),
                    ("grpc.min_reconnect_backoff_ms", 200),
                    ("grpc.max_reconnect_backoff_ms", 5000),
                ]
                interceptors = telemetry.client_interceptors() or None
                if self._credentials is not None:
                    channel = grpc.aio.secure_channel(target, self._credentials, options=options,
                                                      interceptors=interceptors)
                else:
                    channel = grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
                self._channels[target] = channel
            stub = self._stubs[service] = _SERVICES[service][1](channel)
        return stub

    def _metadata(self, extra: Iterable[tuple[str, str]] | None) -> tuple[tuple[str, str], ...]:
        metadata = list(extra or ())
        if self._api_key and not any(k == "authorization" for k, _ in metadata):
            metadata.append(("authorization", f"Bearer {self._api_key}"))
        return tuple(metadata)

    def _retry_delay(self, error: TuneforgeError, tries: int, deadline: float, stream: bool = False) -> float | None:
        """Seconds to wait before retry number ``tries + 1``, or None when there is none: not an
        UNAVAILABLE (or, for a stream, a transport break), retries used up, or the wait would end
        past the deadline."""
        retryable = _stream_broke(error) if stream else isinstance(error, Unavailable)
        if tries >= self.retries or not retryable:
            return None
        delay = min(self.retry_backoff_max, self.retry_backoff * 2 ** tries) * random.uniform(0.5, 1.0)
        if time.monotonic() + delay >= deadline:
            return None
        return delay

    async def _unary(self, method: Callable[[], Any], request: Any, timeout: float,
                     metadata: Iterable[tuple[str, str]] | None, retry: bool) -> Any:
        return await self._retrying(
            lambda remaining: method()(request, timeout=remaining, metadata=self._metadata(metadata)), timeout, retry)

    async def _retrying(self, attempt: Callable[[float], Any], timeout: float, retry: bool) -> Any:
        """Run ``attempt(seconds_left)`` until it succeeds, retrying where allowed; every
        attempt and back-off within ``timeout`` seconds in all."""
        deadline = time.monotonic() + timeout
        tries = 0
        while True:
            try:
                return await attempt(max(deadline - time.monotonic(), 0.001))
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                cause: BaseException = exc
            except TuneforgeError as exc:
                error, cause = exc, exc.__cause__ or exc
            delay = self._retry_delay(error, tries, deadline) if retry else None
            if delay is None:
                raise error from cause
            tries += 1
            await asyncio.sleep(delay)

    async def _stream(self, method: Callable[[], Any], request: Any, timeout: float,
                      metadata: Iterable[tuple[str, str]] | None, retry: bool) -> AsyncIterator[Any]:
        """A streamed response; retried (where allowed) only until its first message."""
        deadline = time.monotonic() + timeout
        tries = 0
        while True:
            started = False
            call = method()(request, timeout=max(deadline - time.monotonic(), 0.001),
                            metadata=self._metadata(metadata))
            try:
                async for response in call:
                    started = True
                    yield response
                return
            except grpc.aio.AioRpcError as exc:
                error = from_rpc_error(exc)
                delay = None if started or not retry else self._retry_delay(error, tries, deadline, stream=True)
                if delay is None:
                    raise error from exc
            finally:
                call.cancel()  # the caller stopped early: end the call (no-op once it finished)
            tries += 1
            await asyncio.sleep(delay)

    async def close(self) -> None:
        """Close the channels (calls in flight are cancelled)."""
        self._closed = True
        channels, self._channels, self._stubs = list(self._channels.values()), {}, {}
        for channel in channels:
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _no_retry(self) -> types.SimpleNamespace:
        """The services without per-call retries, for helpers that retry the whole operation."""
        return types.SimpleNamespace(**{attr: AsyncService(self, service, retry=False)
                                        for service, (attr, _, _) in _SERVICES.items()})

    # -- jobs ------------------------------------------------------------------------------------
    async def list_base_models(self, *, timeout: float | None = None) -> js.ListBaseModelsResponse:
        """The base-model catalog (``base_models``) and the training methods (``methods``)."""
        return await self.job_scheduler.ListBaseModels(js.ListBaseModelsRequest(), timeout=timeout)

    async def validate_job(self, spec: js.JobSpec | Mapping[str, Any], *,
                           timeout: float | None = None) -> js.ValidateJobResponse:
        """The dry run: resolved hyperparameters, warnings, dataset and training plans. A spec the
        server refuses raises :class:`InvalidArgument` with its field violations."""
        return await self.job_scheduler.ValidateJob(js.ValidateJobRequest(spec=_job_spec(spec)), timeout=timeout)

    async def create_job(self, spec: js.JobSpec | Mapping[str, Any], idempotency_key: str | None = None, *,
                         timeout: float | None = None) -> js.CreateJobResponse:
        """Create a job (``.job``, ``.warnings``). ``idempotency_key`` (default: a new UUID) is sent
        as ``request_id``: the server answers a repeat with the job it created, which is what makes
        retrying this call safe — pass your own key to make your own retries safe too."""
        key = idempotency_key if idempotency_key is not None else uuid.uuid4().hex
        return await self.job_scheduler.CreateJob(js.CreateJobRequest(spec=_job_spec(spec), request_id=key),
                                                  timeout=timeout)

    async def get_job(self, job_id: str, *, timeout: float | None = None) -> js.Job:
        return (await self.job_scheduler.GetJob(js.GetJobRequest(job_id=job_id), timeout=timeout)).job

    async def list_jobs(self, *, page_size: int = 50, timeout: float | None = None) -> AsyncIterator[js.Job]:
        """Every job of the workspace, newest first, fetched ``page_size`` at a time."""
        token = ""
        while True:
            page = await self.job_scheduler.ListJobs(js.ListJobsRequest(page_size=page_size, page_token=token),
                                                     timeout=timeout)
            for job in page.jobs:
                yield job
            token = page.next_page_token
            if not token:
                return

    async def cancel_job(self, job_id: str, *, timeout: float | None = None) -> js.Job:
        """Cancel a job (not retried: a repeat of a cancel that went through fails)."""
        return (await self.job_scheduler.CancelJob(js.CancelJobRequest(job_id=job_id), timeout=timeout)).job

    async def watch_job(self, job_id: str, after_sequence: int = 0, *,
                        timeout: float = DEFAULT_STREAM_TIMEOUT) -> AsyncIterator[js.JobEvent]:
        """The job's events after ``after_sequence``, in order, until the job ends. A stream that
        breaks (server restarting, connection lost) is reopened from the last event seen, and an
        event is never yielded twice; up to ``retries`` reconnections in a row without a new
        event, all within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last = after_sequence
        failures = 0
        ended = False
        while True:
            seen = 0
            stream = self._stream(lambda: self._stub("job-scheduler").WatchJob,
                                  js.WatchJobRequest(job_id=job_id, after_sequence=last),
                                  max(deadline - time.monotonic(), 0.001), None, retry=False)
            try:
                async for response in stream:
                    event = response.event
                    if event.sequence <= last:
                        continue  # already yielded (a server may resend its last event)
                    last = event.sequence
                    seen += 1
                    failures = 0
                    ended = event.state in TERMINAL_STATES
                    yield event
            except TuneforgeError as error:
                delay = self._retry_delay(error, failures, deadline, stream=True)
                if delay is None:
                    raise
                failures += 1
                await asyncio.sleep(delay)
                continue
            finally:
                await stream.aclose()
            # The server ends the stream after the job's final event. A stream that ended with
            # new events but none final (a proxy closing it) is reopened to be sure.
            if ended or seen == 0:
                return

    async def list_checkpoints(self, job_id: str, *, timeout: float | None = None) -> list[js.Checkpoint]:
        reply = await self.job_scheduler.ListCheckpoints(js.ListCheckpointsRequest(job_id=job_id), timeout=timeout)
        return list(reply.checkpoints)

    async def get_workspace(self, *, timeout: float | None = None) -> js.Workspace:
        """The workspace of the API key."""
        return (await self.job_scheduler.GetWorkspace(js.GetWorkspaceRequest(), timeout=timeout)).workspace

    # -- models ----------------------------------------------------------------------------------
    async def get_model(self, model: str, *, timeout: float | None = None) -> mr.Model:
        """A fine-tuned model by id or name."""
        return (await self.model_registry.GetModel(mr.GetModelRequest(model=model), timeout=timeout)).model

    async def list_models(self, *, base_model: str = "", method: str = "", agent_id: str = "",
                          page_size: int = 50, timeout: float | None = None) -> AsyncIterator[mr.Model]:
        """The workspace's fine-tuned models, newest first, filtered by base model, training method
        or the agent that uses it (the base catalog: :meth:`list_base_models`)."""
        token = ""
        while True:
            page = await self.model_registry.ListModels(mr.ListModelsRequest(
                page_size=page_size, page_token=token, base_model=base_model, method=method, agent_id=agent_id),
                timeout=timeout)
            for model in page.models:
                yield model
            token = page.next_page_token
            if not token:
                return

    async def resolve_model(self, name: str, *, timeout: float | None = None) -> mr.ResolveModelResponse:
        """What an agent configuration needs to serve model ``name``: base model and its source,
        adapter location and checksum, chat template, vLLM's ``--lora-modules`` argument."""
        return await self.model_registry.ResolveModel(mr.ResolveModelRequest(name=name), timeout=timeout)

    async def assign_model(self, model: str, agent_id: str, replace: bool = False, *,
                           timeout: float | None = None) -> mr.Model:
        """Make agent ``agent_id`` use ``model``. An agent that uses another model raises
        :class:`AgentHasModel` unless ``replace``. Not retried (see the module docstring)."""
        reply = await self.model_registry.AssignModelToAgent(
            mr.AssignModelToAgentRequest(model=model, agent_id=agent_id, replace=replace), timeout=timeout)
        return reply.model

    async def unassign_model(self, model: str, agent_id: str, *, timeout: float | None = None) -> mr.Model:
        """Remove ``model`` from agent ``agent_id``. Not retried."""
        reply = await self.model_registry.UnassignModel(mr.UnassignModelRequest(model=model, agent_id=agent_id),
                                                        timeout=timeout)
        return reply.model

    async def list_assignments(self, *, model: str = "", agent_id: str = "",
                               timeout: float | None = None) -> list[mr.Assignment]:
        """Which agent uses which model, optionally for one model or one agent."""
        reply = await self.model_registry.ListAssignments(mr.ListAssignmentsRequest(model=model, agent_id=agent_id),
                                                          timeout=timeout)
        return list(reply.assignments)

    async def delete_model(self, model: str, *, timeout: float | None = None) -> None:
        """Delete a model; :class:`ModelInUse` while an agent uses it. Not retried."""
        await self.model_registry.DeleteModel(mr.DeleteModelRequest(model=model), timeout=timeout)

    async def download_model(self, model: str, out_dir: str | os.PathLike, *,
                             timeout: float = DEFAULT_TRANSFER_TIMEOUT) -> list[Path]:
        """Write the model's adapter files under ``out_dir``; returns their paths. A broken
        download starts over (each file is rewritten whole), within ``timeout``."""
        return await self._retrying(
            lambda remaining: sdk.download_model(self._no_retry(), model, Path(out_dir), timeout=remaining),
            timeout, True)

    # -- data ------------------------------------------------------------------------------------
    async def import_file(self, path: str | os.PathLike, topics: Iterable[str] | None = None, *,
                          all_or_nothing: bool = False, timeout: float = DEFAULT_TRANSFER_TIMEOUT,
                          on_progress: Callable[[int, int], None] | None = None) -> dsb.ImportExamplesResponse:
        """Import a JSONL file, tagging each example with ``topics``. Not retried: a repeat after
        an import that went through would report its examples as duplicates."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such file: {path}")
        return await sdk.import_file(self, path, list(topics or []), all_or_nothing=all_or_nothing,
                                     timeout=timeout, on_progress=on_progress)

    async def list_topics(self, *, timeout: float | None = None) -> dsb.ListTopicsResponse:
        """Topics with example counts (``topics``) and the workspace's example count."""
        return await self.dataset_builder.ListTopics(dsb.ListTopicsRequest(), timeout=timeout)

    async def build_dataset(
        self, base_model: str, method: str = "sft", topics: Iterable[str] = (), *, test_fraction: float = 0.0,
        seed: int = 0, train_on_inputs: str = "", overlength_policy: int = 0, max_epochs: int = 0,
        dry_run: bool = False, timeout: float = DEFAULT_TRANSFER_TIMEOUT,
    ) -> dsb.BuildDatasetResponse:
        """Build (or find: snapshots are content-addressed) a dataset snapshot of the workspace's
        examples; ``dry_run`` only counts. 0 / "" take the server's defaults."""
        return await self.dataset_builder.BuildDataset(dsb.BuildDatasetRequest(
            topics=list(topics), method=method, base_model=base_model, test_fraction=test_fraction, seed=seed,
            train_on_inputs=train_on_inputs, overlength_policy=overlength_policy, max_epochs=max_epochs,
            dry_run=dry_run), timeout=timeout)

    async def get_dataset(self, dataset_id: str, *, timeout: float | None = None) -> dsb.GetDatasetResponse:
        """A snapshot's summary (``dataset``), ``files`` and ``created_at``."""
        return await self.dataset_builder.GetDataset(dsb.GetDatasetRequest(dataset_id=dataset_id), timeout=timeout)

    async def list_datasets(self, *, page_size: int = 50,
                            timeout: float | None = None) -> AsyncIterator[dsb.DatasetListEntry]:
        """The workspace's snapshots, newest first."""
        token = ""
        while True:
            page = await self.dataset_builder.ListDatasets(
                dsb.ListDatasetsRequest(page_size=page_size, page_token=token), timeout=timeout)
            for entry in page.datasets:
                yield entry
            token = page.next_page_token
            if not token:
                return

    async def download_dataset(self, dataset_id: str, out_dir: str | os.PathLike, *,
                               timeout: float = DEFAULT_TRANSFER_TIMEOUT) -> list[Path]:
        """Write the snapshot's files (train.jsonl, test.jsonl, manifest.json) under ``out_dir``."""
        return await self._retrying(
            lambda remaining: sdk.download_dataset(self._no_retry(), dataset_id, Path(out_dir), timeout=remaining),
            timeout, True)


# -- blocking flavour ----------------------------------------------------------------------------
class _LoopThread:
    """An event loop running in a daemon thread; runs coroutines for blocking callers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="tuneforge-client", daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        if threading.current_thread() is self.thread:
            coroutine.close()
            raise RuntimeError("a blocking tuneforge Client was called from its own event loop "
                               "(e.g. in a progress callback); use AsyncClient there")
        if self.loop.is_closed():
            coroutine.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result()
        except BaseException:  # KeyboardInterrupt in the caller: stop the call too
            future.cancel()
            raise

    def iterate(self, agen: Any) -> Iterator[Any]:
        try:
            while True:
                try:
                    item = self.run(agen.__anext__())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if not self.loop.is_closed():
                try:
                    self.run(agen.aclose())
                except (RuntimeError, concurrent.futures.CancelledError):
                    pass

    def stop(self) -> None:
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)
            if not self.thread.is_alive():
                self.loop.close()


class SyncService:
    """A generated stub's methods, blocking: unary calls return the response, streamed responses
    are iterators, a client stream takes any iterable of requests."""

    def __init__(self, portal: _LoopThread, service: AsyncService):
        self.service = service.service
        for name, method in vars(service).items():
            if isinstance(method, _AsyncMethod):
                setattr(self, name, self._wrap(portal, method))

    @staticmethod
    def _wrap(portal: _LoopThread, method: _AsyncMethod) -> Callable[..., Any]:
        if method.server_streaming:
            def stream(request: Any, *, timeout: float | None = None,
                       metadata: Iterable[tuple[str, str]] | None = None) -> Iterator[Any]:
                return portal.iterate(method(request, timeout=timeout, metadata=metadata))
            stream.__doc__ = method.__doc__
            return stream

        def call(request: Any, *, timeout: float | None = None,
                 metadata: Iterable[tuple[str, str]] | None = None) -> Any:
            return portal.run(method(request, timeout=timeout, metadata=metadata))
        call.__doc__ = method.__doc__
        return call

    def __repr__(self) -> str:
        return f"<SyncService {self.service}>"


def _blocking(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The blocking twin of an AsyncClient method: a result for a coroutine, an iterator for an
    async iterator."""
    if inspect.isasyncgenfunction(fn):
        @functools.wraps(fn)
        def iterate(self: Client, *args: Any, **kwargs: Any) -> Iterator[Any]:
            return self._portal.iterate(fn(self._async, *args, **kwargs))
        return iterate

    @functools.wraps(fn)
    def call(self: Client, *args: Any, **kwargs: Any) -> Any:
        return self._portal.run(fn(self._async, *args, **kwargs))
    return call


async def _construct(target: Any, api_key: str | None, options: dict[str, Any]) -> AsyncClient:
    return AsyncClient(target, api_key, **options)


class Client:
    """The blocking client: the same constructor, options, stubs and methods as
    :class:`AsyncClient`, returning results instead of coroutines and iterators instead of async
    iterators (``list_jobs``, ``list_models``, ``list_datasets``, ``watch_job``)."""

    job_scheduler: SyncService
    dataset_builder: SyncService
    model_registry: SyncService
    trainer: SyncService
    notifier: SyncService

    def __init__(self, target: str | Mapping[str, str], api_key: str | None = None, **options: Any):
        self._portal = _LoopThread()
        try:
            self._async: AsyncClient = self._portal.run(_construct(target, api_key, options))
        except BaseException:
            self._portal.stop()
            raise
        self._finalizer = weakref.finalize(self, self._portal.stop)
        for attribute, _, _ in _SERVICES.values():
            setattr(self, attribute, SyncService(self._portal, getattr(self._async, attribute)))

    @classmethod
    def discover(cls, data_dir: str | os.PathLike | None = None, api_key: str | None = None,
                 **options: Any) -> Client:
        """See :meth:`AsyncClient.discover`."""
        endpoints, key = _discover(data_dir, api_key)
        return cls(endpoints, key, **options)

    @property
    def endpoints(self) -> dict[str, str]:
        return self._async.endpoints

    @property
    def timeout(self) -> float:
        return self._async.timeout

    @property
    def retries(self) -> int:
        return self._async.retries

    def close(self) -> None:
        """Close the channels and stop the client's thread."""
        if self._portal.loop.is_closed():
            return
        try:
            self._portal.run(self._async.close())
        finally:
            self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    list_base_models = _blocking(AsyncClient.list_base_models)
    validate_job = _blocking(AsyncClient.validate_job)
    create_job = _blocking(AsyncClient.create_job)
    get_job = _blocking(AsyncClient.get_job)
    list_jobs = _blocking(AsyncClient.list_jobs)
    cancel_job = _blocking(AsyncClient.cancel_job)
    watch_job = _blocking(AsyncClient.watch_job)
    list_checkpoints = _blocking(AsyncClient.list_checkpoints)
    get_workspace = _blocking(AsyncClient.get_workspace)
    get_model = _blocking(AsyncClient.get_model)
    list_models = _blocking(AsyncClient.list_models)
    resolve_model = _blocking(AsyncClient.resolve_model)
    assign_model = _blocking(AsyncClient.assign_model)
    unassign_model = _blocking(AsyncClient.unassign_model)
    list_assignments = _blocking(AsyncClient.list_assignments)
    delete_model = _blocking(AsyncClient.delete_model)
    download_model = _blocking(AsyncClient.download_model)
    import_file = _blocking(AsyncClient.import_file)
    list_topics = _blocking(AsyncClient.list_topics)
    build_dataset = _blocking(AsyncClient.build_dataset)
    get_dataset = _blocking(AsyncClient.get_dataset)
    list_datasets = _blocking(AsyncClient.list_datasets)
    download_dataset = _blocking(AsyncClient.download_dataset)
