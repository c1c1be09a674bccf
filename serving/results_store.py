"""The embedded default results store: SQLite (WAL), one row per screening, JSON result body.

The database holds PHI (it is the clinical record of what the AI said) and lives with the
other PHI stores; nothing from it is logged.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path

from models.results import ScreeningResult

_SCHEMA = """
CREATE TABLE IF NOT EXISTS screenings (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
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
"""


class ResultsStore:
    """Append-only record of screening results. Thread-safe (one connection, a lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def save(self, result: ScreeningResult) -> int:
        """Commit a result (durable before return); returns its row id."""
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO screenings (created_at, study_instance_uid, study_ref, outcome, reason, priority, models,"
                " result_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    datetime.now(UTC).isoformat(timespec="milliseconds"),
                    result.study_instance_uid,
                    result.study_ref,
                    result.outcome.value,
                    result.reason.value if result.reason else None,
                    result.priority.value if result.priority else None,
                    ",".join(result.models),
                    result.model_dump_json(),
                ),
            )
            return int(cur.lastrowid or 0)

    def latest(self, study_instance_uid: str) -> ScreeningResult | None:
        with self._lock:
            row = self._db.execute(
                "SELECT result_json FROM screenings WHERE study_instance_uid = ? ORDER BY id DESC LIMIT 1",
                (study_instance_uid,),
            ).fetchone()
        return ScreeningResult.model_validate_json(row[0]) if row else None

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM screenings").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
