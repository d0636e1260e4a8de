"""Trainer pools: jobs.pool, jobs.state_reason, trainer_workers.pools, .device_memory_bytes.

The pool a job is routed to and why it waits; the pools and device memory of each trainer
worker. A job queued or training when the upgrade runs was routed by the previous
release (the bare work subject, no pool): its pool reads "legacy".

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

QUEUED, TRAINING = 3, 4  # job_scheduler.v1.JobState, frozen here


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("pool", sa.String(length=64), server_default="", nullable=False))
        batch.add_column(sa.Column("state_reason", sa.Text(), server_default="", nullable=False))
    with op.batch_alter_table("trainer_workers") as batch:
        batch.add_column(sa.Column("pools", sa.String(length=512), server_default="", nullable=False))
        batch.add_column(sa.Column("device_memory_bytes", sa.BigInteger(), server_default="0", nullable=False))
    jobs = sa.table("jobs", sa.column("pool", sa.String), sa.column("state", sa.Integer))
    op.execute(jobs.update().where(jobs.c.state.in_([QUEUED, TRAINING])).values(pool="legacy"))


def downgrade() -> None:
    with op.batch_alter_table("trainer_workers") as batch:
        batch.drop_column("device_memory_bytes")
        batch.drop_column("pools")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("state_reason")
        batch.drop_column("pool")
