"""Baseline: the dataset-builder's schema as the last release before migrations made it.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from tuneforge.core.shared_revisions import (
    create_shared_tables_0001,
    drop_shared_tables_0001,
)

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_shared_tables_0001()
    op.create_table(
        "examples",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=64), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("source_name", sa.String(length=256), nullable=False),
        sa.Column("source_line", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("workspace_id", "content_hash", name="uq_example_hash"),
    )
    op.create_index(op.f("ix_examples_workspace_id"), "examples", ["workspace_id"], unique=False)
    op.create_table(
        "example_topics",
        sa.Column("example_id", sa.String(length=40), nullable=False),
        sa.Column("topic", sa.String(length=100), nullable=False),
        sa.Column("workspace_id", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["example_id"], ["examples.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("example_id", "topic"),
    )
    op.create_index(op.f("ix_example_topics_topic"), "example_topics", ["topic"], unique=False)
    op.create_index(op.f("ix_example_topics_workspace_id"), "example_topics", ["workspace_id"], unique=False)
    op.create_table(
        "token_counts",
        sa.Column("workspace_id", sa.String(length=64), nullable=False),
        sa.Column("tokenizer_key", sa.String(length=64), nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("tokens", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "tokenizer_key", "content_hash"),
    )
    op.create_table(
        "datasets",
        sa.Column("workspace_id", sa.String(length=64), nullable=False),
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("summary", sa.LargeBinary(), nullable=False),
        sa.Column("files", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("workspace_id", "id"),
    )
    op.create_index("ix_datasets_workspace_created", "datasets", ["workspace_id", sa.text("created_at DESC"), "id"],
                    unique=False)


def downgrade() -> None:
    for table in ("datasets", "token_counts", "example_topics", "examples"):
        op.drop_table(table)
    drop_shared_tables_0001()
