"""The results store and the outbox behave the same on SQLite (default) and PostgreSQL (a real
server from Debian's packages, started by the ``postgres`` fixture)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from models.errors import ResultsConflict, ResultsDatabaseError
from models.predictor import OnnxPredictor
from models.results import ScreeningResult
from serving.core.screening import StudyScreener, screen_paths
from serving.persistence.outbox import Outbox
from serving.persistence.results import Provenance, ResultsStore
from serving.persistence.schema import SourceValues, TriggerValues
from tests.conftest import write_synthetic_cxr
from tests.integration.conftest import PostgresServer

pytestmark = pytest.mark.integration
FROM_PACS = Provenance(SourceValues.PACS_FETCH, TriggerValues.API, "token:test")


@pytest.fixture
def one_result(predictor: OnnxPredictor, tmp_path: Path) -> ScreeningResult:
    path = write_synthetic_cxr(tmp_path / "a.dcm", seed=41)
    return screen_paths(StudyScreener([predictor], study_ref_key=b"k"), [path])[0]


def test_result_evidence_and_deliveries_commit_together(
    results_db: Path | str, one_result: ScreeningResult, tmp_path: Path
) -> None:
    store = ResultsStore(results_db)
    uid = one_result.study_instance_uid
    store.add_job("job-1", "routine", uid, None, provenance=FROM_PACS, dedupe_key=uid)
    header = dcmread(write_synthetic_cxr(tmp_path / "h.dcm", seed=1), stop_before_pixels=True)
    screening_id = store.finish_job("job-1", one_result, evidence=[header], sinks=["fhir", "hl7"])

    job = store.job("job-1")
    assert job is not None and job.status == "DONE" and job.screening_id == screening_id
    loaded = store.for_delivery(screening_id)
    assert loaded is not None
    result, evidence = loaded
    assert result == one_result
    assert [e.SOPInstanceUID for e in evidence] == [header.SOPInstanceUID]
    assert store.latest(one_result.study_instance_uid) == one_result
    assert store.has_screening_for(one_result.study_instance_uid)
    outbox = Outbox(results_db)
    assert outbox.status().pending == 2
    store.close()
    outbox.close()


def test_a_failed_finish_leaves_neither_result_nor_delivery(
    results_db: Path | str, one_result: ScreeningResult
) -> None:
    store = ResultsStore(results_db)
    store.add_job("job-1", "ROUTINE", one_result.study_instance_uid, None)
    with pytest.raises(ResultsConflict) as raised:  # the second "fhir" row violates UNIQUE(screening, sink)
        store.finish_job("job-1", one_result, sinks=["fhir", "fhir"])
    assert one_result.study_instance_uid not in str(raised.value)  # typed, and no parameters quoted
    assert store.count() == 0
    outbox = Outbox(results_db)
    assert outbox.status().pending == 0
    outbox.close()
    job = store.job("job-1")
    assert job is not None and job.status == "QUEUED"  # still to do: a restart screens it again
    store.close()


def _pending(results_db: Path | str, result: ScreeningResult, n: int) -> None:
    store = ResultsStore(results_db)
    for i in range(n):
        store.add_job(f"job-{i}", "ROUTINE", result.study_instance_uid, None)
        store.finish_job(f"job-{i}", result, sinks=["fhir"])
    store.close()


def test_claimed_deliveries_are_hidden_until_marked_or_the_lease_ends(
    results_db: Path | str, one_result: ScreeningResult
) -> None:
    _pending(results_db, one_result, 3)
    first, second = Outbox(results_db, lease_s=0.3), Outbox(results_db, lease_s=0.3)
    taken = first.claim()
    assert len(taken) == 3
    assert second.claim() == []  # another worker does not see rows being sent
    first.mark(taken[0][0], "fhir", 1, "DELIVERED")
    first.mark(taken[1][0], "fhir", 1, "DEAD", "refused")
    time.sleep(0.4)  # the worker holding taken[2] died: its lease runs out
    again = second.claim()
    assert [row[0] for row in again] == [taken[2][0]]
    assert second.status().by_sink["fhir"] == {"DONE": 1, "DEAD": 1, "PENDING": 1}
    assert second.dead() == [(taken[1][0], "fhir", "refused")]
    assert second.retry_dead() == 1
    assert second.audit_count("DELIVERED") == 1 and second.audit_count("DEAD") == 1
    first.close()
    second.close()


def test_concurrent_workers_claim_each_delivery_once(results_db: Path | str, one_result: ScreeningResult) -> None:
    _pending(results_db, one_result, 24)
    workers = [Outbox(results_db) for _ in range(4)]
    claimed: list[list[int]] = [[] for _ in workers]

    def drain(i: int) -> None:
        while rows := workers[i].claim(limit=2):
            claimed[i].extend(r[0] for r in rows)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    every = [d for c in claimed for d in c]
    assert sorted(every) == sorted(set(every)) and len(every) == 24
    for w in workers:
        w.close()


def test_unreachable_postgres_is_a_typed_error_without_the_password(postgres: PostgresServer) -> None:
    url = postgres.url("dxassist_missing").replace(f":{postgres.port}/", ":1/")
    with pytest.raises(ResultsDatabaseError) as raised:
        ResultsStore(url)
    assert "test-only-password" not in str(raised.value)
    assert "unreachable" in str(raised.value)
