"""The results store and the outbox behave the same on SQLite (default) and PostgreSQL (a real
server from Debian's packages, started by the ``postgres`` fixture)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from models.errors import ResultsConflict, ResultsDatabaseError
from models.predictor import OnnxPredictor
from models.results import ScreeningResult
from serving.core.screening import StudyScreener, screen_paths
from serving.persistence.outbox import Outbox
from serving.persistence.results import Admission, Provenance, ResultsStore
from serving.persistence.schema import SourceValues, TriggerValues
from tests.conftest import write_synthetic_cxr
from tests.integration.conftest import PostgresServer

pytestmark = pytest.mark.integration
FROM_PACS = Provenance(SourceValues.PACS_FETCH, TriggerValues.API, "token:test")


@pytest.fixture
def one_result(predictor: OnnxPredictor, tmp_path: Path) -> ScreeningResult:
    path = write_synthetic_cxr(tmp_path / "a.dcm", seed=41)
    return screen_paths(StudyScreener([predictor], study_ref_key=b"k"), [path])[0]


def test_result_evidence_and_deliveries_commit_together(
    results_db: Path | str, one_result: ScreeningResult, tmp_path: Path
) -> None:
    store = ResultsStore(results_db)
    uid = one_result.study_instance_uid
    store.add_job("job-1", "routine", uid, None, provenance=FROM_PACS, dedupe_key=uid)
    header = dcmread(write_synthetic_cxr(tmp_path / "h.dcm", seed=1), stop_before_pixels=True)
    screening_id = store.finish_job("job-1", one_result, evidence=[header], sinks=["fhir", "hl7"])

    job = store.job("job-1")
    assert job is not None and job.status == "DONE" and job.screening_id == screening_id
    loaded = store.for_delivery(screening_id)
    assert loaded is not None
    result, evidence = loaded
    assert result == one_result
    assert [e.SOPInstanceUID for e in evidence] == [header.SOPInstanceUID]
    assert store.latest(one_result.study_instance_uid) == one_result
    assert store.has_screening_for(one_result.study_instance_uid)
    outbox = Outbox(results_db)
    assert outbox.status().pending == 2
    store.close()
    outbox.close()


def test_a_failed_finish_leaves_neither_result_nor_delivery(
    results_db: Path | str, one_result: ScreeningResult
) -> None:
    store = ResultsStore(results_db)
    store.add_job("job-1", "ROUTINE", one_result.study_instance_uid, None)
    with pytest.raises(ResultsConflict) as raised:  # the second "fhir" row violates UNIQUE(screening, sink)
        store.finish_job("job-1", one_result, sinks=["fhir", "fhir"])
    assert one_result.study_instance_uid not in str(raised.value)  # typed, and no parameters quoted
    assert store.count() == 0
    outbox = Outbox(results_db)
    assert outbox.status().pending == 0
    outbox.close()
    job = store.job("job-1")
    assert job is not None and job.status == "QUEUED"  # still to do: a restart screens it again
    store.close()


def _pending(results_db: Path | str, result: ScreeningResult, n: int) -> None:
    store = ResultsStore(results_db)
    for i in range(n):
        store.add_job(f"job-{i}", "ROUTINE", result.study_instance_uid, None)
        store.finish_job(f"job-{i}", result, sinks=["fhir"])
    store.close()


def test_claimed_deliveries_are_hidden_until_marked_or_the_lease_ends(
    results_db: Path | str, one_result: ScreeningResult
) -> None:
    _pending(results_db, one_result, 3)
    first, second = Outbox(results_db, lease_s=0.3), Outbox(results_db, lease_s=0.3)
    taken = first.claim()
    assert len(taken) == 3
    assert second.claim() == []  # another worker does not see rows being sent
    first.mark(taken[0][0], "fhir", 1, "DELIVERED")
    first.mark(taken[1][0], "fhir", 1, "DEAD", "refused")
    time.sleep(0.4)  # the worker holding taken[2] died: its lease runs out
    again = second.claim()
    assert [row[0] for row in again] == [taken[2][0]]
    assert second.status().by_sink["fhir"] == {"DONE": 1, "DEAD": 1, "PENDING": 1}
    assert second.dead() == [(taken[1][0], "fhir", "refused")]
    assert second.retry_dead() == 1
    assert second.audit_count("DELIVERED") == 1 and second.audit_count("DEAD") == 1
    first.close()
    second.close()


def test_a_slow_live_worker_keeps_its_claimed_rows_by_renewing_their_lease(
    results_db: Path | str, one_result: ScreeningResult
) -> None:
    """Each send takes longer than the lease: without renewal another worker would take the
    rows still waiting in the first one's batch and send them too."""
    from models.results import ScreeningResult as Result
    from serving.delivery.worker import OutboxWorker

    _pending(results_db, one_result, 4)
    lease_s = 1.0
    sent: list[tuple[str, int]] = []

    class SlowSink:
        name = "fhir"

        def __init__(self, who: str) -> None:
            self.who = who

        def deliver(self, delivery_id: int, result: Result, evidence: list[object]) -> None:
            time.sleep(0.6)  # four of these outlast the lease
            sent.append((self.who, delivery_id))

    store = ResultsStore(results_db)
    slow = OutboxWorker(Outbox(results_db, lease_s=lease_s), {"fhir": SlowSink("slow")}, store.for_delivery)
    other = OutboxWorker(Outbox(results_db, lease_s=lease_s), {"fhir": SlowSink("other")}, store.for_delivery)
    thread = threading.Thread(target=slow.run_once)
    thread.start()
    time.sleep(0.2)  # the slow worker has claimed all four
    while thread.is_alive():
        other.run_once()  # finds nothing while the slow worker renews
        time.sleep(0.1)
    thread.join()
    assert [who for who, _ in sent] == ["slow"] * 4
    assert len({d for _, d in sent}) == 4
    assert slow.outbox.status().done == 4
    slow.outbox.close()
    other.outbox.close()
    store.close()


