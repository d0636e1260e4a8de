"""The dataset-builder's own tables."""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ForeignKey, Index, Integer, LargeBinary, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tuneforge.core.db import UTCDateTime, utcnow


class Base(DeclarativeBase):
    pass


class ExampleRow(Base):
    __tablename__ = "examples"
    __table_args__ = (UniqueConstraint("workspace_id", "content_hash", name="uq_example_hash"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(String(64), index=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(16))
    body: Mapped[str] = mapped_column(Text)  # canonical JSON
    source_name: Mapped[str] = mapped_column(String(256), default="")
    source_line: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)


class ExampleTopicRow(Base):
    __tablename__ = "example_topics"

    example_id: Mapped[str] = mapped_column(ForeignKey("examples.id", ondelete="CASCADE"), primary_key=True)
    topic: Mapped[str] = mapped_column(String(100), primary_key=True, index=True)
    workspace_id: Mapped[str] = mapped_column(String(64), index=True)


class TokenCountRow(Base):
    """Tokens of an example under one tokenizer + chat template (``TokenCounter.key``), so that
    rebuilding a dataset does not count the same examples again."""

    __tablename__ = "token_counts"

    workspace_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tokenizer_key: Mapped[str] = mapped_column(String(64), primary_key=True)
    content_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    tokens: Mapped[int] = mapped_column(Integer)


class DatasetRow(Base):
    __tablename__ = "datasets"
    # ListDatasets: a workspace's snapshots newest first without a sort.
    __table_args__ = (Index("ix_datasets_workspace_created", "workspace_id", text("created_at DESC"), "id"),)

    # Content-addressed: two workspaces with the same data and settings get the same id.
    workspace_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    summary: Mapped[bytes] = mapped_column(LargeBinary)  # common.v1.DatasetSummary
    files: Mapped[str] = mapped_column(Text)  # JSON list of {path, size_bytes, sha256}
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime, default=utcnow)
