"""The trainer's migration history: its database holds the shared tables only (the workspace
directory its gRPC API authenticates with, the outbox). Alembic revisions in ``versions/``,
driven by tuneforge.core.migrations."""
