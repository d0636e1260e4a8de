"""The model-registry's own tables."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, LargeBinary, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tuneforge.core.db import UTCDateTime, utcnow


class Base(DeclarativeBase):
    pass


class ModelRow(Base):
    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("workspace_id", "name", name="uq_model_name"),
        UniqueConstraint("workspace_id", "job_id", name="uq_model_job"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    base_model: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str] = mapped_column(String(40))
    dataset: Mapped[bytes] = mapped_column(LargeBinary)
    metrics: Mapped[bytes] = mapped_column(LargeBinary)
    hyperparameters: Mapped[bytes] = mapped_column(LargeBinary)
    adapter_path: Mapped[str] = mapped_column(String(512))
    files: Mapped[str] = mapped_column(Text)  # JSON list of {path, size_bytes, sha256}
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class AssignmentRow(Base):
    """Which agent uses which model: a model serves any number of agents, an agent uses one model
    (the unique index on workspace and agent, which also settles two concurrent assignments of
    one agent: the second insert fails and is retried as a repeat)."""

    __tablename__ = "agent_assignments"
    # A unique *index*: migration 0001 builds it, and adopting a database made before migrations
    # (where an agent could use several models) dedupes first (model_registry/migrations).
    __table_args__ = (Index("uq_assignment_agent", "workspace_id", "agent_id", unique=True),)

    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
