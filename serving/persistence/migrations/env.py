"""Alembic environment: migrates the connection that ``serving.persistence.migrate`` hands over.

That connection is already inside a transaction (``BEGIN IMMEDIATE`` on SQLite, an advisory lock
held on PostgreSQL), so every pending revision commits or rolls back together and two processes
starting at once never migrate the same database twice.
"""

from __future__ import annotations

from alembic import context

from serving.persistence.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `dxassist db upgrade` (serving.persistence.migrate)")

context.configure(connection=connection, target_metadata=metadata, transactional_ddl=True)
with context.begin_transaction():
    context.run_migrations()
