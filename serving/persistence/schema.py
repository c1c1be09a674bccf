"""The results database's tables, as SQLAlchemy Core ``Table`` objects: what the code reads and writes.

This module describes the schema at the newest migration (``head``); it never creates anything.
Tables are created and changed only by the Alembic migrations in ``serving.persistence.migrations``
(a test checks that this description and ``alembic upgrade head`` agree, on SQLite and PostgreSQL).

Timestamps are ISO-8601 UTC text (millisecond precision), as the first schema had them: they sort
and compare as text on both databases.

Provenance vocabulary (stable strings, stored):

* ``source``: where the screened pixels came from: ``pacs-fetch`` (retrieved from the configured
  store), ``scp-push`` (sent to our C-STORE SCP), ``upload`` (posted to the API), ``files`` (local
  files: CLI or batch), ``unknown`` (rows written before provenance was recorded).
* ``triggered_by``: what asked for it: ``api``, ``webhook``, ``poller``, ``scp``, ``batch``, ``cli``,
  ``unknown``.
* ``requested_by``: the requesting API token's id (``token:`` + a hash prefix, never the token),
  or ``system`` for automatic triggers, CLI and batch.
"""

from __future__ import annotations

from enum import StrEnum

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    text,
)


class SourceValues(StrEnum):
    PACS_FETCH = "pacs-fetch"
    SCP_PUSH = "scp-push"
    UPLOAD = "upload"
    FILES = "files"
    UNKNOWN = "unknown"


#: sources whose pixels are the store's own copy of the study: their result is the study's record
STORE_SOURCES = (SourceValues.PACS_FETCH.value, SourceValues.SCP_PUSH.value)


class TriggerValues(StrEnum):
    API = "api"
    WEBHOOK = "webhook"
    POLLER = "poller"
    SCP = "scp"
    BATCH = "batch"
    CLI = "cli"
    ORDER = "order"  # an inbound order (HL7 v2 or FHIR) said the study is ready
    UNKNOWN = "unknown"


class VerdictValues(StrEnum):
    AGREE = "agree"
    DISAGREE = "disagree"
    UNCERTAIN = "uncertain"


SYSTEM_ACTOR = "system"

metadata = MetaData()


def _id() -> Column[int]:
    """Row id: INTEGER PRIMARY KEY AUTOINCREMENT on SQLite, a BIGINT identity on PostgreSQL."""
    return Column("id", BigInteger().with_variant(Integer(), "sqlite"), Identity(), primary_key=True)


_ACTIVE = "status IN ('QUEUED', 'RUNNING') AND dedupe_key IS NOT NULL"

screenings = Table(
    "screenings",
    metadata,
    _id(),
    Column("created_at", Text, nullable=False),
    Column("study_instance_uid", Text, nullable=False),
    Column("study_ref", Text, nullable=False),
    Column("outcome", Text, nullable=False),
    Column("reason", Text),
    Column("priority", Text),
    Column("models", Text, nullable=False),
    Column("result_json", Text, nullable=False),
    # 0002: provenance; the public screening id (a time-ordered UUID; the job id for API screenings)
    Column("source", Text, nullable=False, server_default=text("'unknown'")),
    Column("triggered_by", Text, nullable=False, server_default=text("'unknown'")),
    Column("requested_by", Text, nullable=False, server_default=text("'unknown'")),
    Column("screening_uuid", Text),
    Index("screenings_study", "study_instance_uid"),
    Index("screenings_ref", "study_ref"),
    Index("screenings_uuid", "screening_uuid", unique=True),
    sqlite_autoincrement=True,
)

