"""An append-only audit log: who read or wrote which screening, when.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01

Rows name the actor (token id or ``system``), the action, the screening id and the study ref
(a keyed hash), never a UID. Triggers refuse UPDATE and DELETE on both databases.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), sa.Identity(), primary_key=True),
        sa.Column("at", sa.Text, nullable=False),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("screening_id", sa.Text),
        sa.Column("study_ref", sa.Text),
        sqlite_autoincrement=True,
    )
    op.create_index("audit_log_screening", "audit_log", ["screening_id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log "
            "FOR EACH ROW EXECUTE FUNCTION dxassist_append_only()"
        )
    else:
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER audit_log_no_{event.lower()} BEFORE {event} ON audit_log "
                "BEGIN SELECT RAISE(ABORT, 'append-only table'); END"
            )


def downgrade() -> None:
    raise NotImplementedError("forward-only: restore the backup taken before the upgrade")
