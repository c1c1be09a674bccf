"""Engines for the results database: SQLite by default, PostgreSQL when ``results.url`` is set.

The stores (``ResultsStore``, ``Outbox``) write SQLAlchemy Core statements against the tables of
``serving.persistence.schema``; SQLAlchemy renders them for each database. The schema itself is
made only by the Alembic migrations (``serving.persistence.migrate``).

SQLite runs in WAL mode (readers never block the writer) with ``synchronous=FULL``: a committed
result, the clinical record of what the AI said, survives a power cut, not only a process crash
(``NORMAL`` in WAL mode may lose the last commits on power loss). Write transactions start with
``BEGIN IMMEDIATE`` so two processes sharing the file (service, CLI, batch) queue for the write lock
instead of failing at commit; ``busy_timeout`` bounds the wait. PostgreSQL (psycopg 3) is for sites
that run several replicas or hosts against one database; broken connections are replaced on next
use (``pool_pre_ping``).

Errors leave this module as ``ResultsDatabaseError`` subclasses whose messages name only the
exception type: SQLAlchemy's own messages quote statements, parameters (UIDs) and the DSN
(a password). Engines are built with ``hide_parameters`` for the same reason.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Connection, Engine, create_engine, event, exc
from sqlalchemy.engine import URL, make_url

from models.errors import ResultsConflict, ResultsDatabaseError

Dialect = Literal["sqlite", "postgresql"]

_WRITE = "dxassist_write"


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


def database_url(target: str | Path) -> URL:
    """The SQLAlchemy URL of a SQLite file path or a ``postgresql://`` URL (psycopg 3 driver)."""
    if is_postgres_url(target):
        url = make_url(str(target))
        return url.set(drivername="postgresql+psycopg")
    return URL.create("sqlite+pysqlite", database=str(target))


_BUSY_TIMEOUT_S = 10.0


def _enter_wal(cursor: Any) -> None:
    """Switch the file to WAL (persistent: once per file). Changing the journal mode needs the file
    to itself and SQLite answers "database is locked" at once, without the busy handler, while
    another connection (a replica starting at the same moment) holds a lock: retry, bounded."""
    deadline = time.monotonic() + _BUSY_TIMEOUT_S
    while True:
        if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
            return
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # the driver's own implicit transactions are off: ``_sqlite_begin`` says BEGIN itself
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
    _enter_wal(cursor)
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


def _sqlite_begin(connection: Connection) -> None:
    writes = connection.get_execution_options().get(_WRITE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


def make_engine(target: str | Path) -> Engine:
    """An engine for ``target`` (a SQLite path, created with its folder, or a PostgreSQL URL)."""
    url = database_url(target)
    if url.get_backend_name() == "sqlite":
        Path(str(url.database)).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, hide_parameters=True, connect_args={"check_same_thread": False, "timeout": _BUSY_TIMEOUT_S}
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    try:
        import psycopg  # noqa: F401  # optional dependency: only sites that configure PostgreSQL need it
    except ImportError as error:
        raise ResultsDatabaseError("PostgreSQL results database needs the 'postgres' extra (psycopg)") from error
    return create_engine(
        url, hide_parameters=True, pool_pre_ping=True, pool_size=4, connect_args={"connect_timeout": 10}
    )


def _typed(error: exc.SQLAlchemyError, dialect: str) -> ResultsDatabaseError:
    """The typed error for a database failure; the message names only exception types."""
    where = "PostgreSQL results database" if dialect == "postgresql" else "results database"
    cause = type(getattr(error, "orig", None) or error).__name__
    if isinstance(error, exc.IntegrityError) or cause in ("RaiseException", "IntegrityError"):
        return ResultsConflict(f"{where} refused a write that breaks a constraint ({cause})")
    if isinstance(error, exc.OperationalError) and dialect == "postgresql":
        return ResultsDatabaseError(f"{where} unreachable or failed ({cause})")
    return ResultsDatabaseError(f"{where} failed ({cause})")


_writers: dict[str, threading.RLock] = {}
_writers_lock = threading.Lock()


def _writer_of(database: str) -> threading.RLock:
    """The one write lock of this process for a SQLite file."""
    key = str(Path(database).resolve())
    with _writers_lock:
        return _writers.setdefault(key, threading.RLock())


class Database:
    """An engine and the two ways to use it: ``read()`` and ``write()`` transactions."""

    def __init__(self, target: str | Path) -> None:
        self.target = target
        self.engine = make_engine(target)
        self.dialect: Dialect = "postgresql" if self.engine.dialect.name == "postgresql" else "sqlite"
        #: SQLite has one writer at a time; this process's writers of the file (every ``Database``
        #: on it: results, outbox, leases, orders) queue here, each woken the moment the last one
        #: commits, rather than in SQLite's busy handler, which sleeps 1 to 100 ms between tries
        #: (writers in other processes still meet it)
        self._writer = _writer_of(str(self.engine.url.database)) if self.dialect == "sqlite" else None

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction (a consistent snapshot on both databases)."""
        with self._transaction(write=False) as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction: commits on success, rolls back on any error (nothing half-written)."""
        with self._transaction(write=True) as conn:
            yield conn

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Connection]:
        if not write or self._writer is None:
            with self._connected(write=write) as conn:
                yield conn
            return
        # as long as SQLite itself would wait for the lock: a writer never waits without bound
        if not self._writer.acquire(timeout=_BUSY_TIMEOUT_S):
            raise ResultsDatabaseError("results database busy (writers of this process queued too long)")
        try:
            with self._connected(write=write) as conn:
                yield conn
        finally:
            self._writer.release()

    @contextmanager
    def _connected(self, *, write: bool) -> Iterator[Connection]:
        try:
            with self.engine.connect() as conn:
                if write:
                    conn.execution_options(**{_WRITE: True})
                with conn.begin():
                    yield conn
        except exc.SQLAlchemyError as error:
            raise _typed(error, self.dialect) from error

    def typed(self, error: exc.SQLAlchemyError) -> ResultsDatabaseError:
        """The typed error for a failure outside ``read``/``write`` (migrations)."""
        return _typed(error, self.dialect)

    def close(self) -> None:
        self.engine.dispose()
