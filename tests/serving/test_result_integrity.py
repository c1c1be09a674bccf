"""Result integrity (issue #12) through the HTTP API and the service's triggers, without Ray:
nothing overwrites the PACS result, retries screen once, one dedupe key for every trigger,
strict UIDs, an audit row for every read and write. Real files, real model sessions, real SQLite.

Each test here failed on the code before the fix (noted per test)."""

from __future__ import annotations

import asyncio
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient

from models.predictor import OnnxPredictor
from serving.core.screening import StudyScreener
from serving.dicom.sources.local import LocalFolderSource
from serving.online.api import LazyService, create_api
from serving.online.pipeline import LocalPipeline
from serving.online.service import ScreeningService
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings
from tests.conftest import write_synthetic_cxr
from tests.serving.test_api import GatedPipeline, uid_of, wait_for


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    for seed in (41, 42):
        write_synthetic_cxr(tmp_path / "store" / f"s{seed}.dcm", seed=seed)
    return tmp_path / "store"


@contextmanager
def running(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path, *, gate: bool = False
) -> Iterator[tuple[TestClient, ScreeningService, GatedPipeline]]:
    """The API over a started service (real pipeline; ``gate`` holds every screening until set)."""
    screener = StudyScreener([predictor], study_ref_key=b"k")
    pipeline = GatedPipeline(LocalPipeline(screener, LocalFolderSource(store_dir)), None)

    def factory() -> ScreeningService:
        pipeline.gate = asyncio.Event() if gate else None  # made in the service's event loop
        store = ResultsStore(tmp_path / "results.sqlite3")
        return ScreeningService(pipeline, screener, store, ApiSettings(spool_dir=tmp_path / "spool"))

    lazy = LazyService(factory)
    with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:  # dev mode: loopback only
        client.get("/readyz")  # starts the service
        assert lazy.started is not None
        yield client, lazy.started, pipeline
        client.portal.call(lazy.started.drain, 5.0)
        lazy.started.close()


def leg_claiming(uid: str, tmp_path: Path) -> bytes:
    """A lower-leg radiograph whose header claims ``uid``: never screenable as a chest."""
    path = write_synthetic_cxr(tmp_path / "leg.dcm", seed=7, body_part="LEG")
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():  # pydicom warns about the invalid UIDs some tests write on purpose
        warnings.simplefilter("ignore")
        ds.StudyInstanceUID = uid
        ds.save_as(path)
    return path.read_bytes()


def upload(client: TestClient, data: bytes, **headers: str) -> str:
    response = client.post(
        "/v1/screenings/upload", files=[("files", ("x.dcm", data, "application/dicom"))], headers=headers
    )
    assert response.status_code in (200, 202), response.text
    return str(response.json()["screening_id"])


