"""The notifier's migration history (Alembic revisions in ``versions/``; driven by
tuneforge.core.migrations, no env.py). Add a revision with ``scripts/new_migration.py``."""
