"""Settings from the environment (prefix ``TUNEFORGE_``), one model for every service."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SERVICES = ("dataset-builder", "job-scheduler", "trainer", "model-registry", "notifier")

DEFAULT_PORTS = {
    "dataset-builder": 50151,
    "job-scheduler": 50152,
    "trainer": 50153,
    "model-registry": 50154,
    "notifier": 50155,
}


def service_key(service: str) -> str:
    """``dataset-builder`` -> ``dataset_builder`` (used in env names and file names)."""
    return service.replace("-", "_")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore")

    data_dir: Path = Field(Path(".tuneforge"), description="State directory: databases, artifacts, outbox, logs.")
    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server with JetStream.")
    nats_stream_replicas: int = Field(
        1, ge=1, le=5,
        description="Replicas of tuneforge's JetStream streams: 1 on one server, 3 on a 3-node NATS cluster "
                    "(a stream survives the loss of a node). Existing streams are updated to it at start.")
    host: str = Field("127.0.0.1", description="Address the gRPC servers bind to.")

    dataset_builder_port: int = DEFAULT_PORTS["dataset-builder"]
    job_scheduler_port: int = DEFAULT_PORTS["job-scheduler"]
    trainer_port: int = DEFAULT_PORTS["trainer"]
    model_registry_port: int = DEFAULT_PORTS["model-registry"]
    notifier_port: int = DEFAULT_PORTS["notifier"]

    # One database per service; default: SQLite files under data_dir. A PostgreSQL URL
    # (postgresql+asyncpg://...) works too.
    dataset_builder_database_url: str | None = None
    job_scheduler_database_url: str | None = None
    trainer_database_url: str | None = None
    model_registry_database_url: str | None = None
    notifier_database_url: str | None = None

    artifact_url: str | None = Field(
        None, description="fsspec URL of the artifact store; default data_dir/artifacts. s3://bucket/prefix needs the "
        "s3 extra and takes its endpoint and credentials from AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL), "
        "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION (core/storage.py); the bucket must exist.")
    model_store: Path | None = Field(None, description="Directory of <catalog id>/ model folders; default data_dir/models.")

    admin_token: str | None = Field(None, description="Token that may create workspaces.")

    smtp_host: str | None = None
    smtp_port: int = 25
    smtp_username: str | None = None
    smtp_password: str | None = None
    smtp_starttls: bool = False
    smtp_use_tls: bool = False
    mail_from: str = "tuneforge <noreply@tuneforge.local>"
    outbox_dir: Path | None = Field(None, description="Where .eml files go without SMTP; default data_dir/outbox.")

    worker_id: str | None = Field(None, description="Trainer worker id; default host-pid.")
    trainer_pools: str | None = Field(
        None, description="Trainer pools this worker takes work from, comma-separated (small, gpu-24g, gpu-80g, "
        "gpu-4x80g, gpu-8x80g; core/pools.py); default: every pool its hardware holds (a CPU worker: small).")
    trainer_processes: int | Literal["auto"] = Field(
        "auto", description="Processes one training job runs as on this worker: auto (1 on a CPU; on GPUs the GPUs "
        "the job's pool needs, FSDP when that is more than one) or a number >= 1 (more than the model needs: "
        "data-parallel; on a CPU: DDP over gloo).")
    training_heartbeat_seconds: float = 5.0
    training_ack_wait_seconds: float = 60.0
    # The one bounded-redelivery rule of every event consumer (core.bus.RedeliveryPolicy): a
    # failing handler is retried with back-off base * 2^(n-1) s (capped), and dead-lettered when
    # it fails on delivery event_max_deliver.
    event_max_deliver: int = Field(5, ge=1, le=100, description="Deliveries of an event before it is dead-lettered.")
    event_retry_base_seconds: float = Field(0.5, ge=0, description="First redelivery back-off.")
    event_retry_max_seconds: float = Field(30.0, ge=0, description="Longest redelivery back-off.")
    event_ack_wait_seconds: float = Field(
        30.0, gt=0, description="An event held by a process that died is redelivered after this long.")
    max_message_bytes: int = 8 * 1024 * 1024
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = Field(
        "text", description="text: classic lines; json: one JSON object per line (service, job and workspace ids, trace).")
    otel_exporter: Literal["none", "console", "otlp"] = Field(
        "none", description="Where OpenTelemetry spans go: nowhere, stdout, or OTLP/gRPC at OTEL_EXPORTER_OTLP_ENDPOINT.")

    @field_validator("trainer_processes")
    @classmethod
    def _processes_at_least_one(cls, value: int | str) -> int | str:
        if value != "auto" and int(value) < 1:
            raise ValueError(f"TUNEFORGE_TRAINER_PROCESSES={value!r}: expected auto or a number >= 1")
        return value

    @field_validator("trainer_pools")
    @classmethod
    def _known_pools(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from tuneforge.core.pools import parse_pool_list

        return ",".join(parse_pool_list(value))  # ValueError: names the unknown pools and the known ones

    def port(self, service: str) -> int:
        return getattr(self, f"{service_key(service)}_port")

    def database_url(self, service: str) -> str:
        url = getattr(self, f"{service_key(service)}_database_url")
        if url:
            return url
        path = (self.data_dir / "db" / f"{service_key(service)}.sqlite").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite+aiosqlite:///{path}"

    def resolved_artifact_url(self) -> str:
        if self.artifact_url:
            return self.artifact_url
        path = (self.data_dir / "artifacts").resolve()
        path.mkdir(parents=True, exist_ok=True)
        return f"file://{path}"

    def resolved_model_store(self) -> Path:
        return (self.model_store or self.data_dir / "models").resolve()

    def resolved_outbox_dir(self) -> Path:
        return (self.outbox_dir or self.data_dir / "outbox").resolve()


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