def test_an_upload_claiming_a_pacs_studys_uid_does_not_replace_its_result(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Was: the worklist showed the upload's NOT_SCREENED in place of the PACS result."""
    with running(tmp_path, predictor, store_dir) as (client, _svc, _pipe):
        uid = uid_of(store_dir / "s41.dcm")
        pacs = client.post("/v1/screenings", params={"wait": 20}, json={"study_instance_uid": uid}).json()
        assert pacs["status"] == "DONE" and pacs["result"]["outcome"] == "SCREENED"
        fake = wait_for(client, upload(client, leg_claiming(uid, tmp_path)))
        assert fake["result"]["outcome"] == "NOT_SCREENED"  # recorded as its own screening...
        worklist = [w for w in client.get("/v1/worklist").json() if w["study_instance_uid"] == uid]
        assert [w["outcome"] for w in worklist] == ["SCREENED"]  # ...but the PACS result stays the record
        page = [w for w in client.get("/v1/ui/worklist").json() if w["study_instance_uid"] == uid]
        assert [(w["outcome"], w["screening_id"]) for w in page] == [("SCREENED", pacs["screening_id"])]
    store = ResultsStore(tmp_path / "results.sqlite3")
    assert store.latest(uid).outcome == "SCREENED"  # type: ignore[union-attr]
    records = store.screenings_for(uid)
    assert [(r.source, r.triggered_by) for r in records] == [("pacs-fetch", "api"), ("upload", "api")]
    assert [r.screening_uuid for r in records] == [pacs["screening_id"], fake["screening_id"]]
    store.close()


def test_the_webhook_after_such_an_upload_still_screens_the_pacs_copy(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Was: the upload made ``has_screening_for`` true and the webhook was ignored as a duplicate."""
    with running(tmp_path, predictor, store_dir) as (client, _svc, _pipe):
        uid = uid_of(store_dir / "s41.dcm")
        wait_for(client, upload(client, leg_claiming(uid, tmp_path)))
        hook = client.post("/v1/events/stable-study", json={"study_instance_uid": uid})
        assert hook.status_code == 202 and hook.json()["duplicate"] is False
        done = wait_for(client, hook.json()["screening_id"])
        assert done["result"]["outcome"] == "SCREENED"
        again = client.post("/v1/events/stable-study", json={"study_instance_uid": uid}).json()
        assert again == {"screening_id": None, "duplicate": True}  # the PACS copy is screened once


def test_a_retried_post_with_the_same_idempotency_key_screens_once(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Was: every POST made a new screening, whatever its Idempotency-Key."""
    with running(tmp_path, predictor, store_dir) as (client, _svc, _pipe):
        uid, other = uid_of(store_dir / "s41.dcm"), uid_of(store_dir / "s42.dcm")
        key = {"Idempotency-Key": "order-7-attempt"}
        first = client.post("/v1/screenings", json={"study_instance_uid": uid}, headers=key).json()["screening_id"]
        wait_for(client, first)
        retry = client.post("/v1/screenings", json={"study_instance_uid": uid}, headers=key)
        assert retry.json()["screening_id"] == first  # answered from the first request, not screened again
        reused = client.post("/v1/screenings", json={"study_instance_uid": other}, headers=key)
        assert reused.status_code == 422 and reused.json()["reason"] == "IdempotencyKeyReused"
        assert other not in reused.text and uid not in reused.text
        data = (store_dir / "s42.dcm").read_bytes()
        up_key = {"Idempotency-Key": "upload-1"}
        up = upload(client, data, **up_key)
        assert upload(client, data, **up_key) == up
        assert (
            client.post(
                "/v1/screenings/upload",
                files=[("files", ("y.dcm", data + b"\x00\x00", "application/dicom"))],
                headers=up_key,
            ).status_code
            == 422
        )
        wait_for(client, up)
    store = ResultsStore(tmp_path / "results.sqlite3")
    assert len(store.screenings_for(uid)) == 1 and len(store.screenings_for(other)) == 1
    store.close()


def test_an_scp_push_and_the_poller_for_the_same_study_screen_it_once(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Was: the SCP's job was saved without its Study UID, so the poller queued the study again."""
    with running(tmp_path, predictor, store_dir, gate=True) as (client, svc, pipeline):
        uid = uid_of(store_dir / "s41.dcm")
        pushed = tmp_path / "spool" / "scp-study"
        pushed.mkdir(parents=True)
        shutil.copy(store_dir / "s41.dcm", pushed / "00000.dcm")
        svc._on_scp_stable(uid, pushed)  # as the SCP's watcher thread does when the study is stable
        deadline = time.monotonic() + 10
        while not svc.store.pending_jobs():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.portal.call(_poll, svc, uid) is None  # the SCP job is still queued (gate closed)
        hook = client.post("/v1/events/stable-study", json={"study_instance_uid": uid}).json()
        assert hook["duplicate"] is True
        (job,) = svc.store.pending_jobs()
        assert (job.study_instance_uid, job.source, job.triggered_by) == (uid, "scp-push", "scp")
        assert pipeline.gate is not None
        client.portal.call(pipeline.gate.set)
        assert wait_for(client, job.id)["result"]["outcome"] == "SCREENED"
        assert client.portal.call(_poll, svc, uid) is None  # and once screened, still once
        assert len(svc.store.screenings_for(uid)) == 1


async def _poll(svc: ScreeningService, uid: str) -> str | None:
    return svc.submit_automatic(uid, "poller")


@pytest.mark.parametrize("field", ["study", "webhook"])
def test_a_uid_with_a_trailing_newline_is_refused(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path, field: str
) -> None:
    """Was: ``^...$`` with ``re.match`` let "1.2.3\\n" through (``$`` matches before a final newline)."""
    with running(tmp_path, predictor, store_dir) as (client, _svc, _pipe):
        path = "/v1/screenings" if field == "study" else "/v1/events/stable-study"
        refused = client.post(path, json={"study_instance_uid": "1.2.840.10008.1\n"})
        assert refused.status_code == 422
        assert client.post(path, json={"study_instance_uid": "1.2.840.10008.1.02"}).status_code == 202


def test_an_upload_whose_file_claims_an_invalid_uid_is_refused(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    with running(tmp_path, predictor, store_dir) as (client, _svc, _pipe):
        for bad in ("1.2.abc", "1." + "2" * 70):
            data = leg_claiming(bad, tmp_path / bad[:8])
            response = client.post("/v1/screenings/upload", files=[("files", ("x.dcm", data, "application/dicom"))])
            assert response.status_code == 422 and response.json()["reason"] == "InvalidIdentifier"
            assert bad not in response.text
        assert not [p for p in (tmp_path / "spool").iterdir() if not p.name.startswith(".")]  # spool removed


def test_every_api_read_and_write_of_results_leaves_an_audit_row_without_uids(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    with running(tmp_path, predictor, store_dir) as (client, _svc, _pipe):
        uid = uid_of(store_dir / "s41.dcm")
        job = client.post("/v1/screenings", params={"wait": 20}, json={"study_instance_uid": uid}).json()
        client.get(f"/v1/screenings/{job['screening_id']}")
        client.get("/v1/worklist")
        client.post("/v1/events/stable-study", json={"study_instance_uid": uid})
        assert client.get("/v1/ui/worklist").status_code == 200  # the reading page's routes too
        assert client.get(f"/v1/screenings/{job['screening_id']}/view").status_code == 200
        assert client.get(f"/v1/screenings/{job['screening_id']}/feedback").status_code == 200
    store = ResultsStore(tmp_path / "results.sqlite3")
    entries = store.audit_entries()
    assert [e.action for e in entries] == [
        "request",
        "read",
        "read-worklist",
        "webhook",
        "read-worklist",
        "read",
        "read-feedback",
    ]
    assert entries[4].screening_id == job["screening_id"] and entries[5].study_ref == job["result"]["study_ref"]
    assert entries[0].screening_id == job["screening_id"] and entries[1].screening_id == job["screening_id"]
    assert entries[1].study_ref == job["result"]["study_ref"] == entries[2].study_ref
    assert all(e.actor and e.at for e in entries)
    assert all(uid not in repr(e) for e in entries)
    store.close()
