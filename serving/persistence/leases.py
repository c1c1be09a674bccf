"""Leader leases: roles that run once per cluster (the C-STORE SCP, the QIDO-RS poller), elected
through the results database.

A role is one row of ``leases`` (``serving.persistence.schema``): its holder and when its lease
ends. ``acquire`` takes the role when nobody holds it or its lease has run out, or renews it for
the holder, in one write transaction (``SELECT ... FOR UPDATE`` on PostgreSQL, ``BEGIN
IMMEDIATE`` on SQLite), so two processes never both believe they hold a role whose lease they
just wrote. A holder that stops renewing (crashed, partitioned from the database) loses the role
when its lease ends; another process takes it over then, and ``term`` counts the hand-overs. A
holder that fails to renew stops the role itself before its lease can have run out (the caller
renews at a third of the lease: ``LeaderElection`` in ``serving.online.service``).

Times are the database host's clock seen by each process as ISO text (like the outbox leases): the
hosts' clocks are assumed to agree to well within a lease (NTP).

Holders are named ``host:pid:random`` (``new_holder``). A process restarted on the same host (a
replica Ray replaced after ``kill -9``, a service restarted by systemd) need not wait out its
predecessor's leases: ``holder_is_dead`` recognises a holder of this host whose process is gone
(the same rule serves job claims in ``serving.persistence.results``). A reused pid only makes it
wait for the lease, never take over a live holder.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy import insert, select, update

from models.errors import ResultsConflict
from serving.persistence.migrate import open_migrated
from serving.persistence.schema import leases


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


_HOST = socket.gethostname()[:40].replace(":", "-")
_LIVE: set[str] = set()  # holders alive in this process (several services may share one)
_LIVE_LOCK = threading.Lock()


def new_holder() -> str:
    """A new holder name for this process (``host:pid:random``), alive until ``retire_holder``."""
    holder = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with _LIVE_LOCK:
        _LIVE.add(holder)
    return holder


def retire_holder(holder: str) -> None:
    with _LIVE_LOCK:
        _LIVE.discard(holder)


def holder_is_dead(holder: str) -> bool:
    """True only when ``holder`` certainly is gone: of this host, and its process is not running
    (or it is this process, which no longer runs it). Other hosts' holders: never (their leases
    run out instead)."""
    host, _, rest = holder.partition(":")
    pid_text, _, _suffix = rest.partition(":")
    if host != _HOST or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        with _LIVE_LOCK:
            return holder not in _LIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists under another user: alive
        return False
    return False


@dataclass(frozen=True)
class LeaseHolder:
    name: str
    holder: str
    expires_at: str
    term: int


class Leases:
    """Acquire, renew, release and read role leases (its own connection pool)."""

    def __init__(self, target: Path | str) -> None:
        self._db = open_migrated(target)

    def acquire(
        self, name: str, holder: str, lease_s: float, *, is_dead: Callable[[str], bool] = holder_is_dead
    ) -> bool:
        """Take or renew ``name`` for ``holder`` for ``lease_s`` seconds; False while another
        holder's lease runs and that holder is not known dead (``is_dead``)."""
        now = datetime.now(UTC)
        until = _iso(now + timedelta(seconds=lease_s))
        current = select(leases.c.holder, leases.c.expires_at, leases.c.term).where(leases.c.name == name)
        if self._db.dialect == "postgresql":
            current = current.with_for_update()
        try:
            with self._db.write() as conn:
                row = conn.execute(current).first()
                if row is None:
                    conn.execute(
                        insert(leases).values(name=name, holder=holder, expires_at=until, acquired_at=_iso(now), term=1)
                    )
                    return True
                if row[0] == holder:
                    conn.execute(update(leases).where(leases.c.name == name).values(expires_at=until))
                    return True
                if str(row[1]) > _iso(now) and not is_dead(str(row[0])):
                    return False
                conn.execute(
                    update(leases)
                    .where(leases.c.name == name)
                    .values(holder=holder, expires_at=until, acquired_at=_iso(now), term=int(row[2]) + 1)
                )
                return True
        except ResultsConflict:  # another process inserted the first row at the same moment: it holds it
            return False

    def release(self, name: str, holder: str) -> None:
        """Give the role up now (drain): another process takes it at its next attempt."""
        with self._db.write() as conn:
            conn.execute(
                update(leases)
                .where(leases.c.name == name, leases.c.holder == holder)
                .values(expires_at=_iso(datetime.now(UTC) - timedelta(milliseconds=1)))
            )

    def holder(self, name: str) -> LeaseHolder | None:
        """Who holds ``name`` (also an expired lease: its last holder)."""
        with self._db.read() as conn:
            row = conn.execute(
                select(leases.c.holder, leases.c.expires_at, leases.c.term).where(leases.c.name == name)
            ).first()
        return LeaseHolder(name, str(row[0]), str(row[1]), int(row[2])) if row else None

    def close(self) -> None:
        self._db.close()
