"""The model-registry's own tables."""

from __future__ import annotations

import datetime as dt
import logging

from sqlalchemy import (
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    event,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tuneforge.core.db import UTCDateTime, utcnow

log = logging.getLogger(__name__)


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
    # A unique *index*, not a UniqueConstraint: Database.create_all adds indexes that are missing
    # to tables that exist already, so a database of the previous version gains it at start.
    __table_args__ = (Index("uq_assignment_agent", "workspace_id", "agent_id", unique=True),)

    model_id: Mapped[str] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    agent_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


ONE_MODEL_PER_AGENT = next(i for i in AssignmentRow.__table__.indexes if i.name == "uq_assignment_agent")


@event.listens_for(ONE_MODEL_PER_AGENT, "before_create")
def _keep_one_model_per_agent(_index, connection, **_kw) -> None:
    """Before the unique index is built on a table of the previous version (where an agent could
    use several models), keep each agent's newest assignment only, else CREATE UNIQUE INDEX fails
    and the service cannot start. On a new table there is nothing to remove. Runs in
    Database.create_all's transaction, with the CREATE INDEX: a crash leaves both or neither."""
    newer = (
        "EXISTS (SELECT 1 FROM agent_assignments AS newer"
        " WHERE newer.workspace_id = agent_assignments.workspace_id"
        " AND newer.agent_id = agent_assignments.agent_id"
        " AND (newer.created_at > agent_assignments.created_at"
        " OR (newer.created_at = agent_assignments.created_at AND newer.model_id > agent_assignments.model_id)))"
    )
    dropped = connection.execute(
        text(f"SELECT workspace_id, agent_id, model_id FROM agent_assignments WHERE {newer}")
    ).all()
    if not dropped:
        return
    connection.execute(text(f"DELETE FROM agent_assignments WHERE {newer}"))
    log.warning(
        "one model per agent from now on: removed %d older assignment(s) of agents that used several "
        "models, keeping each agent's newest: %s", len(dropped),
        ", ".join(f"{ws}/{agent} no longer uses {model}" for ws, agent, model in dropped[:50]),
    )
