"""The schema as the pre-migration code created it (``CREATE TABLE IF NOT EXISTS``).

Revision ID: 0001
Revises: -
Create Date: 2026-12-01

A database created by that code has these tables and no ``alembic_version``: this revision
adopts it, creating only what is missing (the outbox-only file a bare ``dxassist outbox status``
used to leave gets the other tables), so it is recognised as revision 0001 and upgraded from there.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _id() -> sa.Column[int]:
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), sa.Identity(), primary_key=True)


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    existing = set(inspector.get_table_names())

    def table(name: str, *columns: Any, autoincrement: bool = False) -> None:
        if name not in existing:
            op.create_table(name, *columns, sqlite_autoincrement=autoincrement)

    def index(name: str, table_name: str, columns: list[str]) -> None:
        if name not in {i["name"] for i in sa.inspect(op.get_bind()).get_indexes(table_name)}:
            op.create_index(name, table_name, columns)

    table(
        "screenings",
        _id(),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("study_instance_uid", sa.Text, nullable=False),
        sa.Column("study_ref", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("reason", sa.Text),
        sa.Column("priority", sa.Text),
        sa.Column("models", sa.Text, nullable=False),
        sa.Column("result_json", sa.Text, nullable=False),
        autoincrement=True,
    )
    index("screenings_study", "screenings", ["study_instance_uid"])
    index("screenings_ref", "screenings", ["study_ref"])
    table(
        "jobs",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Text, nullable=False),
        sa.Column("priority", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("study_instance_uid", sa.Text),
        sa.Column("spool_dir", sa.Text),
        sa.Column("screening_id", sa.Integer),
        sa.Column("error_reason", sa.Text),
        sa.Column("error_detail", sa.Text),
    )
    index("jobs_status", "jobs", ["status"])
    index("jobs_study", "jobs", ["study_instance_uid"])
    table(
        "evidence",
        sa.Column("screening_id", sa.Integer, nullable=False),
        sa.Column("header", sa.LargeBinary, nullable=False),
    )
    index("evidence_screening", "evidence", ["screening_id"])
    table(
        "deliveries",
        _id(),
        sa.Column("screening_id", sa.Integer, nullable=False),
        sa.Column("sink", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")),
        sa.Column("next_at", sa.Text, nullable=False),
        sa.Column("last_error", sa.Text),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Text, nullable=False),
        sa.UniqueConstraint("screening_id", "sink"),
        autoincrement=True,
    )
    index("deliveries_due", "deliveries", ["status", "next_at"])
    table(
        "delivery_audit",
        _id(),
        sa.Column("delivery_id", sa.Integer, nullable=False),
        sa.Column("sink", sa.Text, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("at", sa.Text, nullable=False),
        autoincrement=True,
    )


def downgrade() -> None:
    raise NotImplementedError("forward-only: restore the backup taken before the upgrade")
