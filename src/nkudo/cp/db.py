"""Database access: one SQLAlchemy Core engine for SQLite or PostgreSQL, run off the event loop.

Why a thread pool around a synchronous engine instead of an async driver:
every request is *one* transaction function executed in a worker thread, so a
request costs one thread hop whatever number of statements it runs, the same
code serves both databases, and psycopg 3 / sqlite3 are used through their
mature synchronous paths. SQLite gets one worker (it has one writer anyway)
and ``BEGIN IMMEDIATE`` so that even several processes on one file serialise
writes instead of failing half-way; PostgreSQL gets a pool and row locks.
Single-statement reads that callers batch (the heartbeat's) take a cheaper autocommit path: ``select``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine, Row

from nkudo.log import get_logger

log = get_logger("cp.db")
T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_MIGRATE_LOCK = 0x6E6B75646F  # "nkudo": one migrator at a time across replicas
_RETRYABLE_PG = {"40001", "40P01"}  # serialization failure, deadlock


def normalise_url(url: str) -> str:
    """Accept ``postgresql://``/``postgres://`` and pin the psycopg 3 driver."""
    for prefix in ("postgresql://", "postgres://", "postgresql+psycopg2://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{data_dir / 'nkudo.db'}"


def redact_url(url: str) -> str:
    """The URL without its password, for logs."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable database url>"


class Database:
    """Engine + worker threads; ``await db.run(fn, *args)`` runs ``fn(conn, *args)`` in one transaction.

    ``await db.select(stmt, params)`` is the cheaper path for a read that is a single statement: it runs on
    a second, small engine whose connections are in autocommit mode. One statement reads one consistent
    snapshot on both databases, so the BEGIN/ROLLBACK (and, on PostgreSQL, the pre-ping) that ``run`` pays
    per call would buy nothing; a connection found dead is replaced and the statement retried once instead.
    It has its own thread so that such reads never queue behind write transactions (SQLite in WAL mode
    reads concurrently with its one writer); its callers batch their reads, so one thread is enough.
    """

    def __init__(self, url: str, *, pool_size: int = 8) -> None:
        self.url = normalise_url(url)
        self.engine: Engine
        self._reader: Engine
        if self.url.startswith("sqlite"):
            sqlite_args: dict[str, Any] = {"connect_args": {"check_same_thread": False, "timeout": 30},
                                           "max_overflow": 0, "poolclass": sa.pool.QueuePool}
            self.engine = sa.create_engine(self.url, pool_size=1, **sqlite_args)
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
            self._reader = sa.create_engine(self.url, pool_size=1, isolation_level="AUTOCOMMIT", **sqlite_args)
            event.listen(self._reader, "connect", _sqlite_on_connect)
            workers = 1
        else:
            self.engine = sa.create_engine(self.url, pool_size=pool_size, max_overflow=0, pool_pre_ping=True)
            self._reader = sa.create_engine(self.url, pool_size=1, max_overflow=0, isolation_level="AUTOCOMMIT")
            workers = pool_size
        self.dialect = self.engine.dialect.name
        self.is_pg = self.dialect == "postgresql"
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nkudo-db")
        self._read_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nkudo-db-read")

    def insert(self, table: sa.Table) -> Any:
        """Dialect insert supporting ``on_conflict_do_*`` (both dialects implement it)."""
        return (postgresql.insert if self.is_pg else sqlite.insert)(table)

    def tx(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(conn, *args)`` in a transaction, retrying transient lock/serialisation errors."""
        for attempt in range(5):
            try:
                with self.engine.begin() as conn:
                    return fn(conn, *args)
            except sa.exc.OperationalError as exc:
                if attempt == 4 or not self._retryable(exc):
                    raise
                time.sleep(0.01 * (attempt + 1))
        raise AssertionError("unreachable")

    def _retryable(self, exc: sa.exc.OperationalError) -> bool:
        if self.is_pg:
            return getattr(exc.orig, "sqlstate", None) in _RETRYABLE_PG
        return "locked" in str(exc.orig) or "busy" in str(exc.orig)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.tx, fn, *args)

    def select_now(self, stmt: sa.Executable, params: dict[str, Any]) -> list[Row[Any]]:
        """The rows of one read-only statement, in autocommit (see the class docstring)."""
        for attempt in range(2):
            try:
                with self._reader.connect() as conn:
                    return list(conn.execute(stmt, params))
            except sa.exc.DBAPIError as exc:
                if attempt or not exc.connection_invalidated:
                    raise
        raise AssertionError("unreachable")

    async def select(self, stmt: sa.Executable, params: dict[str, Any]) -> list[Row[Any]]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._read_pool, self.select_now, stmt, params)

    def migrate(self) -> str:
        """Upgrade the schema to the newest revision shipped in the package; returns it."""
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as conn:
            if self.is_pg:
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATE_LOCK})
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
            rev = MigrationContext.configure(conn).get_current_revision()
        log.info("database schema up to date", revision=rev, database=redact_url(self.url))
        return rev or ""

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def ping(self) -> bool:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._read_pool.shutdown(wait=True)
        self.engine.dispose()
        self._reader.dispose()


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Autocommit mode at the driver level; transactions are begun explicitly below.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_on_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")
