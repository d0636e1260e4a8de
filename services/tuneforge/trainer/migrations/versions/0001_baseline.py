"""Baseline: the trainer's schema (the shared tables) as the last release before migrations made it.

Revision ID: 0001
Revises:
"""

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


def downgrade() -> None:
    drop_shared_tables_0001()