def test_concurrent_workers_claim_each_delivery_once(results_db: Path | str, one_result: ScreeningResult) -> None:
    _pending(results_db, one_result, 24)
    workers = [Outbox(results_db) for _ in range(4)]
    claimed: list[list[int]] = [[] for _ in workers]

    def drain(i: int) -> None:
        while rows := workers[i].claim(limit=2):
            claimed[i].extend(r[0] for r in rows)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    every = [d for c in claimed for d in c]
    assert sorted(every) == sorted(set(every)) and len(every) == 24
    for w in workers:
        w.close()


def test_unreachable_postgres_is_a_typed_error_without_the_password(postgres: PostgresServer) -> None:
    url = postgres.url("dxassist_missing").replace(f":{postgres.port}/", ":1/")
    with pytest.raises(ResultsDatabaseError) as raised:
        ResultsStore(url)
    assert "test-only-password" not in str(raised.value)
    assert "unreachable" in str(raised.value)


# -- migrations ------------------------------------------------------------------------------

# The schema exactly as the pre-migration code created it (serving/results.py and
# serving/outbox.py before Alembic): fixture data, never to be edited.
OLD_DDL = """
CREATE TABLE IF NOT EXISTS screenings (
    id {id},
    created_at TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    study_ref TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT,
    priority TEXT,
    models TEXT NOT NULL,
    result_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS screenings_study ON screenings (study_instance_uid);
CREATE INDEX IF NOT EXISTS screenings_ref ON screenings (study_ref);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    priority TEXT NOT NULL,
    status TEXT NOT NULL,
    study_instance_uid TEXT,
    spool_dir TEXT,
    screening_id INTEGER,
    error_reason TEXT,
    error_detail TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_instance_uid);
CREATE TABLE IF NOT EXISTS evidence (
    screening_id INTEGER NOT NULL,
    header {blob} NOT NULL            -- the screened instance without pixel data (for the SR)
);
CREATE INDEX IF NOT EXISTS evidence_screening ON evidence (screening_id);
CREATE TABLE IF NOT EXISTS deliveries (
    id {id},
    screening_id INTEGER NOT NULL,
    sink TEXT NOT NULL,
    status TEXT NOT NULL,            -- PENDING, DONE, DEAD
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at TEXT NOT NULL,
    last_error TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (screening_id, sink)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_at);
CREATE TABLE IF NOT EXISTS delivery_audit (
    id {id},
    delivery_id INTEGER NOT NULL,
    sink TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    outcome TEXT NOT NULL,           -- DELIVERED, RETRY, DEAD
    detail TEXT,
    at TEXT NOT NULL
);
"""

