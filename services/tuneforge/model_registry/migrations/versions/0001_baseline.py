"""Baseline: the model-registry's schema as the last release before migrations made it.

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
        "models",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("workspace_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("base_model", sa.String(length=64), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("dataset", sa.LargeBinary(), nullable=False),
        sa.Column("metrics", sa.LargeBinary(), nullable=False),
        sa.Column("hyperparameters", sa.LargeBinary(), nullable=False),
        sa.Column("adapter_path", sa.String(length=512), nullable=False),
        sa.Column("files", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("workspace_id", "job_id", name="uq_model_job"),
        sa.UniqueConstraint("workspace_id", "name", name="uq_model_name"),
    )
    op.create_index(op.f("ix_models_workspace_id"), "models", ["workspace_id"], unique=False)
    op.create_table(
        "agent_assignments",
        sa.Column("model_id", sa.String(length=40), nullable=False),
        sa.Column("agent_id", sa.String(length=128), nullable=False),
        sa.Column("workspace_id", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_id"], ["models.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("model_id", "agent_id"),
    )
    op.create_index(op.f("ix_agent_assignments_workspace_id"), "agent_assignments", ["workspace_id"], unique=False)
    # One model per agent. Adopting a database of a release where an agent could use several
    # models: the package's BEFORE_ADOPTING_INDEX hook keeps each agent's newest first.
    op.create_index("uq_assignment_agent", "agent_assignments", ["workspace_id", "agent_id"], unique=True)


def downgrade() -> None:
    op.drop_table("agent_assignments")
    op.drop_table("models")
    drop_shared_tables_0001()
