"""An upload whose client waits is screened before its admission commits (ADR 0026): one durable
commit with its result when it ends in time, admitted at the deadline when it does not, never a
job id before the job is durable. Real SQLite (a trigger counts what reaches ``uploads``), real
model sessions, the real API."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import httpx
import pydicom
import pytest

from models.predictor import OnnxPredictor
from serving.persistence.results import ResultsStore
from tests.serving.test_api import running, wait_for


def counting_uploads(db: Path) -> None:
    """A migrated database whose ``uploads`` inserts are counted in ``kept`` (by SQLite itself)."""
    ResultsStore(db)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE kept (job_id TEXT)")
        conn.execute(
            "CREATE TRIGGER count_kept AFTER INSERT ON uploads BEGIN INSERT INTO kept VALUES (new.job_id); END"
        )


def query(db: Path, sql: str, *args: object) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, args).fetchall()


def upload(client: object, path: Path, **params: object) -> httpx.Response:
    files = [("files", ("a.dcm", path.read_bytes(), "application/dicom"))]
    return client.post("/v1/screenings/upload", files=files, params=params)  # type: ignore[attr-defined]


def test_waited_upload_commits_once_with_its_result_and_never_keeps_its_instances(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    db = tmp_path / "results.sqlite3"
    counting_uploads(db)
    with running(tmp_path, predictor, store_dir, db=db) as (client, _):
        waited = upload(client, store_dir / "s41.dcm", wait=20)
        assert waited.status_code == 202 and waited.json()["status"] == "DONE"
        job = waited.json()["screening_id"]
        assert waited.json()["result"]["outcome"] == "SCREENED"
        assert waited.headers["location"] == f"/v1/screenings/{job}"
        # the contrast: a client that does not wait gets its 202 at once, so the job (with its
        # instances) must be durable before the screening starts
        queued = upload(client, store_dir / "s42.dcm")
        assert wait_for(client, queued.json()["screening_id"])["status"] == "DONE"
    assert query(db, "SELECT job_id FROM kept") == [(queued.json()["screening_id"],)]
    assert query(db, "SELECT status, source FROM jobs WHERE id = ?", job) == [("DONE", "upload")]
    assert query(db, "SELECT action FROM audit_log WHERE screening_id = ?", job) == [("upload",)]
    assert query(db, "SELECT COUNT(*) FROM screenings WHERE screening_uuid = ?", job) == [(1,)]
    assert query(db, "SELECT COUNT(*) FROM uploads") == [(0,)]
    assert not any((tmp_path / "spool").iterdir())


def test_screening_past_the_deadline_is_admitted_then_and_finishes(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    db = tmp_path / "results.sqlite3"
    counting_uploads(db)
    with running(tmp_path, predictor, store_dir, gate=True, db=db, screen_before_ack_s=0.2) as (client, pipe):
        # the gate holds the screening: after 0.2 s the job is admitted (claimed here, instances
        # kept) and the 202 names it; the body comes when the wait (0.6 s) runs out
        held = upload(client, store_dir / "s43.dcm", wait=0.6)
        assert held.status_code == 202 and held.json()["status"] in ("QUEUED", "RUNNING")
        job = held.json()["screening_id"]
        assert len(pipe().order) == 1  # screened once: not admitted and then screened again
        assert query(db, "SELECT job_id FROM kept") == [(job,)]
        client.portal.call(pipe().gate.set)  # type: ignore[union-attr]
        done = wait_for(client, job)
        assert done["status"] == "DONE" and done["result"]["outcome"] == "SCREENED"
        assert len(pipe().order) == 1
    assert query(db, "SELECT COUNT(*) FROM screenings WHERE screening_uuid = ?", job) == [(1,)]
    assert query(db, "SELECT COUNT(*) FROM uploads") == [(0,)]


def test_retried_idempotency_key_answers_the_first_job_without_screening_again(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    db = tmp_path / "results.sqlite3"
    with running(tmp_path, predictor, store_dir, db=db) as (client, pipe):
        key = {"Idempotency-Key": "retry-7"}
        files = [("files", ("a.dcm", (store_dir / "s44.dcm").read_bytes(), "application/dicom"))]
        first = client.post("/v1/screenings/upload", files=files, params={"wait": 20}, headers=key)
        again = client.post("/v1/screenings/upload", files=files, params={"wait": 20}, headers=key)
        assert first.json()["status"] == again.json()["status"] == "DONE"
        assert again.json()["screening_id"] == first.json()["screening_id"]
        assert len(pipe().order) == 1
        other = [("files", ("a.dcm", (store_dir / "s45.dcm").read_bytes(), "application/dicom"))]
        reused = client.post("/v1/screenings/upload", files=other, params={"wait": 20}, headers=key)
        assert reused.status_code == 422 and len(pipe().order) == 1
    assert query(db, "SELECT COUNT(*) FROM screenings") == [(1,)]


def test_commit_refused_answers_503_and_accepts_nothing(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Screened, then the database refuses the one commit (another process holds its write lock
    past the busy timeout): the client is told to retry, and no job, result or delivery exists."""
    db = tmp_path / "results.sqlite3"
    with running(tmp_path, predictor, store_dir, db=db) as (client, pipe):
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            refused = upload(client, store_dir / "s41.dcm", wait=20)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert refused.status_code == 503 and refused.json()["reason"] == "RESULTS_DATABASE_UNAVAILABLE"
        assert len(pipe().order) == 1  # it was screened: the refusal came at the commit
        assert query(db, "SELECT COUNT(*) FROM jobs") == [(0,)]
        assert query(db, "SELECT COUNT(*) FROM screenings") == [(0,)]
        accepted = upload(client, store_dir / "s41.dcm", wait=20)
        assert accepted.status_code == 202 and accepted.json()["status"] == "DONE"