_OLD_TYPES = {
    "sqlite": {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "blob": "BLOB"},
    "postgresql": {"id": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", "blob": "BYTEA"},
}


def _raw(target: Path | str, statements: list[tuple[str, tuple]]) -> None:
    """Run SQL as the pre-migration code did: the DB-API driver, no SQLAlchemy."""
    if isinstance(target, Path):
        import sqlite3

        conn = sqlite3.connect(target)
        for sql, params in statements:
            conn.execute(sql, params)
        conn.commit()
        conn.close()
        return
    import psycopg

    with psycopg.connect(target, autocommit=True) as pg:
        for sql, params in statements:
            pg.execute(sql.replace("?", "%s"), params)


def build_old_database(target: Path | str, result: ScreeningResult, header: bytes) -> None:
    """The old schema with rows in it: a PACS screening with its job, evidence and deliveries; a
    CLI screening without job; two QUEUED jobs for one study (the old API allowed it); a QUEUED
    SCP job saved without its Study UID."""
    dialect = "sqlite" if isinstance(target, Path) else "postgresql"
    ddl = OLD_DDL.format(**_OLD_TYPES[dialect])
    statements: list[tuple[str, tuple]] = [
        (s.strip(), ()) for s in ddl.split(";") if s.strip() and not s.strip().startswith("--")
    ]
    uid, json = result.study_instance_uid, result.model_dump_json()
    t = "2026-11-30T10:00:00.000+00:00"
    row = "INSERT INTO screenings (created_at, study_instance_uid, study_ref, outcome, reason, priority, models, result_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    statements += [
        (row, (t, uid, result.study_ref, "SCREENED", None, "ROUTINE", "tiny-test@0.1.0", json)),
        (row, ("2026-11-30T11:00:00.000+00:00", "1.2.3.4", "ref2", "NOT_SCREENED", "NOT_DICOM", None, "", json)),
        (
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("old-job", t, t, "stat", "DONE", uid, None, 1, None, None),
        ),
        (
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("q1", t, t, "routine", "QUEUED", "1.2.9", None, None, None, None),
        ),
        (
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("q2", t, t, "routine", "QUEUED", "1.2.9", None, None, None, None),
        ),
        (
            "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ("scp", t, t, "routine", "QUEUED", None, "/spool/x", None, None, None),
        ),
        ("INSERT INTO evidence VALUES (?, ?)", (1, header)),
        (
            "INSERT INTO deliveries (screening_id, sink, status, attempts, next_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (1, "fhir", "PENDING", 2, t, t, t),
        ),
        (
            "INSERT INTO deliveries (screening_id, sink, status, attempts, next_at, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (1, "hl7", "DONE", 1, t, t, t),
        ),
        (
            "INSERT INTO delivery_audit (delivery_id, sink, attempt, outcome, detail, at) VALUES (?, ?, ?, ?, ?, ?)",
            (2, "hl7", 1, "DELIVERED", None, t),
        ),
    ]
    _raw(target, statements)


def _header(tmp_path: Path) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dcmread(write_synthetic_cxr(tmp_path / "h.dcm", seed=1), stop_before_pixels=True).save_as(buffer)
    return buffer.getvalue()


