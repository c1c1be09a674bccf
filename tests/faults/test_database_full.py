"""Fault: the results database cannot be written (the file may not grow: a full disk as SQLite
sees it) while screenings run and new ones arrive. In process, real SQLite, real model.

The fault is the kernel's: ``RLIMIT_FSIZE`` at the database's current size makes every write
that would grow the database or its WAL fail (EFBIG, SIGXFSZ ignored), exactly as a full
filesystem does for SQLite. Lifting the limit is the operator freeing space.
"""

from __future__ import annotations

import resource
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from models.predictor import OnnxPredictor
from tests.conftest import write_synthetic_cxr
from tests.faults.tally import Tally
from tests.serving.test_api import running, uid_of


@contextmanager
def database_cannot_grow(db: Path) -> Iterator[None]:
    """No file written by this process may grow past the database's WAL as it is now."""
    wal = db.with_name(db.name + "-wal")
    limit = max(wal.stat().st_size if wal.exists() else 0, 1)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous_handler)


@pytest.fixture
def studies(tmp_path: Path) -> Path:
    for seed in range(6):
        write_synthetic_cxr(tmp_path / "store" / f"d{seed}.dcm", seed=500 + seed)
    return tmp_path / "store"


def test_database_full_jobs_are_retried_never_left_running_and_answers_are_typed(
    tmp_path: Path, predictor: OnnxPredictor, studies: Path
) -> None:
    """Findings: with the results database full, jobs stayed RUNNING/QUEUED with no error until a
    restart and /readyz said ready; a failing database gave a plain 500 without Retry-After."""
    db = tmp_path / "results.sqlite3"
    uids = [uid_of(p) for p in sorted(studies.glob("*.dcm"))]
    tally = Tally()
    with running(tmp_path, predictor, studies, gate=True, db=db, max_inflight=2) as (client, pipe):
        for uid in uids[:3]:  # accepted before the fault: held in flight / queued by the gate
            tally.submitted += 1
            answer = client.post("/v1/screenings", json={"study_instance_uid": uid})
            assert answer.status_code == 202
            tally.accepted.append(answer.json()["screening_id"])
        assert client.get("/readyz").json()["checks"]["database"] == "ok"
        with database_cannot_grow(db):
            client.portal.call(pipe().gate.set)  # type: ignore[union-attr]  # screenings end now...
            deadline = time.monotonic() + 20
            while (ready := client.get("/readyz")).status_code == 200:  # ...and their results cannot be written
                assert time.monotonic() < deadline, "readiness never noticed the failing writes"
                time.sleep(0.05)
            assert ready.json()["checks"]["database"].startswith("writes failing")
            for uid in uids[3:]:
                tally.submitted += 1
                refused = client.post("/v1/screenings", json={"study_instance_uid": uid})
                assert refused.status_code == 503, refused.text
                assert refused.json()["reason"] == "RESULTS_DATABASE_UNAVAILABLE"
                assert int(refused.headers["Retry-After"]) >= 1
                tally.refused += 1
            time.sleep(0.5)  # a few retry rounds against the full database
        # space is back: the held results are written by the retries, nothing restarts
        deadline = time.monotonic() + 30
        while any(client.get(f"/v1/screenings/{j}").json()["status"] != "DONE" for j in tally.accepted):
            assert time.monotonic() < deadline, "jobs left unfinished after the database recovered"
            time.sleep(0.05)
        assert client.get("/readyz").status_code == 200
    tally.settle(db)
    print(tally.line("database full"))
    assert (tally.lost, tally.duplicated, tally.done) == (0, 0, 3)


def test_locked_database_answers_503_with_retry_after(tmp_path: Path, predictor: OnnxPredictor, studies: Path) -> None:
    """Finding: a locked results database gave a plain 500 without Retry-After. Another process
    holds the write lock (``BEGIN EXCLUSIVE`` on a second connection) past the busy timeout."""
    import sqlite3

    db = tmp_path / "results.sqlite3"
    uids = [uid_of(p) for p in sorted(studies.glob("*.dcm"))]
    with running(tmp_path, predictor, studies, db=db) as (client, _):
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            locked = client.post("/v1/screenings", json={"study_instance_uid": uids[0]})
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert locked.status_code == 503, locked.text
        assert locked.json()["reason"] == "RESULTS_DATABASE_UNAVAILABLE" and int(locked.headers["Retry-After"]) >= 1
        accepted = client.post("/v1/screenings", json={"study_instance_uid": uids[0]})
        assert accepted.status_code == 202
        deadline = time.monotonic() + 30
        while client.get(f"/v1/screenings/{accepted.json()['screening_id']}").json()["status"] != "DONE":
            assert time.monotonic() < deadline
            time.sleep(0.05)
