"""Traces and logs: one job is one trace across the five services, and JSON logs name the job.

The single-trace test runs the five services in this event loop (real nats-server, real gRPC on
loopback, SQLite, an SMTP sink, real TRL training of a tiny Llama stand-in) with every service's
spans going to an in-memory exporter. The log test runs `tuneforge serve notifier` as a process
with ``TUNEFORGE_LOG_FORMAT=json`` and the console span exporter, and reads what it writes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from conftest import workspace  # noqa: F401  (fixtures `services`, `smtp_server` live in conftest)
from tuneforge import sdk
from tuneforge.api.common.v1 import common_pb2
from tuneforge.api.events.v1 import events_pb2 as ev
from tuneforge.api.job_scheduler.v1 import job_scheduler_service_pb2 as js
from tuneforge.api.model_registry.v1 import model_registry_service_pb2 as mr
from tuneforge.core import subjects, telemetry
from tuneforge.core.bus import Bus
from tuneforge.core.nats_server import NatsServerProcess, free_port
from tuneforge.core.settings import SERVICES, Settings
from tuneforge.plugins import get_registry
from tuneforge.trainer.standin import make_standin

pytestmark = pytest.mark.integration

BASE_MODEL = "llama-3.2-1b"  # no tool calling: CreateJob asks the dataset-builder (an internal call)
TOPIC = "greetings"
CREATE_JOB = "/tuneforge.api.job_scheduler.v1.JobSchedulerService/CreateJob"
SUMMARIZE = "/tuneforge.api.dataset_builder.v1.DatasetBuilderService/SummarizeExamples"


@pytest.fixture(scope="module")
def stand_in_store(tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("models")
    make_standin(get_registry().base_model(BASE_MODEL), store)
    return store


@pytest.fixture
def span_exporter():
    """Every service started while it is active exports its spans here too."""
    exporter = InMemorySpanExporter()
    telemetry.export_spans_to(exporter)
    yield exporter
    telemetry.stop_exporting_to(exporter)


@pytest.fixture
def traced_env(monkeypatch, span_exporter, smtp_server, stand_in_store):
    """Settings the `services` fixture's services read from the environment (list this fixture
    before `services`)."""
    monkeypatch.setenv("TUNEFORGE_SMTP_HOST", smtp_server.host)
    monkeypatch.setenv("TUNEFORGE_SMTP_PORT", str(smtp_server.port))
    monkeypatch.setenv("TUNEFORGE_MODEL_STORE", str(stand_in_store))
    monkeypatch.setenv("TUNEFORGE_TRAINING_HEARTBEAT_SECONDS", "1")
    return span_exporter


def examples_file(path: Path, n: int = 24) -> Path:
    lines = []
    for i in range(n):
        name = ("Ada", "Bo", "Cy", "Di")[i % 4]
        lines.append(json.dumps({"messages": [
            {"role": "user", "content": f"Say hello to {name} ({i})."},
            {"role": "assistant", "content": f"Hello, {name}!"},
        ], "topics": [TOPIC]}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _service(span) -> str:
    return span.resource.attributes.get("service.name", "")


async def _until(predicate, exporter: InMemorySpanExporter, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        spans = exporter.get_finished_spans()
        if predicate(spans) or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.1)


async def test_one_job_is_one_trace_across_the_five_services(traced_env, services, smtp_server, tmp_path,
                                                             one_torch_thread):
    exporter = traced_env
    endpoints, settings = services
    assert settings.smtp_host == smtp_server.host and settings.resolved_model_store().exists()
    clients = await workspace(endpoints)
    async with grpc.aio.insecure_channel(endpoints["job-scheduler"]) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    try:
        imported = await sdk.import_file(clients, examples_file(tmp_path / "hello.jsonl"))
        assert imported.imported == 24, imported
        created = await clients.job_scheduler.CreateJob(js.CreateJobRequest(spec=js.JobSpec(
            name="hello-sft", topics=[TOPIC], base_model=BASE_MODEL, method="sft",
            hyperparameters=common_pb2.Hyperparameters(
                min_examples=10, max_epochs=1, n_evals=1, batch_size=8, test_fraction=0.2),
        )))
        job_id = created.job.id
        await sdk.watch_job(clients, job_id, timeout=120)
        job = (await clients.job_scheduler.GetJob(js.GetJobRequest(job_id=job_id))).job
        assert job.state == js.JOB_STATE_SUCCEEDED, job.failure_reason
        model = (await clients.model_registry.GetModel(mr.GetModelRequest(model="hello-sft"))).model
        assert model.job_id == job_id
    finally:
        await clients.close()

    def complete(spans) -> bool:
        """The notifier handled job.succeeded, and every span of the trace has ended."""
        notified = [s for s in spans if s.name == f"{subjects.JOB_SUCCEEDED} process" and _service(s) == "notifier"
                    and s.attributes.get("tuneforge.job_id") == job_id]
        if not notified:
            return False
        in_trace = [s for s in spans if s.context.trace_id == notified[0].context.trace_id]
        ended = {s.context.span_id for s in in_trace}
        return all(s.parent is None or s.parent.span_id in ended for s in in_trace)

    spans = await _until(complete, exporter)
    assert len(smtp_server.messages) == 1 and smtp_server.messages[0]["X-Tuneforge-Job"] == job_id

    # The trace starts at the CreateJob RPC (the caller does not trace: it is the root).
    [create] = [s for s in spans if s.name == CREATE_JOB and s.attributes.get("tuneforge.job_id") == job_id]
    assert create.kind == SpanKind.SERVER and create.parent is None and _service(create) == "job-scheduler"
    trace_id = create.context.trace_id

    # Every span about the job, in every service, is in that trace.
    about_job = [s for s in spans if s.attributes.get("tuneforge.job_id") == job_id]
    assert {s.context.trace_id for s in about_job} == {trace_id}
    in_trace = [s for s in spans if s.context.trace_id == trace_id]
    assert {_service(s) for s in in_trace} == set(SERVICES)

    def one(name: str, service: str, kind: SpanKind):
        found = [s for s in in_trace if s.name == name and _service(s) == service and s.kind == kind]
        assert found, f"no {kind.name} span {name!r} in {service}: {sorted({(s.name, _service(s)) for s in in_trace})}"
        return found[0]

    # The internal call: a client span in the job-scheduler, a server span in the dataset-builder.
    client = one(SUMMARIZE, "job-scheduler", SpanKind.CLIENT)
    server = one(SUMMARIZE, "dataset-builder", SpanKind.SERVER)
    assert client.parent.span_id == create.context.span_id and server.parent.span_id == client.context.span_id

    # The flow: dataset build, training, registration, email; each hop a producer → consumer pair.
    steps = [
        (subjects.DATASET_BUILD_REQUESTED, "job-scheduler", "dataset-builder"),
        (subjects.DATASET_BUILD_SUCCEEDED, "dataset-builder", "job-scheduler"),
        (subjects.work_subject("small"), "job-scheduler", "trainer"),  # the stand-in's trainer pool
        (subjects.TRAINING_RUN_PROGRESS, "trainer", "job-scheduler"),  # published from the training thread
        (subjects.TRAINING_RUN_SUCCEEDED, "trainer", "job-scheduler"),
        (subjects.MODEL_REGISTRATION_REQUESTED, "job-scheduler", "model-registry"),
        (subjects.MODEL_REGISTRATION_SUCCEEDED, "model-registry", "job-scheduler"),
        (subjects.JOB_SUCCEEDED, "job-scheduler", "notifier"),
    ]
    by_id = {s.context.span_id: s for s in in_trace}
    for subject, producer, consumer in steps:
        published = one(f"{subject} publish", producer, SpanKind.PRODUCER)
        handled = one(f"{subject} process", consumer, SpanKind.CONSUMER)
        parent = by_id.get(handled.parent.span_id)
        assert parent is not None and parent.kind == SpanKind.PRODUCER and parent.name == published.name, subject
    # Events queued in the outbox while handling an event are published later by the relay, yet
    # continue the trace of the handler that queued them.
    registration = one(f"{subjects.MODEL_REGISTRATION_REQUESTED} publish", "job-scheduler", SpanKind.PRODUCER)
    assert by_id[registration.parent.span_id].name == f"{subjects.TRAINING_RUN_SUCCEEDED} process"

    # Health checks (a supervisor polls them) make no spans; every RPC else does.
    assert not [s.name for s in spans if "grpc.health" in s.name]
    assert any(s.name.endswith("/ImportExamples") and _service(s) == "dataset-builder" for s in spans)

    # One tree: every span of the trace but the root has its parent in the trace.
    orphans = [s.name for s in in_trace if s is not create and (s.parent is None or s.parent.span_id not in by_id)]
    assert orphans == []


def test_tracing_off_by_default_adds_nothing():
    """No exporter configured: no interceptors, no tracer, no trace context stored with events."""
    defaults = Settings()
    assert (defaults.otel_exporter, defaults.log_format) == ("none", "text")
    assert telemetry.setup_tracing("notifier", defaults.otel_exporter) is False
    assert telemetry.server_interceptors("notifier") == [] and telemetry.client_interceptors() == []
    ctx = telemetry.service_context("notifier")
    assert ctx.run(telemetry.tracer) is None and ctx.run(telemetry.trace_carrier) is None
    with pytest.raises(ValueError, match="unknown span exporter"):
        telemetry.setup_tracing("notifier", "jaeger")


def test_exporters_by_setting(monkeypatch):
    """console and otlp each give the service a tracer, one server and four client interceptors."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1")
    with pytest.raises(ValueError):
        Settings(otel_exporter="jaeger")
    for kind in ("console", "otlp"):
        assert telemetry.setup_tracing("notifier", Settings(otel_exporter=kind).otel_exporter) is True
        try:
            assert len(telemetry.server_interceptors("notifier")) == 1
            ctx = telemetry.service_context("notifier")
            assert ctx.run(telemetry.tracer) is not None and len(ctx.run(telemetry.client_interceptors)) == 4
            assert telemetry.tracer() is None  # outside the service's context: not its tracer
        finally:
            telemetry.shutdown_tracing("notifier")
    assert not telemetry.tracing_enabled()