jobs = Table(
    "jobs",
    metadata,
    Column("id", Text, primary_key=True),
    Column("created_at", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("priority", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("study_instance_uid", Text),
    Column("spool_dir", Text),
    Column("screening_id", Integer),
    Column("error_reason", Text),
    Column("error_detail", Text),
    # 0002: the dedupe key shared by SCP, webhook, poller and API (the Study UID of a store-sourced
    # job; NULL for uploads), and the provenance the result will carry
    Column("source", Text, nullable=False, server_default=text("'unknown'")),
    Column("triggered_by", Text, nullable=False, server_default=text("'unknown'")),
    Column("requested_by", Text, nullable=False, server_default=text("'unknown'")),
    Column("dedupe_key", Text),
    # 0007: the ingress screening the job and until when its claim holds (renewed while it runs);
    # how many times an ingress claimed it (serving.persistence.results, ``claim_jobs``)
    Column("claimed_by", Text),
    Column("lease_until", Text),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Index("jobs_status", "status"),
    Index("jobs_claimable", "status", "lease_until"),
    Index("jobs_study", "study_instance_uid"),
    Index(
        "jobs_active_dedupe",
        "dedupe_key",
        unique=True,
        sqlite_where=text(_ACTIVE),
        postgresql_where=text(_ACTIVE),
    ),
)

evidence = Table(
    "evidence",
    metadata,
    Column("screening_id", Integer, nullable=False),
    Column("header", LargeBinary, nullable=False),  # the screened instance without pixel data (for the SR)
    Index("evidence_screening", "screening_id"),
)

deliveries = Table(
    "deliveries",
    metadata,
    _id(),
    Column("screening_id", Integer, nullable=False),
    Column("sink", Text, nullable=False),
    Column("status", Text, nullable=False),  # PENDING, DONE, DEAD
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("next_at", Text, nullable=False),
    Column("last_error", Text),
    Column("created_at", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    UniqueConstraint("screening_id", "sink"),
    Index("deliveries_due", "status", "next_at"),
    sqlite_autoincrement=True,
)

delivery_audit = Table(
    "delivery_audit",
    metadata,
    _id(),
    Column("delivery_id", Integer, nullable=False),
    Column("sink", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("outcome", Text, nullable=False),  # DELIVERED, RETRY, DEAD
    Column("detail", Text),
    Column("at", Text, nullable=False),
    sqlite_autoincrement=True,
)

# 0002: a retried POST with the same key (per client) returns the same screening
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("actor", Text, nullable=False),
    Column("key", Text, nullable=False),
    Column("request_hash", Text, nullable=False),
    Column("job_id", Text, nullable=False),
    Column("created_at", Text, nullable=False),
    PrimaryKeyConstraint("actor", "key", name="idempotency_keys_pkey"),
)

# 0003: who read or wrote which screening, append-only (UPDATE/DELETE refused by triggers)
audit_log = Table(
    "audit_log",
    metadata,
    _id(),
    Column("at", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("screening_id", Text),
    Column("study_ref", Text),
    Index("audit_log_screening", "screening_id"),
    sqlite_autoincrement=True,
)

# 0004: readers' verdicts on findings
feedback = Table(
    "feedback",
    metadata,
    _id(),
    Column("created_at", Text, nullable=False),
    Column("screening_id", Text, nullable=False),
    Column("finding_key", Text, nullable=False),
    Column("verdict", Text, nullable=False),
    Column("comment", Text),
    Column("reader_id", Text, nullable=False),
    CheckConstraint("verdict IN ('agree', 'disagree', 'uncertain')", name="feedback_verdict"),
    Index("feedback_screening", "screening_id"),
    sqlite_autoincrement=True,
)


# 0005: inbound orders (HL7 v2 ORM/OMI, FHIR ServiceRequest/ImagingStudy), keyed by the placer
# order number (else the filler's); linked to the study by accession number or Study UID
orders = Table(
    "orders",
    metadata,
    _id(),
    Column("created_at", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("order_key", Text, nullable=False),
    Column("source", Text, nullable=False),  # hl7, fhir
    Column("placer_number", Text, nullable=False, server_default=text("''")),
    Column("filler_number", Text, nullable=False, server_default=text("''")),
    Column("accession_number", Text, nullable=False, server_default=text("''")),
    Column("study_instance_uid", Text, nullable=False, server_default=text("''")),
    Column("patient_id", Text, nullable=False, server_default=text("''")),
    Column("priority", Text, nullable=False),  # stat, routine
    Column("priority_code", Text, nullable=False, server_default=text("''")),
    Column("procedure_code", Text, nullable=False, server_default=text("''")),
    Column("procedure_text", Text, nullable=False, server_default=text("''")),
    Column("status", Text, nullable=False),  # active, completed, cancelled
    Column("message_id", Text),  # the inbound message that last changed it
    UniqueConstraint("order_key", name="orders_key"),
    Index("orders_accession", "accession_number"),
    Index("orders_study", "study_instance_uid"),
    Index("orders_patient", "patient_id"),
    sqlite_autoincrement=True,
)

# 0005: every inbound message accepted, stored before its ACK; (sender, MSH-10) dedupes retries
inbound_messages = Table(
    "inbound_messages",
    metadata,
    Column("sender", Text, nullable=False),
    Column("control_id", Text, nullable=False),
    Column("received_at", Text, nullable=False),
    Column("message_type", Text, nullable=False),
    Column("ack_code", Text, nullable=False),
    Column("body", Text, nullable=False),
    PrimaryKeyConstraint("sender", "control_id", name="inbound_messages_pkey"),
)

# 0006: model lifecycle (serving.persistence.lifecycle): the active version per model, the
# append-only audit of switches, shadow versions added at run time, shadow results
model_active_versions = Table(
    "model_active_versions",
    metadata,
    Column("model_id", Text, primary_key=True),
    Column("version", Text, nullable=False),
    Column("updated_at", Text, nullable=False),
    Column("event_id", BigInteger, nullable=False),
)
model_version_events = Table(
    "model_version_events",
    metadata,
    _id(),
    Column("at", Text, nullable=False),
    Column("model_id", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("from_version", Text, nullable=False, server_default=text("''")),
    Column("to_version", Text, nullable=False),
    Column("actor", Text, nullable=False),
    Column("reason", Text, nullable=False),
    Index("model_version_events_model", "model_id", "id"),
    sqlite_autoincrement=True,
)
model_shadow_versions = Table(
    "model_shadow_versions",
    metadata,
    Column("model_id", Text, nullable=False),
    Column("version", Text, nullable=False),
    Column("added_at", Text, nullable=False),
    PrimaryKeyConstraint("model_id", "version", name="model_shadow_versions_pkey"),
)
shadow_results = Table(
    "shadow_results",
    metadata,
    _id(),
    Column("created_at", Text, nullable=False),
    Column("model_id", Text, nullable=False),
    Column("shadow_version", Text, nullable=False),
    Column("active_version", Text, nullable=False),
    Column("study_instance_uid", Text, nullable=False),
    Column("study_ref", Text, nullable=False),
    Column("result_json", Text, nullable=False),
    Index("shadow_results_version", "model_id", "shadow_version", "id"),
    sqlite_autoincrement=True,
)

# 0007: the instances of an upload or of a study pushed to the SCP, from admission until the
# job's result (or failure) is stored: readable by every replica on every node
uploads = Table(
    "uploads",
    metadata,
    Column("job_id", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("created_at", Text, nullable=False),
    PrimaryKeyConstraint("job_id", "seq", name="uploads_pkey"),
)

# 0007: roles that run once per cluster (the C-STORE SCP, the QIDO-RS poller): who holds each and
# until when (serving.persistence.leases); ``term`` counts hand-overs
leases = Table(
    "leases",
    metadata,
    Column("name", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    Column("expires_at", Text, nullable=False),
    Column("acquired_at", Text, nullable=False),
    Column("term", BigInteger, nullable=False, server_default=text("1")),
)

# -- the batch job ledger (its own SQLite file in the job folder, not the results database) ---

ledger_metadata = MetaData()

ledger_studies = Table(
    "studies",
    ledger_metadata,
    Column("study_key", Text, primary_key=True),
    Column("outcome", Text, nullable=False),
    Column("reason", Text),
    Column("result_json", Text, nullable=False),
    Column("finished_at", Text, nullable=False),
)

# one row: the job's own id, made at its first run; each study's results-database job id derives
# from it and the study key, so a rerun after a crash between the two writes finds its record
ledger_run = Table(
    "run",
    ledger_metadata,
    Column("run_id", Text, primary_key=True),
)

# studies that could not be fetched (store down...): not done, retried by the next run
ledger_errors = Table(
    "errors",
    ledger_metadata,
    Column("study_key", Text, primary_key=True),
    Column("error", Text, nullable=False),
    Column("at", Text, nullable=False),
)
