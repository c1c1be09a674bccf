"""Inbound orders and their messages: orders (placer/filler/accession/Study UID, priority,
requested procedure, status) and the inbound messages stored before their ACK (dedupe by sender
and MSH-10).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    empty = sa.text("''")
    op.create_table(
        "orders",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), sa.Identity(), primary_key=True),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Text, nullable=False),
        sa.Column("order_key", sa.Text, nullable=False),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("placer_number", sa.Text, nullable=False, server_default=empty),
        sa.Column("filler_number", sa.Text, nullable=False, server_default=empty),
        sa.Column("accession_number", sa.Text, nullable=False, server_default=empty),
        sa.Column("study_instance_uid", sa.Text, nullable=False, server_default=empty),
        sa.Column("patient_id", sa.Text, nullable=False, server_default=empty),
        sa.Column("priority", sa.Text, nullable=False),
        sa.Column("priority_code", sa.Text, nullable=False, server_default=empty),
        sa.Column("procedure_code", sa.Text, nullable=False, server_default=empty),
        sa.Column("procedure_text", sa.Text, nullable=False, server_default=empty),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("message_id", sa.Text),
        sa.UniqueConstraint("order_key", name="orders_key"),
        sqlite_autoincrement=True,
    )
    op.create_index("orders_accession", "orders", ["accession_number"])
    op.create_index("orders_study", "orders", ["study_instance_uid"])
    op.create_index("orders_patient", "orders", ["patient_id"])
    op.create_table(
        "inbound_messages",
        sa.Column("sender", sa.Text, nullable=False),
        sa.Column("control_id", sa.Text, nullable=False),
        sa.Column("received_at", sa.Text, nullable=False),
        sa.Column("message_type", sa.Text, nullable=False),
        sa.Column("ack_code", sa.Text, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("sender", "control_id", name="inbound_messages_pkey"),
    )


def downgrade() -> None:
    raise NotImplementedError("forward-only: restore the backup taken before the upgrade")
