"""The job-scheduler's own tables."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tuneforge.core.db import UTCDateTime, utcnow


class Base(DeclarativeBase):
    pass


class JobRow(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("workspace_id", "request_id", name="uq_jobs_request"),
        # ListJobs: a workspace's jobs newest first (ORDER BY created_at DESC, id) without a sort.
        Index("ix_jobs_workspace_created", "workspace_id", text("created_at DESC"), "id"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(64), index=True)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    name: Mapped[str] = mapped_column(String(64), index=True)
    spec: Mapped[bytes] = mapped_column(LargeBinary)  # JobSpec
    resolved_hyperparameters: Mapped[bytes] = mapped_column(LargeBinary)  # Hyperparameters
    state: Mapped[int] = mapped_column(Integer, index=True)
    failure_reason: Mapped[str] = mapped_column(Text, default="")
    failure_kind: Mapped[int] = mapped_column(Integer, default=0)
    dataset_only: Mapped[bool] = mapped_column(Boolean, default=False)
    dataset: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # DatasetSummary
    progress: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # TrainingProgress
    metrics: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # TrainingMetrics
    adapter_path: Mapped[str] = mapped_column(String(512), default="")
    # The run's report folder (loss.png, report.json), once training has run.
    report_path: Mapped[str] = mapped_column(String(512), default="", server_default="")
    # The trainer pool its training is routed to (set when queued; migration 0002 sizes old rows).
    pool: Mapped[str] = mapped_column(String(64), default="", server_default="")
    # Why the job is in its state, where there is more to say (QUEUED: no worker of its pool).
    state_reason: Mapped[str] = mapped_column(Text, default="", server_default="")
    model_name: Mapped[str] = mapped_column(String(64), default="")
    model_id: Mapped[str] = mapped_column(String(64), default="")
    notify_email: Mapped[str] = mapped_column(String(320))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    # Optimistic concurrency: an update of a row changed since it was read fails (StaleDataError)
    # and is retried on fresh state, on SQLite and PostgreSQL alike.
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    __mapper_args__ = {"version_id_col": version}


class JobEventRow(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "sequence", name="uq_job_events_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    sequence: Mapped[int] = mapped_column(Integer)
    time: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    state: Mapped[int] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text, default="")
    progress: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoint_step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    artifact_path: Mapped[str] = mapped_column(String(512))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class WorkspaceSecretRow(Base):
    """Authoritative workspace records (the directory tables hold the replicated view)."""

    __tablename__ = "workspace_sources"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    plan: Mapped[int] = mapped_column(Integer)
    owner_email: Mapped[str] = mapped_column(String(320))
    revision: Mapped[int] = mapped_column(Integer, default=1)
    api_key_hashes: Mapped[str] = mapped_column(Text, default="")  # comma-separated
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiKeyRecordRow(Base):
    """One API key of a workspace: what ListApiKeys shows (never the secret; the hash only to
    publish the workspace's active keys). ``workspace_sources.api_key_hashes`` is the active set
    as published; it is rewritten from these rows on every change."""

    __tablename__ = "api_key_records"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(ForeignKey("workspace_sources.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), default="")
    label: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime, nullable=True)


class TrainerWorkerRow(Base):
    """A trainer worker as last announced (``TrainerWorkerSeen``): the hardware a dry run
    estimates wall time for. A worker not seen for 3 of its periods counts as gone."""

    __tablename__ = "trainer_workers"

    worker_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    device_class: Mapped[str] = mapped_column(String(200))
    device_count: Mapped[int] = mapped_column(Integer, default=1)
    period_seconds: Mapped[int] = mapped_column(Integer, default=60)
    # The trainer pools it serves, comma-separated, and the memory of each of its devices.
    pools: Mapped[str] = mapped_column(String(512), default="", server_default="")
    device_memory_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    last_seen_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ThroughputRow(Base):
    """One measured training run (``TrainingRunSucceeded``): tokens per second of a base model
    on a device class. One row per job and attempt, so a redelivered event counts once."""

    __tablename__ = "training_throughput"
    __table_args__ = (
        UniqueConstraint("job_id", "attempt", name="uq_throughput_run"),
        Index("ix_throughput_model_device", "base_model", "device_class", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40))
    attempt: Mapped[int] = mapped_column(Integer)
    base_model: Mapped[str] = mapped_column(String(64))
    device_class: Mapped[str] = mapped_column(String(200))
    trained_tokens: Mapped[int] = mapped_column(Integer)
    train_seconds: Mapped[float] = mapped_column(Float)
    tokens_per_second: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
