"""Readers' feedback on findings: agree, disagree or uncertain, with a comment.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), sa.Identity(), primary_key=True),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("screening_id", sa.Text, nullable=False),
        sa.Column("finding_key", sa.Text, nullable=False),
        sa.Column("verdict", sa.Text, nullable=False),
        sa.Column("comment", sa.Text),
        sa.Column("reader_id", sa.Text, nullable=False),
        sa.CheckConstraint("verdict IN ('agree', 'disagree', 'uncertain')", name="feedback_verdict"),
        sqlite_autoincrement=True,
    )
    op.create_index("feedback_screening", "feedback", ["screening_id"])


def downgrade() -> None:
    raise NotImplementedError("forward-only: restore the backup taken before the upgrade")
