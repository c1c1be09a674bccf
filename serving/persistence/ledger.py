"""The resume ledger of one batch job: which studies are done (with their result) and which could
not be fetched, in the job folder's ``ledger.sqlite3``.

It lives with the job's other outputs (CSV, Parquet, report), not in the results database: a job
folder is then complete and resumable on its own, also with ``--no-save`` (nothing written to
the clinical record) or when the results database is a shared PostgreSQL that the batch host
should not fill with per-job scratch rows. It is the same SQLAlchemy layer and engine settings as
the results database (``serving.persistence.database``: WAL, ``synchronous=FULL``, ``BEGIN
IMMEDIATE`` writes). Its two tables (``serving.persistence.schema``: ``ledger_metadata``) are made
with ``create_all`` when the folder is new: a ledger lives as long as its job, and a job is resumed
by the same dxassist version that started it, so it has no migrations.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import column, func, select
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from models.results import ScreeningResult
from serving.persistence.database import Database
from serving.persistence.schema import ledger_errors, ledger_metadata, ledger_run, ledger_studies


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Ledger:
    """Per-study progress of one job (``path`` is the job folder's ``ledger.sqlite3``)."""

    def __init__(self, path: Path) -> None:
        self._db = Database(path)
        self._run_id: uuid.UUID | None = None
        with self._db.write() as conn:
            ledger_metadata.create_all(conn)

    def run_id(self) -> uuid.UUID:
        """This job's id, made at its first run and kept for every rerun."""
        if self._run_id is None:
            with self._db.write() as conn:
                row = conn.execute(select(ledger_run.c.run_id)).first()
                if row is None:
                    self._run_id = uuid.uuid4()
                    conn.execute(ledger_run.insert().values(run_id=self._run_id.hex))
                else:
                    self._run_id = uuid.UUID(hex=str(row[0]))
        return self._run_id

    def job_id(self, study_key: str) -> str:
        """The results-database job id of one study of this job: the same in every rerun."""
        return uuid.uuid5(self.run_id(), study_key).hex

    def done(self) -> set[str]:
        with self._db.read() as conn:
            return {str(k) for k in conn.execute(select(ledger_studies.c.study_key)).scalars()}

    def record(self, key: str, result: ScreeningResult) -> bool:
        """Record a finished study once; returns False if it was already recorded."""
        with self._db.write() as conn:
            cursor = conn.execute(
                sqlite_insert(ledger_studies)
                .values(
                    study_key=key,
                    outcome=result.outcome.value,
                    reason=result.reason.value if result.reason else None,
                    result_json=result.model_dump_json(),
                    finished_at=_now(),
                )
                .on_conflict_do_nothing(index_elements=["study_key"])
            )
        return cursor.rowcount == 1

    def record_error(self, key: str, error: str) -> None:
        """Why a study could not be fetched (the latest reason); it stays to do."""
        statement = sqlite_insert(ledger_errors).values(study_key=key, error=error, at=_now())
        with self._db.write() as conn:
            conn.execute(
                statement.on_conflict_do_update(
                    index_elements=["study_key"], set_={"error": statement.excluded.error, "at": statement.excluded.at}
                )
            )

    def errors(self) -> dict[str, str]:
        """Studies that could not be fetched and are still not done: key -> reason."""
        with self._db.read() as conn:
            rows = conn.execute(
                select(ledger_errors.c.study_key, ledger_errors.c.error).where(
                    ledger_errors.c.study_key.not_in(select(ledger_studies.c.study_key))
                )
            ).all()
        return {str(k): str(e) for k, e in rows}

    def results(self) -> list[tuple[str, ScreeningResult]]:
        """Every recorded study in the order it finished."""
        with self._db.read() as conn:
            rows = conn.execute(
                select(ledger_studies.c.study_key, ledger_studies.c.result_json).order_by(column("rowid"))
            ).all()
        return [(str(k), ScreeningResult.model_validate_json(j)) for k, j in rows]

    def count(self) -> int:
        with self._db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(ledger_studies)).scalar_one())

    def close(self) -> None:
        self._db.close()
