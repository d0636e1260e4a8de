"""The model-registry's migration history (Alembic revisions in ``versions/``; driven by
tuneforge.core.migrations, no env.py). Add a revision with ``scripts/new_migration.py``."""

from __future__ import annotations

import logging

from sqlalchemy import text

log = logging.getLogger(__name__)


def keep_one_model_per_agent(connection) -> None:
    """Before the unique index ``uq_assignment_agent`` is built on a table of a release where an
    agent could use several models, keep each agent's newest assignment only, else CREATE UNIQUE
    INDEX fails and the service cannot start. Runs in the migration's transaction, with the
    CREATE INDEX (on PostgreSQL a crash leaves both or neither)."""
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


# Adopting a database made before migrations (tuneforge.core.migrations): run before building a
# missing index of the baseline.
BEFORE_ADOPTING_INDEX = {"uq_assignment_agent": keep_one_model_per_agent}