def test_waited_uploads_beyond_the_free_slots_queue_as_before(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Screening before admission takes a free slot or nothing: with every slot busy the upload is
    admitted first (durable, instances kept) and waits its turn in the queue."""
    db = tmp_path / "results.sqlite3"
    counting_uploads(db)
    with running(tmp_path, predictor, store_dir, gate=True, db=db, max_inflight=1) as (client, pipe):
        answers: dict[str, httpx.Response] = {}

        def send(name: str) -> None:
            answers[name] = upload(client, store_dir / f"{name}.dcm", wait=20)

        first = threading.Thread(target=send, args=("s41",))
        first.start()
        while not pipe().order:
            threading.Event().wait(0.01)  # s41 holds the only slot, screening before admission
        queued = upload(client, store_dir / "s42.dcm", wait=0.3)
        assert queued.status_code == 202 and queued.json()["status"] == "QUEUED"
        assert query(db, "SELECT job_id FROM kept") == [(queued.json()["screening_id"],)]
        client.portal.call(pipe().gate.set)  # type: ignore[union-attr]
        first.join(30)
        assert answers["s41"].json()["status"] == "DONE"
        assert wait_for(client, queued.json()["screening_id"])["status"] == "DONE"


def test_a_waiting_upload_takes_the_next_free_slot_and_stat_passes_it(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """With every routine slot busy, a waiting client's upload stays in memory and is screened in
    the next slot that frees up within ``api.screen_before_ack_s`` (still one commit, nothing
    kept in the database); a stat upload takes the slot kept for stat at once, ahead of it."""
    db = tmp_path / "results.sqlite3"
    counting_uploads(db)
    with running(tmp_path, predictor, store_dir, gate=True, db=db, max_inflight=2, screen_before_ack_s=20) as (
        client,
        pipe,
    ):
        answers: dict[str, httpx.Response] = {}

        def send(name: str, **params: object) -> threading.Thread:
            def go() -> None:
                answers[name] = upload(client, store_dir / f"{name}.dcm", wait=30, **params)

            thread = threading.Thread(target=go)
            thread.start()
            return thread

        def screened(n: int) -> None:
            for _ in range(500):
                if len(pipe().order) >= n:
                    return
                threading.Event().wait(0.01)
            raise AssertionError(f"{n} screenings expected, saw {pipe().order}")

        threads = [send("s41")]
        screened(1)  # s41 holds the one routine slot
        threads.append(send("s42"))  # waits for a slot, in memory
        threading.Event().wait(0.3)
        threads.append(send("s43", priority="stat"))
        screened(2)
        uid = {
            name: str(pydicom.dcmread(store_dir / f"{name}.dcm", stop_before_pixels=True).StudyInstanceUID)
            for name in ("s41", "s42", "s43")
        }
        assert pipe().order == [uid["s41"], uid["s43"]]  # stat went past the waiting routine upload
        assert query(db, "SELECT COUNT(*) FROM jobs") == [(0,)]  # nothing admitted yet: all in memory
        client.portal.call(pipe().gate.set)  # type: ignore[union-attr]
        for thread in threads:
            thread.join(30)
        assert pipe().order == [uid["s41"], uid["s43"], uid["s42"]]
        assert {answers[n].json()["status"] for n in ("s41", "s42", "s43")} == {"DONE"}
    assert query(db, "SELECT COUNT(*) FROM kept") == [(0,)]  # each one commit, no instances kept
    assert query(db, "SELECT COUNT(*) FROM jobs WHERE status = 'DONE'") == [(3,)]


def test_an_unexpected_error_before_the_commit_answers_the_client_never_hangs_it(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever escapes the screening before its commit (here a bug's RuntimeError) reaches the
    waiting client as an error at once, and nothing is admitted."""
    from serving.online.service import ScreeningService

    async def broken(self: ScreeningService, job: object) -> object:
        raise RuntimeError("a bug")

    db = tmp_path / "results.sqlite3"
    monkeypatch.setattr(ScreeningService, "_screen_to_end", broken)
    with running(tmp_path, predictor, store_dir, db=db) as (client, _):
        with pytest.raises(RuntimeError, match="a bug"):  # the test client re-raises the server's error
            upload(client, store_dir / "s41.dcm", wait=20)
    assert query(db, "SELECT COUNT(*) FROM jobs") == [(0,)]
