"""One SQLAlchemy database per service: a SQLite file by default, PostgreSQL by URL."""

from __future__ import annotations

import datetime as dt
import logging
import sqlite3
from collections.abc import Sequence

from sqlalchemy import DateTime, Table, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.types import TypeDecorator

log = logging.getLogger(__name__)

# A fast read that finds SQLite busy this long gives up and goes through a session instead: it
# runs on the event loop, which must not stall.
FAST_READ_BUSY_SECONDS = 0.05


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=dt.timezone.utc)
        return value


class Database:
    """An async engine and session factory for one service's own database."""

    def __init__(self, url: str, *, echo: bool = False):
        self.url = url
        kwargs: dict = {"echo": echo}
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"timeout": 30}
        else:
            kwargs.update(pool_pre_ping=True, pool_size=5, max_overflow=10)
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if url.startswith("sqlite"):
            @event.listens_for(self.engine.sync_engine, "connect")
            def _sqlite_pragmas(dbapi_conn, _record):  # noqa: ANN001
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        self.session: async_sessionmaker[AsyncSession] = async_sessionmaker(self.engine, expire_on_commit=False)
        database = make_url(url).database if url.startswith("sqlite") else None
        self.sqlite_path: str | None = database if database and database != ":memory:" else None
        self._reader: sqlite3.Connection | None = None

    async def migrate(self, service: str, target: str = "head"):
        """Bring this database to ``target`` of ``service``'s migration history (Alembic, one
        history per service, under a lock so that replicas starting together migrate once; a
        database made before migrations is adopted first): see tuneforge.core.migrations.
        Returns a ``migrations.Migration`` saying what was applied."""
        from tuneforge.core import migrations

        return await migrations.migrate(self, service, target)

    async def create_all(self, *bases: type[DeclarativeBase]) -> None:
        """Create the tables of ``bases`` that do not exist (SQLAlchemy's ``create_all``): for tests
        and scratch databases. A service's database is made and upgraded by :meth:`migrate`."""
        async with self.engine.begin() as conn:
            for base in bases:
                await conn.run_sync(base.metadata.create_all)

    def fast_read(self, reader: "TableReader", where: str, params: Sequence = ()) -> list | None:
        """Rows of ``reader``'s table matching the SQL ``where`` clause (``?`` parameters), read on
        the calling thread with the standard ``sqlite3`` module: no thread hop, no session, no ORM.
        For short reads on a hot path (a point look-up, a page). Each SELECT runs in autocommit and
        sees the latest commit of every process (WAL). Returns None when there is no fast path (not
        SQLite) or SQLite stays busy for ``FAST_READ_BUSY_SECONDS``: the caller reads through a
        session then. Call it from one thread only (the service's event loop)."""
        if self.sqlite_path is None:
            return None
        try:
            if self._reader is None:
                conn = sqlite3.connect(self.sqlite_path, timeout=FAST_READ_BUSY_SECONDS, isolation_level=None)
                conn.execute("PRAGMA query_only=ON")
                self._reader = conn
            rows = self._reader.execute(f"{reader.select} WHERE {where}", params).fetchall()
        except sqlite3.OperationalError as exc:  # busy, or the schema is not there yet
            log.debug("fast read of %s fell back to a session: %s", reader.table.name, exc)
            return None
        return [reader.convert(row) for row in rows]

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        await self.engine.dispose()


class TableReader:
    """A table's SELECT for :meth:`Database.fast_read`; rows come back as attribute objects with
    the values the ORM would give (the columns' own result processors for the SQLite dialect).
    A value is converted when first read: a hot path that reads two columns of a row (an id and a
    version, to find a cached message) pays for those two only."""

    def __init__(self, table: Table):
        from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite

        dialect = SQLiteDialect_pysqlite()
        self.table = table
        self.columns = tuple(c.key for c in table.columns)
        self.select = f"SELECT {', '.join(c.name for c in table.columns)} FROM {table.name}"
        self._processors = tuple((i, p) for i, c in enumerate(table.columns)
                                 if (p := c.type.dialect_impl(dialect).result_processor(dialect, None)) is not None)
        index = {key: i for i, key in enumerate(self.columns)}
        processors = dict(self._processors)
        columns = self.columns

        class Row:
            __slots__ = ("_raw", "__dict__")

            def __init__(self, raw: tuple):
                self._raw = raw

            def __getattr__(self, name: str):  # a column not read yet (read ones are in __dict__)
                i = index.get(name)
                if i is None:
                    raise AttributeError(f"{table.name} has no column {name!r}")
                value = self._raw[i]
                process = processors.get(i)
                if process is not None:
                    value = process(value)
                self.__dict__[name] = value
                return value

            def __eq__(self, other):
                if not isinstance(other, Row):
                    return NotImplemented
                return all(getattr(self, c) == getattr(other, c) for c in columns)

            __hash__ = None

            def __repr__(self) -> str:
                return f"{table.name}({', '.join(f'{c}={getattr(self, c)!r}' for c in columns)})"

        Row.__name__ = Row.__qualname__ = f"{type(self).__name__}Row"
        self._row = Row

    def convert(self, row: tuple):
        return self._row(row)
