"""Counting what a fault did to the work: every fault test ends with the same ledger.

``submitted``: requests sent; ``accepted``: answered 202 with a screening id (the service
owes a result); ``refused``: answered 503 with Retry-After (the client knows to retry);
``unreachable``: no connection (the client knows nothing was sent); ``dropped``: sent, then
no typed answer (a bare 500, a reset): the client cannot tell what happened. After the fault:
``done``: accepted screenings that ended DONE or FAILED with a reason; ``lost``: accepted and
never ended; ``duplicated``: screening records beyond one per accepted request.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Tally:
    submitted: int = 0
    accepted: list[str] = field(default_factory=list)
    refused: int = 0
    unreachable: int = 0
    dropped: int = 0
    #: what each dropped request got: an HTTP status or a transport error's type
    dropped_kinds: list[str] = field(default_factory=list)
    done: int = 0
    lost: int = 0
    duplicated: int = 0

    def line(self, name: str) -> str:
        return (
            f"{name}: submitted {self.submitted}, accepted {len(self.accepted)}, refused {self.refused}, "
            f"unreachable {self.unreachable}, dropped {self.dropped}, done {self.done}, lost {self.lost}, "
            f"duplicated {self.duplicated}"
            + (f" (dropped as {sorted(self.dropped_kinds)})" if self.dropped_kinds else "")
        )

    def settle(self, db: Path) -> None:
        """Count done/lost/duplicated from the results database itself (read-only)."""
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            status = dict(conn.execute("SELECT id, status FROM jobs").fetchall())
            screenings = conn.execute("SELECT COUNT(*) FROM screenings").fetchone()[0]
            per_job = conn.execute("SELECT COUNT(*) FROM jobs WHERE screening_id IS NOT NULL").fetchone()[0]
        ended = {j for j in self.accepted if status.get(j) in ("DONE", "FAILED")}
        self.done = len(ended)
        self.lost = len(set(self.accepted) - ended)
        self.duplicated = screenings - per_job + (len(self.accepted) - len(set(self.accepted)))


def unfinished(db: Path, ids: list[str]) -> list[str]:
    """Accepted jobs not yet DONE/FAILED, read from the database (no API call: nothing wakes
    the service but its own start-up)."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        status = dict(conn.execute("SELECT id, status FROM jobs").fetchall())
    return [j for j in ids if status.get(j) not in ("DONE", "FAILED")]
