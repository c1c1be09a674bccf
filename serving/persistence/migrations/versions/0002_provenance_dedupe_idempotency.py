"""Provenance of every screening, one dedupe key for active jobs, idempotency keys, results
that are never overwritten.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01

* ``screenings`` and ``jobs`` gain ``source``, ``triggered_by``, ``requested_by``; ``screenings``
  gains ``screening_uuid`` (the public id, unique). Rows written before this revision get what can
  be known: a job that named a Study UID and spooled nothing was a PACS fetch; everything else is
  ``unknown``. Old screenings get the id of the job that produced them, or a new time-ordered id.
* ``jobs.dedupe_key`` (the Study UID of a store-sourced job) with a partial unique index over
  QUEUED/RUNNING jobs: SCP, webhook, poller and API never queue the same study twice, even from
  two processes. Of several old active jobs for one study, the oldest gets the key.
* ``idempotency_keys``: (client, key) -> request hash and job.
* ``screenings`` refuses UPDATE (a trigger): a result, once written, is never changed.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

from serving.persistence.ids import new_screening_uuid

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ACTIVE = "status IN ('QUEUED', 'RUNNING') AND dedupe_key IS NOT NULL"


def _provenance(table: str) -> None:
    for name in ("source", "triggered_by", "requested_by"):
        op.add_column(table, sa.Column(name, sa.Text, nullable=False, server_default=sa.text("'unknown'")))


def _ms(created_at: str) -> int:
    try:
        return int(datetime.fromisoformat(created_at).timestamp() * 1000)
    except ValueError:
        return 0


def upgrade() -> None:
    bind = op.get_bind()
    _provenance("screenings")
    _provenance("jobs")
    op.add_column("screenings", sa.Column("screening_uuid", sa.Text))
    op.add_column("jobs", sa.Column("dedupe_key", sa.Text))

    jobs = sa.table(
        "jobs",
        sa.column("id", sa.Text),
        sa.column("created_at", sa.Text),
        sa.column("status", sa.Text),
        sa.column("study_instance_uid", sa.Text),
        sa.column("spool_dir", sa.Text),
        sa.column("screening_id", sa.Integer),
        sa.column("dedupe_key", sa.Text),
        sa.column("source", sa.Text),
    )
    screenings = sa.table(
        "screenings",
        sa.column("id", sa.Integer),
        sa.column("created_at", sa.Text),
        sa.column("screening_uuid", sa.Text),
        sa.column("source", sa.Text),
    )
    from_store = sa.and_(jobs.c.spool_dir.is_(None), jobs.c.study_instance_uid.is_not(None))
    bind.execute(jobs.update().where(from_store).values(source="pacs-fetch"))
    seen: set[str] = set()
    active = bind.execute(
        sa.select(jobs.c.id, jobs.c.study_instance_uid)
        .where(from_store, jobs.c.status.in_(("QUEUED", "RUNNING")))
        .order_by(jobs.c.created_at, jobs.c.id)
    ).all()
    for job_id, uid in active:
        if uid not in seen:
            seen.add(uid)
            bind.execute(jobs.update().where(jobs.c.id == job_id).values(dedupe_key=uid))

    produced = bind.execute(
        sa.select(jobs.c.screening_id, jobs.c.id, jobs.c.source).where(jobs.c.screening_id.is_not(None))
    ).all()
    by_screening = {sid: (job_id, source) for sid, job_id, source in produced}
    rows = bind.execute(sa.select(screenings.c.id, screenings.c.created_at).order_by(screenings.c.id)).all()
    backfill = sa.update(screenings).where(screenings.c.id == sa.bindparam("row_id"))
    backfill = backfill.values(screening_uuid=sa.bindparam("uuid"), source=sa.bindparam("origin"))
    for start in range(0, len(rows), 5000):  # executemany in chunks: one round trip per chunk
        chunk = []
        for screening_id, created_at in rows[start : start + 5000]:
            job = by_screening.get(screening_id)
            ident, source = job if job else (new_screening_uuid(_ms(created_at)), "unknown")
            chunk.append({"row_id": screening_id, "uuid": ident, "origin": source})
        bind.execute(backfill, chunk)

    op.create_index("screenings_uuid", "screenings", ["screening_uuid"], unique=True)
    op.create_index(
        "jobs_active_dedupe",
        "jobs",
        ["dedupe_key"],
        unique=True,
        sqlite_where=sa.text(_ACTIVE),
        postgresql_where=sa.text(_ACTIVE),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("key", sa.Text, nullable=False),
        sa.Column("request_hash", sa.Text, nullable=False),
        sa.Column("job_id", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("actor", "key", name="idempotency_keys_pkey"),
    )
    if bind.dialect.name == "postgresql":
        # SQLSTATE 23000 (integrity_constraint_violation): the writer sees a constraint error
        op.execute(
            "CREATE FUNCTION dxassist_append_only() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "RAISE EXCEPTION 'append-only table' USING ERRCODE = '23000'; END $$"
        )
        op.execute(
            "CREATE TRIGGER screenings_no_update BEFORE UPDATE ON screenings "
            "FOR EACH ROW EXECUTE FUNCTION dxassist_append_only()"
        )
    else:
        op.execute(
            "CREATE TRIGGER screenings_no_update BEFORE UPDATE ON screenings "
            "BEGIN SELECT RAISE(ABORT, 'append-only table'); END"
        )


def downgrade() -> None:
    raise NotImplementedError("forward-only: restore the backup taken before the upgrade")
