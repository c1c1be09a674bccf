"""Durable outbox: every result is committed before any delivery, each sink retries on its own.

Rows live in the results database (``deliveries``, ``delivery_audit`` in
``serving.persistence.schema``) and are written in the same transaction as the result
(``ResultsStore.finish_job``), so a crash can lose neither. A worker *claims* due rows before
sending: the claim moves their ``next_at`` one lease into the future in the same transaction
that selected them (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so several workers (replicas,
hosts sharing one PostgreSQL) never send the same delivery at once, and a worker that dies
mid-send leaves rows that fall due again when the lease runs out. Each worker delivers its
claimed rows in order, one at a time, and renews the lease of the rows it still holds every
third of it (``renew``), so the lease can be short (``results.delivery_lease_s``, 30 s): a
dead worker's rows go to another soon, a slow but live one keeps its rows. A retryable failure
backs off exponentially with jitter ("equal jitter": half the capped exponential delay plus a random part of the other half, so
rows that failed together do not all come due together, and none retries at once); a permanent
one (HL7 AR, FHIR 4xx) goes to the dead-letter list for ``dxassist outbox retry``. Every attempt
leaves an audit row. Receivers deduplicate by the stable keys each sink uses (FHIR resource ids,
HL7 MSH-10 = the delivery id), so a re-send is harmless.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import func, insert, select, update

from serving.persistence.migrate import open_migrated
from serving.persistence.schema import deliveries, delivery_audit
from serving.settings import DELIVERY_LEASE_S

logger = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    """The timestamp format of the results database (compared as text)."""
    return moment.isoformat(timespec="milliseconds")


def backoff_s(attempts: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempts`` (1 = after the first failure): equal jitter over
    ``min(cap, base * 2**(attempts-1))``, so between half and all of the capped delay."""
    ceiling = min(cap_s, base_s * 2.0 ** max(0, min(attempts - 1, 62)))
    return float(ceiling / 2 + (rng or random).uniform(0, ceiling / 2))


@dataclass(frozen=True)
class OutboxStatus:
    pending: int
    done: int
    dead: int
    by_sink: dict[str, dict[str, int]]


class Outbox:
    """Reads and updates the deliveries of a results database (its own connection pool).

    ``target`` is the SQLite file or the ``postgresql://`` URL of the results database."""

    def __init__(
        self,
        target: Path | str,
        *,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 300.0,
        lease_s: float = DELIVERY_LEASE_S,
    ) -> None:
        self._db = open_migrated(target)
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.lease_s = lease_s

    def claim(self, limit: int = 50) -> list[tuple[int, int, str, int]]:
        """Take due pending rows for this worker: (delivery id, screening id, sink, attempts),
        oldest first. Until ``mark`` or the lease runs out, no other worker sees them."""
        now = _now()
        due = (
            select(deliveries.c.id, deliveries.c.screening_id, deliveries.c.sink, deliveries.c.attempts)
            .where(deliveries.c.status == "PENDING", deliveries.c.next_at <= _iso(now))
            .order_by(deliveries.c.id)
            .limit(limit)
        )
        if self._db.dialect == "postgresql":
            due = due.with_for_update(skip_locked=True)
        with self._db.write() as conn:
            rows = conn.execute(due).all()
            if rows:
                lease_end = _iso(now + timedelta(seconds=self.lease_s))
                conn.execute(
                    update(deliveries).where(deliveries.c.id.in_([r[0] for r in rows])).values(next_at=lease_end)
                )
        return [(int(a), int(b), str(c), int(d)) for a, b, c, d in rows]

    def renew(self, delivery_ids: list[int]) -> None:
        """Extend the lease of rows this worker claimed and has not sent yet (those still
        pending): one more ``lease_s`` from now."""
        if not delivery_ids:
            return
        lease_end = _iso(_now() + timedelta(seconds=self.lease_s))
        with self._db.write() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id.in_(delivery_ids), deliveries.c.status == "PENDING")
                .values(next_at=lease_end)
            )

    def mark(self, delivery_id: int, sink: str, attempts: int, outcome: str, detail: str | None = None) -> None:
        now = _now()
        if outcome == "DELIVERED":
            status, next_at = "DONE", now
        elif outcome == "DEAD":
            status, next_at = "DEAD", now
        else:
            status = "PENDING"
            next_at = now + timedelta(seconds=backoff_s(attempts, self.base_backoff_s, self.max_backoff_s))
        with self._db.write() as conn:
            conn.execute(
                update(deliveries)
                .where(deliveries.c.id == delivery_id)
                .values(
                    status=status, attempts=attempts, next_at=_iso(next_at), last_error=detail, updated_at=_iso(now)
                )
            )
            conn.execute(
                insert(delivery_audit).values(
                    delivery_id=delivery_id, sink=sink, attempt=attempts, outcome=outcome, detail=detail, at=_iso(now)
                )
            )

    def status(self) -> OutboxStatus:
        with self._db.read() as conn:
            rows = conn.execute(
                select(deliveries.c.sink, deliveries.c.status, func.count())
                .group_by(deliveries.c.sink, deliveries.c.status)
                .order_by(deliveries.c.sink, deliveries.c.status)
            ).all()
        by_sink: dict[str, dict[str, int]] = {}
        for sink, status, n in rows:
            by_sink.setdefault(sink, {})[status] = int(n)
        total = {s: sum(v.get(s, 0) for v in by_sink.values()) for s in ("PENDING", "DONE", "DEAD")}
        return OutboxStatus(total["PENDING"], total["DONE"], total["DEAD"], by_sink)

    def dead(self) -> list[tuple[int, str, str | None]]:
        with self._db.read() as conn:
            rows = conn.execute(
                select(deliveries.c.id, deliveries.c.sink, deliveries.c.last_error)
                .where(deliveries.c.status == "DEAD")
                .order_by(deliveries.c.id)
            ).all()
        return [(int(i), str(sink), error) for i, sink, error in rows]

    def retry_dead(self, ids: list[int] | None = None) -> int:
        """Put dead-lettered deliveries back in the queue (all, or the given ids)."""
        query = update(deliveries).where(deliveries.c.status == "DEAD")
        if ids:
            query = query.where(deliveries.c.id.in_(ids))
        with self._db.write() as conn:
            return int(conn.execute(query.values(status="PENDING", next_at=_iso(_now()))).rowcount)

    def due_now(self) -> int:
        """Make every pending delivery due now (the receiver is back: do not wait out the backoff).
        Claimed rows are included: their sender may be gone; receivers deduplicate a re-send."""
        with self._db.write() as conn:
            return int(
                conn.execute(
                    update(deliveries).where(deliveries.c.status == "PENDING").values(next_at=_iso(_now()))
                ).rowcount
            )

    def audit_count(self, outcome: str | None = None) -> int:
        query = select(func.count()).select_from(delivery_audit)
        if outcome:
            query = query.where(delivery_audit.c.outcome == outcome)
        with self._db.read() as conn:
            return int(conn.execute(query).scalar_one())

    def close(self) -> None:
        self._db.close()