def test_an_old_database_with_data_is_upgraded_keeping_every_row(
    results_db: Path | str, one_result: ScreeningResult, tmp_path: Path
) -> None:
    from serving.persistence.database import Database
    from serving.persistence.migrate import head_revision, state

    build_old_database(results_db, one_result, _header(tmp_path))
    db = Database(results_db)
    before = state(db)
    assert (before.current, before.legacy) == (None, True)  # recognised: old tables, no alembic_version
    store = ResultsStore(results_db)  # opening it migrates
    assert state(db).current == head_revision()
    db.close()
    uid = one_result.study_instance_uid
    # every row survives, readable through the new code
    assert store.count() == 2 and store.result(1) == one_result and store.latest(uid) == one_result
    loaded = store.for_delivery(1)
    assert loaded is not None and len(loaded[1]) == 1
    old_job = store.job("old-job")
    assert old_job is not None and (old_job.status, old_job.screening_id, old_job.priority) == ("DONE", 1, "stat")
    assert [j.id for j in store.pending_jobs()] == ["q1", "q2", "scp"]  # resumed as before
    outbox = Outbox(results_db)
    assert outbox.status().by_sink == {"fhir": {"PENDING": 1}, "hl7": {"DONE": 1}}
    assert outbox.audit_count("DELIVERED") == 1
    # what provenance could be known was filled in; the rest says "unknown"
    (pacs,) = store.screenings_for(uid)
    assert (pacs.screening_uuid, pacs.source) == ("old-job", "pacs-fetch")
    (cli,) = store.screenings_for("1.2.3.4")
    assert cli.source == "unknown" and len(cli.screening_uuid) == 32
    assert store.job("q1").dedupe_key == "1.2.9" and store.job("q2").dedupe_key is None  # type: ignore[union-attr]
    # the new constraints hold on the old rows
    assert store.has_screening_for("1.2.9")  # the queued store job blocks a second automatic one
    again = store.add_job("q3", "routine", "1.2.9", None, provenance=FROM_PACS, dedupe_key="1.2.9")
    assert (again.job_id, again.created) == ("q1", False)
    with pytest.raises(ResultsConflict):
        _raw_update(store, "UPDATE screenings SET outcome = 'NOT_SCREENED' WHERE id = 1")  # never overwritten
    assert store.result(1) == one_result
    with pytest.raises(ResultsConflict):
        _raw_update(store, "UPDATE jobs SET dedupe_key = '1.2.9' WHERE id = 'q2'")  # one active job per study
    store.audit("token:x", "read", "old-job", one_result.study_ref)
    with pytest.raises(ResultsConflict):
        _raw_update(store, "DELETE FROM audit_log")  # append-only
    with pytest.raises(ResultsConflict):  # a verdict outside agree/disagree/uncertain
        _raw_update(
            store,
            "INSERT INTO feedback (created_at, screening_id, finding_key, verdict, reader_id)"
            " VALUES ('t', 'old-job', 'alpha', 'maybe', 'reader-1')",
        )
    outbox.close()
    store.close()


def _raw_update(store: ResultsStore, sql: str) -> None:
    from sqlalchemy import text

    with store._db.write() as conn:
        conn.execute(text(sql))


def _schema(target: Path | str) -> dict[str, object]:
    """Tables, columns, keys, indexes and triggers, as the database reports them."""
    from sqlalchemy import inspect, text

    from serving.persistence.database import Database

    db = Database(target)
    with db.read() as conn:
        inspector = inspect(conn)
        out: dict[str, object] = {}
        for table in sorted(inspector.get_table_names()):
            pk = inspector.get_pk_constraint(table)["constrained_columns"]
            out[table] = {
                "columns": [
                    (c["name"], str(c["type"]), c["nullable"] or c["name"] in pk, str(c["default"]))
                    for c in inspector.get_columns(table)
                ],
                "pk": pk,
                "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)),
                "indexes": sorted(
                    (
                        i["name"],
                        tuple(i["column_names"]),
                        bool(i["unique"]),
                        sorted((k, str(v)) for k, v in i.get("dialect_options", {}).items()),
                    )
                    for i in inspector.get_indexes(table)
                ),
                "checks": sorted(str(c["sqltext"]) for c in inspector.get_check_constraints(table)),
            }
        if db.dialect == "sqlite":
            triggers = conn.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'trigger' ORDER BY name"))
        else:
            triggers = conn.execute(
                text("SELECT tgname, pg_get_triggerdef(oid) FROM pg_trigger WHERE NOT tgisinternal ORDER BY tgname")
            )
        out["triggers"] = [tuple(r) for r in triggers]
    db.close()
    return out


def _fresh(results_db: Path | str, tmp_path: Path, postgres: object, name: str) -> Path | str:
    if isinstance(results_db, Path):
        return tmp_path / f"{name}.sqlite3"
    return postgres.new_database()  # type: ignore[attr-defined]


