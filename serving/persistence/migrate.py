"""Schema migrations of the results database: ``upgrade`` to head, ``current``, and the start-up check.

Every process that opens the database (service, CLI, batch) calls ``ensure_schema`` first: an
up-to-date database costs one read; an older one is upgraded in one transaction (ADR 0017 says
why at start and not only by hand); one newer than this code is refused with
``ResultsSchemaError``. ``dxassist db upgrade|current`` does the same by hand (for an operator
who backs up first).

Concurrency: the whole upgrade runs in one transaction that first takes the database's write lock
(``BEGIN IMMEDIATE`` on SQLite, ``pg_advisory_xact_lock`` on PostgreSQL), and Alembic reads the
current revision only after that, so replicas starting together migrate once and the others
find the work done. PostgreSQL's DDL is transactional, so is SQLite's: a failed revision leaves
the database as it was.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, exc, inspect

from models.errors import ResultsSchemaError
from serving.persistence.database import Database

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
#: any constant: the PostgreSQL advisory lock that serialises migrations of one database
_LOCK_ID = 0x64786173  # "dxas"
_LEGACY_TABLES = {"screenings", "jobs", "evidence", "deliveries", "delivery_audit"}


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


@functools.cache
def _script() -> ScriptDirectory:
    """The shipped revisions (read once per process: they do not change under it)."""
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = _script().get_current_head()
    assert head is not None
    return head


@functools.cache
def _known_revisions() -> frozenset[str]:
    return frozenset(s.revision for s in _script().walk_revisions())


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


@dataclass(frozen=True)
class SchemaState:
    current: str | None
    head: str
    legacy: bool  # tables of the pre-migration code, no ``alembic_version``
    newer: bool = False  # a revision this code does not know: written by a newer dxassist

    @property
    def up_to_date(self) -> bool:
        return self.current == self.head


def state(db: Database) -> SchemaState:
    """Where the database stands (one read)."""
    with db.read() as conn:
        current = _current(conn)
        legacy = current is None and bool(_LEGACY_TABLES & set(inspect(conn).get_table_names()))
    return SchemaState(current, head_revision(), legacy, current is not None and current not in _known_revisions())


def upgrade(db: Database, revision: str = "head") -> SchemaState:
    """Apply every pending revision up to ``revision`` in one locked transaction; the new state."""
    config = alembic_config()
    try:
        with db.engine.connect() as conn:
            conn.execution_options(dxassist_write=True)  # SQLite: BEGIN IMMEDIATE (the write lock)
            with conn.begin():
                if db.dialect == "postgresql":
                    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_LOCK_ID})")
                current = _current(conn)
                if current is not None and current not in _known_revisions():
                    raise ResultsSchemaError(
                        f"results database schema is at revision {current}, newer than this dxassist knows "
                        f"(head {head_revision()}): run a dxassist at least as new as the one that upgraded it"
                    )
                if current is None and _LEGACY_TABLES & set(inspect(conn).get_table_names()):
                    logger.info("adopting a results database created before migrations as revision 0001")
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
    except exc.SQLAlchemyError as error:
        raise db.typed(error) from error
    after = state(db)
    logger.info("results database schema at revision %s", after.current)
    return after


def ensure_schema(db: Database) -> None:
    """At start: nothing when at head, else upgrade (or ``ResultsSchemaError`` if newer than head)."""
    if not state(db).up_to_date:
        upgrade(db)


def open_migrated(target: Path | str) -> Database:
    """The results database at ``target``, its schema brought to head (every store opens it so);
    the connection is closed again when that fails."""
    db = Database(target)
    try:
        ensure_schema(db)
    except BaseException:
        db.close()
        raise
    return db
