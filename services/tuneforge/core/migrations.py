"""Schema migrations: one Alembic history per service, applied at start-up under a lock.

Each service that has a database keeps its history in ``tuneforge/<service_key>/migrations/``
(``versions/NNNN_*.py``, plain Alembic revision files; no ``env.py``: this module drives Alembic
programmatically) and its version in its own table, ``alembic_version_<service_key>``. Every
history holds the tables the service has: the shared ones (the workspace directory, the outbox;
their operations live in :mod:`tuneforge.core.shared_revisions`) and its own.

:func:`migrate` brings a database to head:

* an empty database: every revision from nothing;
* a database at some revision: the revisions after it;
* a database made before migrations existed (tables, no version table): it is *adopted* first: the
  baseline revision's operations run in a mode that creates what is missing (tables, columns with a
  server default or nullable, indexes; a hook per index may prepare the data, e.g. the
  model-registry's one-model-per-agent dedupe) and keeps what is there, then the baseline is
  stamped and the later revisions run.

Two replicas starting together migrate once: PostgreSQL takes ``pg_advisory_xact_lock`` (a stable
64-bit key from the version table's name) on the migrating connection, whose one transaction holds
all the DDL; SQLite takes an exclusive ``flock`` on ``<db file>.migrate.lock``. The second replica
then finds the database at head and does nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import logging
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, MetaData, inspect, text

from tuneforge.core.settings import service_key

try:
    import fcntl
except ImportError:  # pragma: no cover - not on POSIX: SQLite replicas are one process there
    fcntl = None

log = logging.getLogger(__name__)

SERVICES = ("dataset-builder", "job-scheduler", "model-registry", "notifier", "trainer")
BASELINE = "0001"  # the schema of the last release without migrations

# Alembic's ``op`` is a process-wide proxy: migrations of two databases in one process (services
# started together in one event loop) must not interleave. One lock per event loop.
_process_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def version_table(service: str) -> str:
    return f"alembic_version_{service_key(service)}"


def lock_key(service: str) -> int:
    """The PostgreSQL advisory lock key of a service's migrations: a stable signed 64-bit hash of
    its version table's name (Python's ``hash`` changes per process)."""
    return int.from_bytes(hashlib.blake2b(version_table(service).encode(), digest_size=8).digest(), "big", signed=True)


def history_package(service: str) -> str:
    if service not in SERVICES:
        raise ValueError(f"{service!r} has no migration history (known: {', '.join(SERVICES)})")
    return f"tuneforge.{service_key(service)}.migrations"


@functools.cache
def script_directory(service: str) -> ScriptDirectory:
    package = importlib.import_module(history_package(service))
    return ScriptDirectory(str(Path(package.__file__).parent))


def head(service: str) -> str:
    return script_directory(service).get_current_head()


def service_metadata(service: str) -> MetaData:
    """What the service's models say its database holds (shared tables included): the target a
    database at head must equal (:func:`schema_differences`)."""
    from tuneforge.core.outbox import OutboxBase
    from tuneforge.core.workspaces import DirectoryBase

    bases = [DirectoryBase, OutboxBase]
    if service != "trainer":  # the trainer has the shared tables only
        bases.append(importlib.import_module(f"tuneforge.{service_key(service)}.models").Base)
    merged = MetaData()
    for base in bases:
        for table in base.metadata.sorted_tables:
            table.to_metadata(merged)
    return merged


@dataclasses.dataclass(frozen=True)
class Migration:
    service: str
    before: str | None  # None: an empty database (or one adopted: see ``adopted``)
    after: str | None
    applied: tuple[str, ...]  # revisions run, in order
    adopted: bool  # a database made before migrations: brought to the baseline and stamped

    def describe(self) -> str:
        if not self.applied and not self.adopted:
            return f"{self.service}: database at {self.after}, nothing to migrate"
        adopted = f"adopted a database made before migrations (stamped {BASELINE}), " if self.adopted else ""
        start = BASELINE if self.adopted else (self.before or "an empty database")
        return f"{self.service}: {adopted}migrated {start} -> {self.after}" + (
            f" (applied {', '.join(self.applied)})" if self.applied else "")


async def migrate(db, service: str, target: str = "head") -> Migration:
    """Bring ``db`` (a :class:`tuneforge.core.db.Database`) to ``target`` of ``service``'s
    history, under the lock described in the module docstring. Returns what was done."""
    script_directory(service)  # an unknown service fails here, before any lock
    loop = asyncio.get_running_loop()
    process_lock = _process_locks.setdefault(loop, asyncio.Lock())
    async with process_lock, _file_lock(db.sqlite_path), db.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock_key(service)})
        result = await conn.run_sync(_migrate_sync, service, target)
    if result.applied or result.adopted:
        log.info("%s", result.describe())
    else:
        log.debug("%s", result.describe())
    return result


@contextlib.asynccontextmanager
async def _file_lock(sqlite_path: str | None):
    if sqlite_path is None or fcntl is None:
        yield
        return
    handle = open(f"{sqlite_path}.migrate.lock", "a+")  # noqa: SIM115 - closed below
    try:
        # Blocking, so in a thread: a replica in this process holding it must keep running.
        await asyncio.to_thread(fcntl.flock, handle.fileno(), fcntl.LOCK_EX)
        yield
    finally:
        handle.close()  # releases the lock


def _migrate_sync(conn, service: str, target: str) -> Migration:
    script = script_directory(service)
    table = version_table(service)
    before = MigrationContext.configure(conn, opts={"version_table": table}).get_current_revision()
    adopted = False
    if before is None and _has_pre_migration_tables(conn, service):
        _adopt(conn, service)
        adopted = True
    applied: list[str] = []

    def steps(heads, _context):
        return script._upgrade_revs(target, heads)

    def record(*, step, **_kw):
        applied.append(step.up_revision_id)

    context = MigrationContext.configure(conn, opts={
        "version_table": table, "script": script, "fn": steps, "on_version_apply": (record,),
    })
    with Operations.context(context):
        context.run_migrations()
    return Migration(service=service, before=before, after=context.get_current_revision(),
                     applied=tuple(applied), adopted=adopted)


# -- databases made before migrations -------------------------------------------------------------

def _has_pre_migration_tables(conn, service: str) -> bool:
    """Tables of the service (its models' names) in a database without a version table."""
    return bool(set(service_metadata(service).tables) & set(inspect(conn).get_table_names()))


def _adopt(conn, service: str) -> None:
    package = importlib.import_module(history_package(service))
    hooks: dict[str, Callable] = getattr(package, "BEFORE_ADOPTING_INDEX", {})
    script = script_directory(service)
    context = MigrationContext.configure(conn, opts={"version_table": version_table(service)})
    ops = _AdoptingOperations(context, hooks)
    ops._install_proxy()
    try:
        script.get_revision(BASELINE).module.upgrade()
    finally:
        ops._remove_proxy()
    context.stamp(script, BASELINE)


class _AdoptingOperations(Operations):
    """The baseline's operations on a database an older release made with ``create_all``: a table
    that exists gains the columns it lacks (each must be nullable or have a server default, as the
    releases before migrations required), an index that is missing is built (after its hook, if
    any, prepared the data), everything present is kept."""

    def __init__(self, context: MigrationContext, before_index: dict[str, Callable]):
        super().__init__(context)
        self._before_index = before_index

    @property
    def _conn(self):
        return self.migration_context.connection

    def create_table(self, table_name, *elements, **kw):
        insp = inspect(self._conn)
        if not insp.has_table(table_name):
            log.info("adopting: creating table %s", table_name)
            return super().create_table(table_name, *elements, **kw)
        have = {c["name"] for c in insp.get_columns(table_name)}
        for column in elements:
            if not isinstance(column, Column) or column.name in have:
                continue
            if not column.nullable and column.server_default is None:
                raise RuntimeError(f"{table_name}.{column.name} is missing, NOT NULL and has no server default: "
                                   "this database cannot be adopted")
            log.info("adopting: adding column %s.%s", table_name, column.name)
            self.add_column(table_name, column)
        return None

    def create_index(self, index_name, table_name, columns, **kw):
        with warnings.catch_warnings():  # SQLite skips expression indexes in reflection: if_not_exists covers them
            warnings.simplefilter("ignore")
            have = {i["name"] for i in inspect(self._conn).get_indexes(table_name)}
        if index_name in have:
            return None
        hook = self._before_index.get(str(index_name))
        if hook is not None:
            hook(self._conn)
        return super().create_index(index_name, table_name, columns, if_not_exists=True, **kw)


# Alembic keys the modules its ``op`` proxy serves by class: a subclass serves the same ``op``.
Operations._setups[_AdoptingOperations] = Operations._setups[Operations]


# -- checks --------------------------------------------------------------------------------------

def schema_differences(conn, service: str) -> list:
    """Alembic's ``compare_metadata`` between the live database (a sync connection) and the
    service's models (types and server defaults included): empty when the migrations create
    exactly what the models describe. SQLite reflects an expression index (``created_at DESC``)
    as plain columns: there such an index is compared by its CREATE INDEX statement instead."""
    from alembic.autogenerate import compare_metadata
    from sqlalchemy.schema import CreateIndex

    metadata = service_metadata(service)
    sqlite = conn.dialect.name == "sqlite"
    context = MigrationContext.configure(conn, opts={
        "version_table": version_table(service), "compare_type": True,
        "compare_server_default": _compare_server_default, "include_object": comparable(conn.dialect.name),
    })
    quiet = logging.getLogger("alembic.ddl.impl")  # "approximate signature" of those indexes
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*expression-based index.*")
            differences = list(compare_metadata(context, metadata))
    finally:
        quiet.setLevel(level)
    if sqlite:
        stored = dict(conn.exec_driver_sql("SELECT name, sql FROM sqlite_master WHERE type = 'index'").all())
        for table in metadata.sorted_tables:
            for index in table.indexes:
                if _is_expression_index(index):
                    want = " ".join(str(CreateIndex(index).compile(dialect=conn.dialect)).split())
                    have = " ".join((stored.get(index.name) or "").split())
                    if have != want:
                        differences.append(("index_sql_differs", index.name, have, want))
    return differences


def comparable(dialect_name: str) -> Callable:
    """Alembic's ``include_object`` for comparisons: on SQLite, leaves out expression indexes
    (reflected there as plain columns, they would always differ)."""
    def include_object(obj, _name, type_, reflected, compare_to):
        if dialect_name == "sqlite" and type_ == "index":
            index = compare_to if reflected and compare_to is not None else obj
            return not _is_expression_index(index)
        return True

    return include_object


def _is_expression_index(index) -> bool:
    return any(not isinstance(e, Column) for e in index.expressions)


def _compare_server_default(context, _inspected_column, _metadata_column, inspected_default, _metadata_default,
                            rendered_metadata_default):
    """Alembic's SQLite comparison reads an empty string default (``''``) as different from
    itself: decide the empty-string cases there, leave the rest to Alembic (None)."""
    def bare(value):
        if value is None:
            return None
        value = value.strip()
        while value.startswith("(") and value.endswith(")"):
            value = value[1:-1].strip()
        return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == "'" else value

    if context.dialect.name != "sqlite":
        return None
    have, want = bare(inspected_default), bare(rendered_metadata_default)
    if have == "" or want == "":
        return have != want
    return None