def test_the_schema_comes_only_from_the_migrations(
    results_db: Path | str, one_result: ScreeningResult, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The stores create nothing of their own: a database they open has exactly the schema of
    ``alembic upgrade head`` on an empty one, and so does an upgraded old database; and
    ``serving.persistence.schema`` (what the code reads and writes) agrees with the migrations."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from serving.persistence.database import Database
    from serving.persistence.migrate import upgrade
    from serving.persistence.schema import metadata

    postgres = request.getfixturevalue("postgres") if not isinstance(results_db, Path) else None
    by_stores = results_db
    ResultsStore(by_stores).close()
    Outbox(by_stores).close()
    by_alembic = _fresh(results_db, tmp_path, postgres, "alembic")
    db = Database(by_alembic)
    upgrade(db)
    old = _fresh(results_db, tmp_path, postgres, "old")
    build_old_database(old, one_result, _header(tmp_path))
    ResultsStore(old).close()
    assert _schema(by_stores) == _schema(by_alembic) == _schema(old)
    with db.engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "compare_server_default": True})
        drift = compare_metadata(context, metadata)
    dialect = db.dialect
    db.close()
    flat = [d for group in drift for d in (group if isinstance(group, list) else [group])]
    # SQLite cannot reflect an identity column (it is INTEGER PRIMARY KEY AUTOINCREMENT there);
    # tables another room declares in its own module are that module's to check
    real = [
        d
        for d in flat
        if _drift_table(d) in metadata.tables
        and not (dialect == "sqlite" and d[0] == "modify_default" and d[3] == "id")
    ]
    assert real == []


def _drift_table(diff: tuple) -> str:  # type: ignore[type-arg]
    """The table an Alembic ``compare_metadata`` entry is about."""
    subject = diff[1]
    if diff[0] in ("add_table", "remove_table"):
        return str(subject.name)
    if diff[0] in ("add_index", "remove_index", "add_constraint", "remove_constraint"):
        return str(subject.table.name)
    return str(diff[2])


def test_an_outbox_only_file_from_the_old_code_is_completed(tmp_path: Path) -> None:
    """The old ``dxassist outbox status`` on a new path left a file with only the outbox tables."""
    path = tmp_path / "results.sqlite3"
    outbox_only = OLD_DDL[OLD_DDL.index("CREATE TABLE IF NOT EXISTS deliveries") :].format(**_OLD_TYPES["sqlite"])
    _raw(path, [(s.strip(), ()) for s in outbox_only.split(";") if s.strip()])
    store = ResultsStore(path)
    assert store.count() == 0 and Outbox(path).status().pending == 0
    store.close()


def test_a_database_newer_than_this_code_is_refused(results_db: Path | str) -> None:
    from models.errors import ResultsSchemaError

    ResultsStore(results_db).close()
    _raw(results_db, [("UPDATE alembic_version SET version_num = ?", ("9999",))])
    with pytest.raises(ResultsSchemaError, match="newer than this dxassist"):
        ResultsStore(results_db)


def test_replicas_starting_together_migrate_once(results_db: Path | str) -> None:
    from serving.persistence.database import Database
    from serving.persistence.migrate import head_revision, state

    errors: list[BaseException] = []

    def open_store() -> None:
        try:
            ResultsStore(results_db).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_store) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    db = Database(results_db)
    assert state(db).current == head_revision()
    db.close()


# -- integrity rules, on both databases --------------------------------------------------------


def test_an_upload_never_displaces_the_store_copys_result_nor_reaches_the_emr(
    results_db: Path | str, one_result: ScreeningResult
) -> None:
    from models.results import OutcomeValues

    store = ResultsStore(results_db)
    uid = one_result.study_instance_uid
    fake = one_result.model_copy(update={"outcome": OutcomeValues.NOT_SCREENED, "findings": []})
    upload = Provenance(SourceValues.UPLOAD, TriggerValues.API, "token:intruder")
    store.add_job("up-1", "routine", uid, "/spool/a", provenance=upload)  # before the PACS copy
    assert not store.has_screening_for(uid)  # an upload does not silence the PACS webhook
    store.finish_job("up-1", one_result, sinks=["fhir"])
    store.add_job("pacs-1", "routine", uid, None, provenance=FROM_PACS, dedupe_key=uid)
    pacs_id = store.finish_job("pacs-1", one_result, sinks=["fhir"])
    store.add_job("up-2", "routine", uid, "/spool/b", provenance=upload)  # after it
    store.finish_job("up-2", fake, sinks=["fhir"])
    assert store.latest(uid) == one_result  # the PACS result is the study's record
    assert store.latest(uid, prefer_store=False) == fake  # the newest, when explicitly asked
    assert [r.outcome for _, _, r in store.latest_per_study()] == ["SCREENED"]
    assert [(r.source, r.requested_by) for r in store.screenings_for(uid)] == [
        ("upload", "token:intruder"),
        ("pacs-fetch", "token:test"),
        ("upload", "token:intruder"),
    ]
    outbox = Outbox(results_db)
    assert outbox.status().pending == 2  # the first upload (no PACS result yet) and the PACS one
    assert pacs_id in [row[1] for row in outbox.claim()]
    outbox.close()
    store.close()


