"""Model lifecycle: the active version per model (switched by promote/rollback), the append-only
audit of those switches (who, when, why), shadow versions added at run time, and shadow results
(stored beside, never in, the screenings table: nothing in the outbox can point at them).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "model_active_versions",
        sa.Column("model_id", sa.Text, primary_key=True),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Text, nullable=False),
        sa.Column("event_id", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "model_version_events",
        sa.Column("id", big_id, sa.Identity(), primary_key=True),
        sa.Column("at", sa.Text, nullable=False),
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("from_version", sa.Text, nullable=False, server_default=sa.text("''")),
        sa.Column("to_version", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("model_version_events_model", "model_version_events", ["model_id", "id"])
    op.create_table(
        "model_shadow_versions",
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("added_at", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("model_id", "version", name="model_shadow_versions_pkey"),
    )
    op.create_table(
        "shadow_results",
        sa.Column("id", big_id, sa.Identity(), primary_key=True),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("model_id", sa.Text, nullable=False),
        sa.Column("shadow_version", sa.Text, nullable=False),
        sa.Column("active_version", sa.Text, nullable=False),
        sa.Column("study_instance_uid", sa.Text, nullable=False),
        sa.Column("study_ref", sa.Text, nullable=False),
        sa.Column("result_json", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("shadow_results_version", "shadow_results", ["model_id", "shadow_version", "id"])


def downgrade() -> None:
    raise NotImplementedError("forward-only: restore the backup taken before the upgrade")
