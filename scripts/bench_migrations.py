"""What migrations cost on SQLite: opening an up-to-date results database (every service, CLI and
batch start) against the old ``CREATE TABLE IF NOT EXISTS`` open measured in the same run, and
upgrading an old database with N screenings (the backfill of 0002 is per row).

    .venv/bin/python scripts/bench_migrations.py [N]
"""

from __future__ import annotations

import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

from models.results import ScreeningResult
from serving.persistence.outbox import Outbox
from serving.persistence.results import ResultsStore
from tests.integration.test_results_database import _OLD_TYPES, OLD_DDL


def old_open(path: Path) -> None:
    """What the pre-migration stores did on open (both of them)."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    for statement in OLD_DDL.format(**_OLD_TYPES["sqlite"]).split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.close()


def timed(fn: object, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main(rows: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="dxassist-bench-migrations-"))
    old_path, new_path = work / "old.sqlite3", work / "new.sqlite3"
    old_open(old_path)
    ResultsStore(new_path).close()

    def open_new() -> None:
        ResultsStore(new_path).close()
        Outbox(new_path).close()

    baseline = timed(lambda: old_open(old_path), 20)
    current = timed(open_new, 20)
    print(
        f"open (both stores), up to date: {current * 1000:.1f} ms; old CREATE IF NOT EXISTS open: "
        f"{baseline * 1000:.1f} ms; ratio {current / baseline:.1f}x"
    )

    legacy = work / "legacy.sqlite3"
    old_open(legacy)
    result = ScreeningResult(study_instance_uid="1.2.3", study_ref="r", outcome="SCREENED").model_dump_json()
    conn = sqlite3.connect(legacy)
    conn.executemany(
        "INSERT INTO screenings (created_at, study_instance_uid, study_ref, outcome, models, result_json)"
        " VALUES (?, ?, ?, 'SCREENED', '', ?)",
        [("2026-11-30T10:00:00.000+00:00", f"1.2.{i}", f"r{i}", result) for i in range(rows)],
    )
    conn.executemany(
        "INSERT INTO jobs (id, created_at, updated_at, priority, status, study_instance_uid, screening_id)"
        " VALUES (?, ?, ?, 'routine', 'DONE', ?, ?)",
        [(f"job{i}", "t", "t", f"1.2.{i}", i + 1) for i in range(0, rows, 2)],
    )
    conn.commit()
    conn.close()
    start = time.perf_counter()
    store = ResultsStore(legacy)
    elapsed = time.perf_counter() - start
    assert store.count() == rows
    store.close()
    print(
        f"upgrade of an old database with {rows} screenings ({rows // 2} with a job): {elapsed:.2f} s "
        f"({elapsed / rows * 1e6:.0f} us per screening)"
    )


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20000)
