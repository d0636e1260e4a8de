"""Traces and structured logs.

Traces (OpenTelemetry): every service that has an exporter (``TUNEFORGE_OTEL_EXPORTER=console`` or
``otlp``; ``none`` by default) gets its own tracer provider with ``service.name`` = the service.
Spans: a server span per RPC (context taken from the gRPC metadata), a client span per internal
call (context put into the metadata), a producer span per published event (context put into the
NATS headers) and a consumer span per handled event (context taken from the headers). An event
queued in the outbox keeps the trace context of the span that queued it, so the relay's publish,
which runs later in a background task, continues the same trace: one job is one trace from
CreateJob to the email.

Which service a span belongs to comes from a context variable bound when the service starts
(``service_context``): every task the service creates, and every RPC its server runs, inherits it,
so the five services can share one process (as the tests run them) with five tracer providers.

With no exporter nothing is installed: no interceptor, no span, one boolean check per published
or handled event.

Logs: ``TUNEFORGE_LOG_FORMAT=json`` writes one JSON object per line (``JsonFormatter``) with the
service, the job and workspace ids when known (set per handled event, per RPC from the caller's
workspace, and by handlers with ``set_log_context``) and the active span's trace and span ids.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

log = logging.getLogger(__name__)

EXPORTERS = ("none", "console", "otlp")
TRACER_NAME = "tuneforge"

_service: contextvars.ContextVar[str] = contextvars.ContextVar("tuneforge_service", default="")
_job_id: contextvars.ContextVar[str] = contextvars.ContextVar("tuneforge_log_job_id", default="")
_workspace_id: contextvars.ContextVar[str] = contextvars.ContextVar("tuneforge_log_workspace_id", default="")

_providers: dict[str, Any] = {}  # service -> TracerProvider
_tracers: dict[str, trace.Tracer] = {}
_users: dict[str, int] = {}  # running instances of a service in this process (replicas in tests)
_extra_exporters: list[Any] = []  # e.g. an InMemorySpanExporter in tests, for every service
_enabled = False  # some service in this process traces


# -- which service ------------------------------------------------------------------------------
def service_context(service: str) -> contextvars.Context:
    """A copy of the current context in which ``service`` is the current service: run a service's
    start-up in it (``asyncio.create_task(..., context=...)``) and everything it starts inherits it."""
    ctx = contextvars.copy_context()
    ctx.run(_service.set, service)
    return ctx


def current_service() -> str:
    return _service.get()


# -- tracing set-up -----------------------------------------------------------------------------
def export_spans_to(exporter: Any) -> None:
    """Send the spans of every service set up from now on to ``exporter`` too (synchronously, with
    a ``SimpleSpanProcessor``): how tests collect spans with an ``InMemorySpanExporter``."""
    _extra_exporters.append(exporter)


def stop_exporting_to(exporter: Any) -> None:
    if exporter in _extra_exporters:
        _extra_exporters.remove(exporter)


def setup_tracing(service: str, exporter: str = "none") -> bool:
    """Give ``service`` a tracer provider exporting to ``exporter`` (``none``, ``console``,
    ``otlp``; OTLP over gRPC to ``OTEL_EXPORTER_OTLP_ENDPOINT``) and to any exporter registered with
    ``export_spans_to``. Returns whether the service traces."""
    global _enabled
    exporter = (exporter or "none").lower()
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown span exporter {exporter!r}; one of {', '.join(EXPORTERS)}")
    if exporter == "none" and not _extra_exporters:
        return False
    if service in _providers:  # another instance of the service in this process: share it
        _users[service] += 1
        return True
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service, "service.namespace": "tuneforge"}))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(service_name=service)))
    elif exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    for extra in _extra_exporters:
        provider.add_span_processor(SimpleSpanProcessor(extra))
    _providers[service] = provider
    _tracers[service] = provider.get_tracer(TRACER_NAME)
    _users[service] = 1
    _enabled = True
    return True


def shutdown_tracing(service: str) -> None:
    """Flush and drop ``service``'s tracer provider (at service stop, the last instance's)."""
    global _enabled
    _users[service] = _users.get(service, 0) - 1
    if _users[service] > 0:
        return
    _users.pop(service, None)
    provider = _providers.pop(service, None)
    _tracers.pop(service, None)
    _enabled = bool(_providers)
    if provider is not None:
        try:
            provider.shutdown()
        except Exception:  # an exporter that cannot flush must not stop the service stopping
            log.warning("flushing %s's spans failed", service, exc_info=True)


def tracing_enabled() -> bool:
    return _enabled


def tracer() -> trace.Tracer | None:
    """The current service's tracer, or None when it does not trace."""
    if not _enabled:
        return None
    return _tracers.get(_service.get())


def server_interceptors(service: str) -> list:
    """The gRPC server interceptors that trace ``service``'s RPCs (none when it does not trace)."""
    provider = _providers.get(service)
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=provider, filter_=_traced_method)]


UNTRACED_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


def _traced_method(details: Any) -> bool:
    """Health checks (polled by supervisors) and reflection make no spans."""
    method = details.method
    if isinstance(method, bytes):
        method = method.decode()
    return not method.startswith(UNTRACED_PREFIXES)


