"""Several ingresses on one database: job claims with leases, uploads kept in the database, and
leases for the services that run once per cluster (the C-STORE SCP, the QIDO-RS poller).

* ``jobs.claimed_by`` / ``jobs.lease_until`` / ``jobs.attempts``: the ingress screening a job and
  until when its claim holds (renewed while it runs); another ingress takes the job only once the
  lease has run out. Jobs written before this revision are unclaimed: the first ingress to start
  claims them.
* ``uploads``: the instances of an upload (or of a study pushed to the SCP), one row per
  instance, written with the job's admission and deleted with its result, so that any replica
  on any node can read them.
* ``leases``: one row per cluster-wide role (``scp``, ``poller``): its holder and the moment its
  lease ends; ``term`` counts the hand-overs.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("claimed_by", sa.Text))
    op.add_column("jobs", sa.Column("lease_until", sa.Text))
    op.add_column("jobs", sa.Column("attempts", sa.Integer, nullable=False, server_default=sa.text("0")))
    op.create_index("jobs_claimable", "jobs", ["status", "lease_until"])
    op.create_table(
        "uploads",
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("job_id", "seq", name="uploads_pkey"),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Text, nullable=False),
        sa.Column("acquired_at", sa.Text, nullable=False),
        sa.Column("term", sa.BigInteger, nullable=False, server_default=sa.text("1")),
    )


def downgrade() -> None:
    raise NotImplementedError("forward-only: restore the backup taken before the upgrade")