def test_json_log_lines():
    """The formatter alone: one line per record, the ids from the context, exc_info as text."""
    formatter = telemetry.JsonFormatter("trainer")

    def record(msg, exc_info=None):
        return logging.LogRecord("tuneforge.x", logging.ERROR, __file__, 1, msg, ("a\nb",), exc_info)

    plain = json.loads(formatter.format(record("value %s")))
    assert plain["message"] == "value a\nb" and plain["service"] == "trainer" and plain["level"] == "ERROR"
    assert plain["logger"] == "tuneforge.x" and plain["time"].endswith("+00:00")
    assert "job_id" not in plain and "trace_id" not in plain and "exc_info" not in plain
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        rec = record("failed %s", sys.exc_info())

    def in_job():
        telemetry.set_log_context(job_id="job_1", workspace_id="ws_1")
        return formatter.format(rec)

    line = telemetry.service_context("notifier").run(in_job)
    assert "\n" not in line
    out = json.loads(line)
    assert (out["service"], out["job_id"], out["workspace_id"]) == ("notifier", "job_1", "ws_1")
    assert out["exc_info"].startswith("Traceback") and "RuntimeError: boom" in out["exc_info"]


async def test_a_service_logs_json_with_job_workspace_and_trace(tmp_path):
    """`tuneforge serve notifier` with TUNEFORGE_LOG_FORMAT=json: a job event it cannot deliver
    (no SMTP server at that port) gives a warning as one JSON object per line, naming the job, the
    workspace and the trace the event came with; the console exporter prints its spans."""
    nats = NatsServerProcess(tmp_path / "nats").start()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "TUNEFORGE_DATA_DIR": str(tmp_path / "state"), "TUNEFORGE_NATS_URL": nats.url,
           "TUNEFORGE_NOTIFIER_PORT": str(free_port("127.0.0.1")),
           "TUNEFORGE_SMTP_HOST": "127.0.0.1", "TUNEFORGE_SMTP_PORT": str(free_port("127.0.0.1")),
           "TUNEFORGE_LOG_FORMAT": "json", "TUNEFORGE_OTEL_EXPORTER": "console"}
    stderr_path, stdout_path = tmp_path / "notifier.err", tmp_path / "notifier.out"
    with open(stderr_path, "wb") as err, open(stdout_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "serve", "notifier"],
                                stdout=out, stderr=err, env=env)
    bus = None
    try:
        deadline = time.monotonic() + 60
        while b"serving on" not in stderr_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, stderr_path.read_text()
            await asyncio.sleep(0.1)
        bus = await Bus.connect(nats.url, "test")
        trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
        event = ev.JobSucceeded(meta=bus.meta("ws_logs", "job_logs"), job_name="logs", owner_email="o@example.com",
                                dataset_only=True)
        await bus.js.publish(subjects.JOB_SUCCEEDED, event.SerializeToString(), headers={
            "Nats-Msg-Id": event.meta.event_id, "traceparent": f"00-{trace_id}-{parent_id}-01"})
        while b"job_logs" not in stderr_path.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, stderr_path.read_text()
            await asyncio.sleep(0.1)
    finally:
        if bus is not None:
            await bus.close()
        proc.terminate()
        proc.wait(timeout=20)
        nats.stop()
    lines = stderr_path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line one JSON object
    assert all({"time", "level", "logger", "message"} <= r.keys() for r in records)
    assert all(r.get("service") == "notifier" for r in records)
    [failed] = [r for r in records if r.get("job_id") == "job_logs"]
    assert failed["level"] == "WARNING" and "delivery" in failed["message"] and "failed" in failed["message"]
    assert failed["workspace_id"] == "ws_logs" and failed["trace_id"] == trace_id
    assert len(failed["span_id"]) == 16 and failed["span_id"] != parent_id
    # The console exporter (stdout) printed the consumer span, in the caller's trace.
    printed = stdout_path.read_text()
    assert f"{subjects.JOB_SUCCEEDED} process" in printed and f"0x{trace_id}" in printed
    assert '"service.name": "notifier"' in printed


async def test_an_outbox_table_from_before_gets_the_trace_column(tmp_path):
    """A state directory made before traces: its outbox table gains ``trace_context`` at start-up
    (the migrations adopt a database made before them)."""
    import sqlite3

    from tuneforge.core.db import Database

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE event_outbox (id INTEGER PRIMARY KEY, subject VARCHAR(128), payload BLOB, "
                     "created_at DATETIME)")
    db = Database(f"sqlite+aiosqlite:///{path}")
    try:
        await db.migrate("trainer")  # what start-up runs: the pre-migrations database is adopted
        await db.migrate("trainer")  # once only
    finally:
        await db.close()
    with sqlite3.connect(path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(event_outbox)")]
    assert columns == ["id", "subject", "payload", "created_at", "trace_context"]
