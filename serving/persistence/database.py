"""The results database: SQLite by default, PostgreSQL when ``results.url`` is configured.

The stores (``ResultsStore``, ``Outbox``) write one portable SQL dialect: ``?`` placeholders,
``INSERT ... RETURNING id``, ISO-8601 text timestamps compared as text. This module maps the
few differences (placeholders, identity columns, binary columns, how a write transaction
starts) so the same statements run on both.

SQLite runs in WAL mode with ``synchronous=FULL``: a committed result survives a power cut.
PostgreSQL is for sites that run several service replicas or hosts against one outbox: the
outbox claims rows with ``FOR UPDATE SKIP LOCKED`` there, so two workers never send the same
delivery at once. Connection errors become ``ResultsDatabaseError`` (the DSN, which may carry
a password, is never put in a message); a broken PostgreSQL connection is reopened on next use.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from models.errors import ResultsDatabaseError

Dialect = Literal["sqlite", "postgresql"]
Params = Sequence[Any]


def is_postgres_url(target: str | Path) -> bool:
    return isinstance(target, str) and target.startswith(("postgresql://", "postgres://"))


class Database:
    """One connection, serialised by a lock (the stores are small and write rarely)."""

    def __init__(self, target: str | Path) -> None:
        self.target = target
        self.dialect: Dialect = "postgresql" if is_postgres_url(target) else "sqlite"
        self.lock = threading.RLock()
        self._conn: Any = None
        self._connect()

    # -- connection ------------------------------------------------------------------------

    def _connect(self) -> None:
        if self.dialect == "sqlite":
            path = Path(self.target)
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=5000")
            self._conn = conn
            return
        import psycopg  # optional dependency: only sites that configure PostgreSQL need it

        try:
            self._conn = psycopg.connect(str(self.target), autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise ResultsDatabaseError(f"PostgreSQL results database unreachable ({type(exc).__name__})") from exc

    def _live(self) -> Any:
        if self.dialect == "postgresql" and (self._conn is None or self._conn.closed or self._conn.broken):
            self._connect()
        return self._conn

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.dialect == "postgresql" else sql

    # -- statements ------------------------------------------------------------------------

    def execute(self, sql: str, params: Params = ()) -> Any:
        """Run one statement; returns the cursor (``fetchone``/``fetchall``/``rowcount``)."""
        with self.lock:
            return self._run(self._live(), sql, params)

    def _run(self, conn: Any, sql: str, params: Params) -> Any:
        if self.dialect == "sqlite":
            return conn.execute(sql, tuple(params))
        import psycopg

        try:
            return conn.execute(self._sql(sql), tuple(params))
        except psycopg.OperationalError as exc:
            raise ResultsDatabaseError(f"PostgreSQL results database failed ({type(exc).__name__})") from exc

    def insert(self, sql: str, params: Params = ()) -> int:
        """An ``INSERT`` (without RETURNING); returns the new row's id."""
        row = self.execute(sql + " RETURNING id", params).fetchone()
        return int(row[0])

    @contextmanager
    def transaction(self) -> Iterator[Database]:
        """A write transaction, held under the lock; commits on success, rolls back on error.

        SQLite takes the write lock up front (``BEGIN IMMEDIATE``) so two processes sharing the
        file serialise instead of failing at commit."""
        with self.lock:
            conn = self._live()
            if self.dialect == "sqlite":
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield self
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
                return
            import psycopg

            try:
                with conn.transaction():
                    yield self
            except psycopg.OperationalError as exc:
                raise ResultsDatabaseError(f"PostgreSQL transaction failed ({type(exc).__name__})") from exc

    def create_schema(self, ddl: str) -> None:
        """Run ``CREATE ... IF NOT EXISTS`` statements written with ``{id}`` and ``{blob}``."""
        if self.dialect == "sqlite":
            text = ddl.format(id="INTEGER PRIMARY KEY AUTOINCREMENT", blob="BLOB")
        else:
            text = ddl.format(id="BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", blob="BYTEA")
        with self.lock:
            conn = self._live()
            for statement in (s.strip() for s in text.split(";")):
                if statement:
                    conn.execute(statement)

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                self._conn.close()