def client_interceptors() -> list:
    """Client interceptors for a channel opened by the current service (client spans, the trace
    context in the call's metadata); none outside a tracing service (the CLI, the SDK)."""
    if not _enabled:
        return []
    provider = _providers.get(_service.get())
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors(tracer_provider=provider))


# -- NATS messages ------------------------------------------------------------------------------
def _messaging_attributes(subject: str, meta: Any) -> dict[str, str]:
    attributes = {"messaging.system": "nats", "messaging.destination.name": subject}
    if meta is not None:
        if meta.event_id:
            attributes["messaging.message.id"] = meta.event_id
        if meta.job_id:
            attributes["tuneforge.job_id"] = meta.job_id
        if meta.workspace_id:
            attributes["tuneforge.workspace_id"] = meta.workspace_id
    return attributes


@contextlib.contextmanager
def producer_span(subject: str, meta: Any, headers: dict[str, str]) -> Iterator[None]:
    """Around a publish: a producer span, its context injected into ``headers``."""
    t = tracer()
    if t is None:
        yield
        return
    with t.start_as_current_span(f"{subject} publish", kind=trace.SpanKind.PRODUCER,
                                 attributes=_messaging_attributes(subject, meta)):
        propagate.inject(headers)
        yield


@contextlib.contextmanager
def consumer_span(msg: Any, meta: Any = None) -> Iterator[None]:
    """Around handling one message: the job and workspace ids in the log context and, when the
    service traces, a consumer span whose parent is the context in the message's headers. ``meta``
    is the event's ``EventMeta`` (decoded from ``msg`` when not given)."""
    if meta is None:
        meta = _meta_of(msg)
    job_token = _job_id.set(meta.job_id if meta is not None else "")
    workspace_token = _workspace_id.set(meta.workspace_id if meta is not None else "")
    try:
        t = tracer()
        if t is None:
            yield
            return
        parent = propagate.extract(dict(msg.headers or {}))
        with t.start_as_current_span(f"{msg.subject} process", context=parent, kind=trace.SpanKind.CONSUMER,
                                     attributes=_messaging_attributes(msg.subject, meta)):
            yield
    finally:
        _workspace_id.reset(workspace_token)
        _job_id.reset(job_token)


def _meta_of(msg: Any) -> Any:
    from tuneforge.core import subjects

    message_type = subjects.message_type(msg.subject)
    try:
        return message_type.FromString(msg.data).meta if message_type is not None else None
    except Exception:  # undecodable: the consumer deals with it
        return None


def trace_carrier() -> str | None:
    """The current trace context as a small JSON text (``traceparent``…) to store with an event
    that is published later (the outbox); None when not tracing."""
    if tracer() is None:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    kept = {key: carrier[key] for key in ("traceparent", "tracestate") if key in carrier}  # fits the column
    return json.dumps(kept, separators=(",", ":")) if kept else None


@contextlib.contextmanager
def continued_trace(carrier: str | None) -> Iterator[None]:
    """Make the context stored by ``trace_carrier`` current (for the outbox relay's publish)."""
    if not carrier or not _enabled:
        yield
        return
    try:
        ctx = propagate.extract(json.loads(carrier))
    except ValueError:
        yield
        return
    token = otel_context.attach(ctx)
    try:
        yield
    finally:
        otel_context.detach(token)


# -- logs ---------------------------------------------------------------------------------------
def set_log_context(*, job_id: str | None = None, workspace_id: str | None = None) -> None:
    """Name the job / workspace for the rest of the current task's (RPC's, handler's) log lines,
    and on the current span."""
    span = trace.get_current_span()
    recording = span.is_recording()
    if job_id is not None:
        _job_id.set(job_id)
        if recording:
            span.set_attribute("tuneforge.job_id", job_id)
    if workspace_id is not None:
        _workspace_id.set(workspace_id)
        if recording:
            span.set_attribute("tuneforge.workspace_id", workspace_id)


def _rpc_workspace_id() -> str:
    grpc_server = sys.modules.get("tuneforge.core.grpc_server")
    if grpc_server is None:
        return ""
    workspace = grpc_server._current_workspace.get()
    return workspace.id if workspace is not None else ""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, service, job_id / workspace_id when
    known, trace_id / span_id when a span is active, exc_info as text."""

    def __init__(self, service: str = ""):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        service = _service.get() or self.service
        if service:
            out["service"] = service
        job_id = _job_id.get()
        if job_id:
            out["job_id"] = job_id
        workspace_id = _workspace_id.get() or _rpc_workspace_id()
        if workspace_id:
            out["workspace_id"] = workspace_id
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            out["trace_id"] = format(span_context.trace_id, "032x")
            out["span_id"] = format(span_context.span_id, "016x")
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def log_handler(log_format: str = "text", service: str = "", stream: Any = None) -> logging.Handler:
    """A stream handler (stderr by default) with the text or the JSON format."""
    handler = logging.StreamHandler(stream)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(service))
    elif log_format == "text":
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    else:
        raise ValueError(f"unknown log format {log_format!r}; text or json")
    return handler
