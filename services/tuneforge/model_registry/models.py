"""The model-registry's own tables."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, LargeBinary, String, Text, UniqueConstraint
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
    __tablename__ = "agent_assignments"

    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
