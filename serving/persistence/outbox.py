"""Durable outbox: every result is committed before any delivery, each sink retries on its own.

Rows live in the results database (SQLite by default, PostgreSQL when configured; see
``serving.persistence.database``) and are written in the same transaction as the result
(``ResultsStore.finish_job``), so a crash can lose neither. A worker *claims* due rows before
sending: the claim moves their ``next_at`` one lease into the future in the same transaction
that selected them (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so several workers (replicas,
hosts sharing one PostgreSQL) never send the same delivery at once, and a worker that dies
mid-send leaves rows that fall due again when the lease runs out. Each worker delivers its
claimed rows in order, one at a time. A retryable failure backs off exponentially; a
permanent one (HL7 AR, FHIR 4xx) goes to the dead-letter list for ``dxassist outbox retry``.
Every attempt leaves an audit row. Receivers deduplicate by the stable keys each sink uses
(FHIR resource ids, HL7 MSH-10 = the delivery id), so a re-send is harmless.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from serving.persistence.database import Database

logger = logging.getLogger(__name__)

SCHEMA = """
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


_DUE_SQLITE = (
    "SELECT id, screening_id, sink, attempts FROM deliveries WHERE status = 'PENDING' AND next_at <= ?"
    " ORDER BY id LIMIT ?"
)
_DUE_POSTGRES = _DUE_SQLITE + " FOR UPDATE SKIP LOCKED"


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    """The timestamp format of the results database (compared as text)."""
    return moment.isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class OutboxStatus:
    pending: int
    done: int
    dead: int
    by_sink: dict[str, dict[str, int]]


class Outbox:
    """Reads and updates the deliveries of a results database (its own connection).

    ``target`` is the SQLite file or the ``postgresql://`` URL of the results database."""

    def __init__(
        self,
        target: Path | str,
        *,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        lease_s: float = 120.0,
    ) -> None:
        self._db = Database(target)
        self._lock = self._db.lock
        self._db.create_schema(SCHEMA)
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.lease_s = lease_s

    def claim(self, limit: int = 50) -> list[tuple[int, int, str, int]]:
        """Take due pending rows for this worker: (delivery id, screening id, sink, attempts),
        oldest first. Until ``mark`` or the lease runs out, no other worker sees them."""
        now = _now()
        select = _DUE_POSTGRES if self._db.dialect == "postgresql" else _DUE_SQLITE
        with self._db.transaction() as db:
            rows = db.execute(select, (_iso(now), limit)).fetchall()
            lease_end = _iso(now + timedelta(seconds=self.lease_s))
            for row in rows:
                db.execute("UPDATE deliveries SET next_at = ? WHERE id = ?", (lease_end, row[0]))
        return [(int(a), int(b), str(c), int(d)) for a, b, c, d in rows]

    def _audit(self, delivery_id: int, sink: str, attempt: int, outcome: str, detail: str | None) -> None:
        self._db.execute(
            "INSERT INTO delivery_audit (delivery_id, sink, attempt, outcome, detail, at) VALUES (?, ?, ?, ?, ?, ?)",
            (delivery_id, sink, attempt, outcome, detail, _iso(_now())),
        )

    def mark(self, delivery_id: int, sink: str, attempts: int, outcome: str, detail: str | None = None) -> None:
        now = _now()
        if outcome == "DELIVERED":
            status, next_at = "DONE", now
        elif outcome == "DEAD":
            status, next_at = "DEAD", now
        else:
            status = "PENDING"
            next_at = now + timedelta(seconds=min(self.max_backoff_s, self.base_backoff_s * 2 ** (attempts - 1)))
        with self._db.transaction() as db:
            db.execute(
                "UPDATE deliveries SET status = ?, attempts = ?, next_at = ?, last_error = ?, updated_at = ?"
                " WHERE id = ?",
                (status, attempts, _iso(next_at), detail, _iso(now), delivery_id),
            )
            self._audit(delivery_id, sink, attempts, outcome, detail)

    def status(self) -> OutboxStatus:
        with self._lock:
            rows = self._db.execute(
                "SELECT sink, status, COUNT(*) FROM deliveries GROUP BY sink, status ORDER BY sink, status"
            ).fetchall()
        by_sink: dict[str, dict[str, int]] = {}
        for sink, status, n in rows:
            by_sink.setdefault(sink, {})[status] = n
        total = {s: sum(v.get(s, 0) for v in by_sink.values()) for s in ("PENDING", "DONE", "DEAD")}
        return OutboxStatus(total["PENDING"], total["DONE"], total["DEAD"], by_sink)

    def dead(self) -> list[tuple[int, str, str | None]]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, sink, last_error FROM deliveries WHERE status = 'DEAD' ORDER BY id"
            ).fetchall()
        return [(int(i), str(sink), error) for i, sink, error in rows]

    def retry_dead(self, ids: list[int] | None = None) -> int:
        """Put dead-lettered deliveries back in the queue (all, or the given ids)."""
        with self._lock:
            if ids:
                marks = ", ".join("?" * len(ids))
                cur = self._db.execute(
                    f"UPDATE deliveries SET status = 'PENDING', next_at = ? WHERE status = 'DEAD' AND id IN ({marks})",  # noqa: S608
                    (_iso(_now()), *ids),
                )
            else:
                cur = self._db.execute(
                    "UPDATE deliveries SET status = 'PENDING', next_at = ? WHERE status = 'DEAD'", (_iso(_now()),)
                )
        return int(cur.rowcount)

    def audit_count(self, outcome: str | None = None) -> int:
        with self._lock:
            if outcome:
                return int(
                    self._db.execute("SELECT COUNT(*) FROM delivery_audit WHERE outcome = ?", (outcome,)).fetchone()[0]
                )
            return int(self._db.execute("SELECT COUNT(*) FROM delivery_audit").fetchone()[0])

    def close(self) -> None:
        self._db.close()
