"""The results store: one row per screening (JSON result body), the jobs, the evidence headers
and the outbox, in SQLite (embedded default, WAL) or PostgreSQL (``serving.persistence.database``).

The database holds PHI (it is the clinical record of what the AI said) and lives with the
other PHI stores; nothing from it is logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from models.results import ScreeningResult
from serving.persistence.database import Database
from serving.persistence.outbox import SCHEMA as OUTBOX_SCHEMA

_SCHEMA = """
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
"""


@dataclass(frozen=True)
class JobRecord:
    """A screening request as persisted: it survives restarts until DONE or FAILED."""

    id: str
    created_at: str
    updated_at: str
    priority: str
    status: str
    study_instance_uid: str | None
    spool_dir: str | None
    screening_id: int | None
    error_reason: str | None
    error_detail: str | None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _header_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


class ResultsStore:
    """Append-only record of screening results. Thread-safe (one connection, a lock).

    ``target`` is a SQLite file path or a ``postgresql://`` URL."""

    def __init__(self, target: Path | str) -> None:
        self.target = target
        self._db = Database(target)
        self._lock = self._db.lock
        self._db.create_schema(_SCHEMA)
        self._db.create_schema(OUTBOX_SCHEMA)

    def _insert(self, result: ScreeningResult) -> int:
        return self._db.insert(
            "INSERT INTO screenings (created_at, study_instance_uid, study_ref, outcome, reason, priority, models,"
            " result_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                _now(),
                result.study_instance_uid,
                result.study_ref,
                result.outcome.value,
                result.reason.value if result.reason else None,
                result.priority.value if result.priority else None,
                ",".join(result.models),
                result.model_dump_json(),
            ),
        )

    def save(self, result: ScreeningResult) -> int:
        """Commit a result (durable before return); returns its row id."""
        with self._lock:
            return self._insert(result)

    def latest(self, study_instance_uid: str) -> ScreeningResult | None:
        with self._lock:
            row = self._db.execute(
                "SELECT result_json FROM screenings WHERE study_instance_uid = ? ORDER BY id DESC LIMIT 1",
                (study_instance_uid,),
            ).fetchone()
        return ScreeningResult.model_validate_json(row[0]) if row else None

    def result(self, screening_id: int) -> ScreeningResult | None:
        with self._lock:
            row = self._db.execute("SELECT result_json FROM screenings WHERE id = ?", (screening_id,)).fetchone()
        return ScreeningResult.model_validate_json(row[0]) if row else None

    def latest_per_study(self, limit: int = 200) -> list[tuple[str, str | None, ScreeningResult]]:
        """(created_at, requested priority or None, result) of each study's newest screening."""
        with self._lock:
            rows = self._db.execute(
                "SELECT s.created_at, j.priority, s.result_json FROM screenings s LEFT JOIN jobs j"
                " ON j.screening_id = s.id WHERE s.id IN"
                " (SELECT MAX(id) FROM screenings GROUP BY study_instance_uid) ORDER BY s.id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [(r[0], r[1], ScreeningResult.model_validate_json(r[2])) for r in rows]

    # -- jobs ------------------------------------------------------------------------------

    def add_job(self, job_id: str, priority: str, study_instance_uid: str | None, spool_dir: str | None) -> None:
        now = _now()
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, created_at, updated_at, priority, status, study_instance_uid, spool_dir)"
                " VALUES (?, ?, ?, ?, 'QUEUED', ?, ?)",
                (job_id, now, now, priority, study_instance_uid, spool_dir),
            )

    def update_job(
        self,
        job_id: str,
        status: str,
        *,
        screening_id: int | None = None,
        error_reason: str | None = None,
        error_detail: str | None = None,
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE jobs SET status = ?, updated_at = ?, screening_id = COALESCE(?, screening_id),"
                " error_reason = ?, error_detail = ? WHERE id = ?",
                (status, _now(), screening_id, error_reason, error_detail, job_id),
            )

    def finish_job(
        self,
        job_id: str,
        result: ScreeningResult,
        *,
        evidence: Sequence[Dataset] = (),
        sinks: Sequence[str] = (),
    ) -> int:
        """One transaction: the result, its evidence headers, one outbox row per sink, job DONE.

        No result exists without its pending deliveries, and no delivery without its result."""
        with self._db.transaction() as db:
            screening_id = self._insert(result)
            for header in evidence:
                db.execute("INSERT INTO evidence VALUES (?, ?)", (screening_id, _header_bytes(header)))
            now = _now()
            for sink in sinks:
                db.execute(
                    "INSERT INTO deliveries (screening_id, sink, status, attempts, next_at, created_at, updated_at)"
                    " VALUES (?, ?, 'PENDING', 0, ?, ?, ?)",
                    (screening_id, sink, now, now, now),
                )
            db.execute(
                "UPDATE jobs SET status = 'DONE', updated_at = ?, screening_id = ? WHERE id = ?",
                (_now(), screening_id, job_id),
            )
        return screening_id

    def for_delivery(self, screening_id: int) -> tuple[ScreeningResult, list[Dataset]] | None:
        """The result and its evidence headers, as the outbox needs them."""
        result = self.result(screening_id)
        if result is None:
            return None
        with self._lock:
            blobs = self._db.execute("SELECT header FROM evidence WHERE screening_id = ?", (screening_id,)).fetchall()
        return result, [dcmread(BytesIO(bytes(b[0]))) for b in blobs]

    def job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord(*row) if row else None

    def pending_jobs(self) -> list[JobRecord]:
        """Jobs not finished (QUEUED or RUNNING when the service stopped), oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE status IN ('QUEUED', 'RUNNING') ORDER BY created_at"
            ).fetchall()
        return [JobRecord(*r) for r in rows]

    def has_screening_for(self, study_instance_uid: str) -> bool:
        """A study already screened, or queued/running: automatic triggers must not add another."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM screenings WHERE study_instance_uid = ? UNION ALL "
                "SELECT 1 FROM jobs WHERE study_instance_uid = ? AND status IN ('QUEUED', 'RUNNING') LIMIT 1",
                (study_instance_uid, study_instance_uid),
            ).fetchone()
        return row is not None

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM screenings").fetchone()[0])

    def close(self) -> None:
        self._db.close()