def test_idempotency_keys_and_the_dedupe_key_answer_with_the_first_job(
    results_db: Path | str, one_result: ScreeningResult
) -> None:
    from models.errors import IdempotencyKeyReused
    from serving.persistence.results import Idempotency

    store = ResultsStore(results_db)
    key = Idempotency("token:a", "k1", "hash-1")
    first = store.add_job("j1", "routine", "1.2.5", None, provenance=FROM_PACS, dedupe_key="1.2.5", idempotency=key)
    retry = store.add_job("j2", "routine", "1.2.5", None, provenance=FROM_PACS, dedupe_key="1.2.5", idempotency=key)
    assert (first.job_id, first.created, retry.job_id, retry.created) == ("j1", True, "j1", False)
    other_client = Idempotency("token:b", "k1", "hash-9")  # keys are per client
    assert store.add_job("j3", "routine", "1.2.6", None, idempotency=other_client).created
    with pytest.raises(IdempotencyKeyReused):
        store.add_job("j4", "routine", "1.2.7", None, idempotency=Idempotency("token:a", "k1", "hash-2"))
    coalesced = store.add_job("j5", "routine", "1.2.5", None, provenance=FROM_PACS, dedupe_key="1.2.5")
    assert (coalesced.job_id, coalesced.created) == ("j1", False)  # the study is already queued
    store.finish_job("j1", one_result.model_copy(update={"study_instance_uid": "1.2.5"}))
    automatic = store.add_job(
        "j6", "routine", "1.2.5", None, provenance=FROM_PACS, dedupe_key="1.2.5", unless_screened=True
    )
    assert automatic == Admission(None, False)  # screened from the store: a trigger adds nothing
    explicit = store.add_job("j7", "routine", "1.2.5", None, provenance=FROM_PACS, dedupe_key="1.2.5")
    assert explicit.created  # an explicit request screens again
    assert [j.id for j in store.pending_jobs()] == ["j3", "j7"]
    store.close()


def test_feedback_and_the_audit_log(results_db: Path | str) -> None:
    from serving.persistence.schema import VerdictValues

    store = ResultsStore(results_db)
    store.add_feedback("s-1", "pneumothorax", "disagree", "reader-7", "skin fold")
    store.add_feedback("s-1", "pneumothorax", VerdictValues.AGREE, "reader-8")
    store.add_feedback("s-2", "nodule_mass", "uncertain", "reader-7")
    with pytest.raises(ValueError):
        store.add_feedback("s-1", "pneumothorax", "maybe", "reader-7")
    got = store.feedback_for("s-1")
    assert [(f.verdict, f.reader_id, f.comment) for f in got] == [
        (VerdictValues.DISAGREE, "reader-7", "skin fold"),
        (VerdictValues.AGREE, "reader-8", None),
    ]
    store.audit_many("token:r", "read-worklist", [(None, "ref-a"), ("s-1", "ref-b")])
    assert [(e.actor, e.action, e.screening_id, e.study_ref) for e in store.audit_entries()] == [
        ("token:r", "read-worklist", None, "ref-a"),
        ("token:r", "read-worklist", "s-1", "ref-b"),
    ]
    with pytest.raises(ResultsConflict):
        _raw_update(store, "UPDATE audit_log SET actor = 'someone else'")
    store.close()


def test_writers_of_one_sqlite_file_share_one_lock_in_a_process(tmp_path: Path) -> None:
    """Results, outbox, leases and orders each open their own ``Database`` on the file: their
    writers queue together (woken as the last commits), not in SQLite's sleeping busy handler."""
    from serving.persistence.database import Database

    a, b, other = Database(tmp_path / "r.sqlite3"), Database(tmp_path / "r.sqlite3"), Database(tmp_path / "o.sqlite3")
    assert a._writer is b._writer and a._writer is not other._writer  # one queue per file
    order: list[str] = []

    def second_writer() -> None:
        with b.write():
            order.append("b")

    with a.write():
        writer = threading.Thread(target=second_writer)
        writer.start()
        time.sleep(0.3)
        order.append("a")  # b waits for a's transaction, in this process's lock
        with other.write():  # another file is not held up
            order.append("other")
    writer.join(10)
    assert order == ["a", "other", "b"]
