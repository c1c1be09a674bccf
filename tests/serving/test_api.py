"""HTTP API + ScreeningService without Ray: auth, async screening, uploads, priority, backpressure,
timeouts, restart resume, readiness and metrics. Real files, real model sessions, real SQLite."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from numpy.typing import NDArray
from pydantic import SecretStr

from models.predictor import OnnxPredictor
from serving.core.screening import ModelOutputs, StudyScreener
from serving.dicom.sources.local import LocalFolderSource
from serving.online.api import LazyService, create_api
from serving.online.pipeline import LocalPipeline, PreparedStudy, StudyRequest
from serving.online.service import ScreeningService
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings


class GatedPipeline:
    """The real LocalPipeline, with a gate the test opens, and a log of the order of work."""

    def __init__(self, inner: LocalPipeline, gate: asyncio.Event | None) -> None:
        self.inner = inner
        self.gate = gate
        self.order: list[str] = []

    async def prepare_study(self, request: StudyRequest) -> PreparedStudy:
        self.order.append(request.study_instance_uid or "upload")
        if self.gate is not None:
            await self.gate.wait()
        return await self.inner.prepare_study(request)

    async def infer(self, model_id: str, tensors: NDArray[np.float32]) -> ModelOutputs:
        return await self.inner.infer(model_id, tensors)

    async def model_info(self) -> list[dict[str, object]]:
        return await self.inner.model_info()


def uid_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


@contextmanager
def running(
    tmp_path: Path,
    predictor: OnnxPredictor,
    store_dir: Path,
    *,
    gate: bool = False,
    db: Path | None = None,
    **api: object,
) -> Iterator[tuple[TestClient, Callable[[], GatedPipeline]]]:
    settings = ApiSettings(spool_dir=tmp_path / "spool", **api)  # type: ignore[arg-type]
    screener = StudyScreener([predictor], study_ref_key=b"k")
    holder: dict[str, GatedPipeline] = {}

    def factory() -> ScreeningService:
        pipeline = GatedPipeline(
            LocalPipeline(screener, LocalFolderSource(store_dir)), asyncio.Event() if gate else None
        )
        holder["p"] = pipeline
        return ScreeningService(pipeline, screener, ResultsStore(db or tmp_path / "results.sqlite3"), settings)

    lazy = LazyService(factory)
    with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:
        client.get("/readyz")  # starts the service
        yield client, lambda: holder["p"]
        if lazy.started is not None:
            client.portal.call(lazy.started.drain, 5.0)  # type: ignore[union-attr]


def wait_for(client: TestClient, job_id: str, headers: dict[str, str] | None = None, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/screenings/{job_id}", headers=headers or {}).json()
        if body["status"] in ("DONE", "FAILED"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not finished: {body}")


def test_auth_is_required_everywhere_but_health(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    with running(tmp_path, predictor, store_dir, tokens=[SecretStr("s3cret")]) as (client, _):
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        uid = uid_of(store_dir / "s41.dcm")
        assert client.post("/v1/screenings", json={"study_instance_uid": uid}).status_code == 401
        bad = {"Authorization": "Bearer nope"}
        assert client.post("/v1/screenings", json={"study_instance_uid": uid}, headers=bad).status_code == 401
        assert client.get("/metrics").status_code == 401
        assert client.get("/v1/worklist", headers=bad).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        response = client.post("/v1/screenings", json={"study_instance_uid": uid}, headers=good)
        assert response.status_code == 202
        assert wait_for(client, response.json()["screening_id"], good)["status"] == "DONE"


def test_post_with_wait_answers_with_the_result_when_done_in_time(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    with running(tmp_path, predictor, store_dir, gate=True) as (client, pipeline):
        uid = uid_of(store_dir / "s41.dcm")
        held = client.post("/v1/screenings", params={"wait": 0.3}, json={"study_instance_uid": uid})
        assert held.status_code == 202 and held.json()["status"] in ("QUEUED", "RUNNING")  # gate closed
        client.portal.call(pipeline().gate.set)  # type: ignore[union-attr]
        done = client.post(
            "/v1/screenings", params={"wait": 20}, json={"study_instance_uid": uid_of(store_dir / "s42.dcm")}
        )
        assert done.status_code == 202 and done.json()["status"] == "DONE"
        assert done.headers["location"] == f"/v1/screenings/{done.json()['screening_id']}"
        assert done.json()["result"]["study_instance_uid"] == uid_of(store_dir / "s42.dcm")
        missing = client.post("/v1/screenings", params={"wait": 20}, json={"study_instance_uid": "1.2.3.998"})
        assert missing.status_code == 202  # finished: FAILED with its reason, no UID in the detail
        assert (missing.json()["status"], missing.json()["error_reason"]) == ("FAILED", "STUDY_NOT_FOUND")
        assert "1.2.3.998" not in missing.json()["error_detail"]


def test_screening_a_store_study_end_to_end(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    with running(tmp_path, predictor, store_dir) as (client, _):
        uid = uid_of(store_dir / "s42.dcm")
        accepted = client.post("/v1/screenings", json={"study_instance_uid": uid, "priority": "stat"})
        assert accepted.status_code == 202 and accepted.json()["status"] in ("QUEUED", "RUNNING", "DONE")
        done = wait_for(client, accepted.json()["screening_id"])
        result = done["result"]
        assert result["outcome"] == "SCREENED" and result["study_instance_uid"] == uid
        assert {f["key"] for f in result["findings"]} == {"alpha", "beta"}
        worklist = client.get("/v1/worklist").json()
        assert [w["study_instance_uid"] for w in worklist] == [uid]
        metrics = client.get("/metrics").text
        assert 'dxassist_screenings_total{outcome="SCREENED",priority="stat"} 1.0' in metrics
        assert "dxassist_stage_seconds_bucket" in metrics and "dxassist_queue_depth" in metrics
        assert 'dxassist_model_info{model="tiny-test",provider="CPUExecutionProvider",version="0.1.0"} 1.0' in metrics
        # every answered request counted by route template and status (no UID in a label)
        assert client.get("/v1/screenings/no-such-job").status_code == 404
        metrics = client.get("/metrics").text
        assert 'dxassist_http_requests_total{endpoint="/v1/screenings",status="202"} 1.0' in metrics
        assert 'dxassist_http_requests_total{endpoint="/v1/screenings/{screening_id}",status="404"} 1.0' in metrics
        assert 'dxassist_http_requests_total{endpoint="/v1/worklist",status="200"} 1.0' in metrics
        assert uid not in metrics


def test_upload_and_unknown_study(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    with running(tmp_path, predictor, store_dir) as (client, _):
        files = [("files", ("a.dcm", (store_dir / "s43.dcm").read_bytes(), "application/dicom"))]
        up = client.post("/v1/screenings/upload", files=files, params={"priority": "routine"})
        assert up.status_code == 202
        assert wait_for(client, up.json()["screening_id"])["result"]["outcome"] == "SCREENED"
        assert not any((tmp_path / "spool").iterdir())  # spooled upload removed once done
        missing = client.post("/v1/screenings", json={"study_instance_uid": "1.2.3.999"})
        failed = wait_for(client, missing.json()["screening_id"])
        assert failed["status"] == "FAILED" and failed["error_reason"] == "STUDY_NOT_FOUND"
        assert "1.2.3.999" not in failed["error_detail"]
        assert client.post("/v1/screenings", json={"study_instance_uid": "not-a-uid"}).status_code == 422
        assert client.get("/v1/screenings/unknown").status_code == 404


def test_full_queue_gets_503_with_retry_after(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    with running(tmp_path, predictor, store_dir, gate=True, max_inflight=1, max_queued_routine=1) as (client, pipe):
        uids = [uid_of(store_dir / f"s{s}.dcm") for s in (41, 42, 43)]
        first = client.post("/v1/screenings", json={"study_instance_uid": uids[0]})
        deadline = time.monotonic() + 5
        while not pipe().order and time.monotonic() < deadline:
            time.sleep(0.01)  # first is now in flight, held by the gate
        second = client.post("/v1/screenings", json={"study_instance_uid": uids[1]})
        third = client.post("/v1/screenings", json={"study_instance_uid": uids[2]})
        assert (first.status_code, second.status_code, third.status_code) == (202, 202, 503)
        assert int(third.headers["Retry-After"]) >= 1
        client.portal.call(pipe().gate.set)  # type: ignore[union-attr]
        assert wait_for(client, second.json()["screening_id"])["status"] == "DONE"
        assert 'dxassist_admission_rejected_total{priority="routine"} 1.0' in client.get("/metrics").text


def test_stat_is_not_stuck_behind_routine_work(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    with running(tmp_path, predictor, store_dir, gate=True, max_inflight=2) as (client, pipe):
        routine = [uid_of(store_dir / f"s{s}.dcm") for s in (41, 42, 43)]
        stat = uid_of(store_dir / "s44.dcm")
        jobs = [client.post("/v1/screenings", json={"study_instance_uid": u}).json()["screening_id"] for u in routine]
        stat_job = client.post("/v1/screenings", json={"study_instance_uid": stat, "priority": "stat"}).json()[
            "screening_id"
        ]
        deadline = time.monotonic() + 5
        while len(pipe().order) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        # one routine study holds its slot; the stat study took the reserved one, ahead of 2 queued routine
        assert pipe().order == [routine[0], stat]
        client.portal.call(pipe().gate.set)  # type: ignore[union-attr]
        for j in [*jobs, stat_job]:
            assert wait_for(client, j)["status"] == "DONE"


def test_timeout_fails_the_job_with_a_reason(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    with running(tmp_path, predictor, store_dir, gate=True, request_timeout_s=0.3) as (client, _):
        job = client.post("/v1/screenings", json={"study_instance_uid": uid_of(store_dir / "s45.dcm")}).json()
        failed = wait_for(client, job["screening_id"])
        assert failed["status"] == "FAILED" and failed["error_reason"] == "TIMEOUT"


def test_restart_resumes_unfinished_jobs(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    db = tmp_path / "shared.sqlite3"
    uids = [uid_of(store_dir / f"s{s}.dcm") for s in (41, 42)]
    with running(tmp_path, predictor, store_dir, gate=True, db=db, max_inflight=1) as (client, _):
        ids = [client.post("/v1/screenings", json={"study_instance_uid": u}).json()["screening_id"] for u in uids]
        # the service stops here with one job RUNNING (held by the gate) and one QUEUED
    pending = {j.id for j in ResultsStore(db).pending_jobs()}
    assert pending == set(ids)
    with running(tmp_path, predictor, store_dir, db=db) as (client, _):
        assert [wait_for(client, j)["status"] for j in ids] == ["DONE", "DONE"]
    assert ResultsStore(db).count() == 2  # each study screened once, nothing lost


def test_long_poll_returns_when_the_screening_ends(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    with running(tmp_path, predictor, store_dir, gate=True) as (client, pipe):
        job = client.post("/v1/screenings", json={"study_instance_uid": uid_of(store_dir / "s41.dcm")}).json()
        start = time.monotonic()
        assert client.get(f"/v1/screenings/{job['screening_id']}", params={"wait": 0.3}).json()["status"] in (
            "QUEUED",
            "RUNNING",
        )
        assert time.monotonic() - start >= 0.3  # held while the gate keeps it running
        client.portal.call(pipe().gate.set)  # type: ignore[union-attr]
        body = client.get(f"/v1/screenings/{job['screening_id']}", params={"wait": 20}).json()
        assert body["status"] == "DONE" and time.monotonic() - start < 10


class FailingPipeline(GatedPipeline):
    """Fails the way a library would: the exception message quotes a URL with the study UID."""

    async def prepare_study(self, request: StudyRequest) -> PreparedStudy:
        raise RuntimeError(f"GET http://pacs/dicom-web/studies/{request.study_instance_uid}/instances failed")


def test_unexpected_failure_is_recorded_without_patient_data_in_logs(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    uid = uid_of(store_dir / "s41.dcm")
    screener = StudyScreener([predictor], study_ref_key=b"k")
    pipeline = FailingPipeline(LocalPipeline(screener, LocalFolderSource(store_dir)), None)
    service = ScreeningService(
        pipeline, screener, ResultsStore(tmp_path / "r.sqlite3"), ApiSettings(spool_dir=tmp_path / "s")
    )
    with (
        caplog.at_level(logging.DEBUG),
        TestClient(create_api(LazyService(lambda: service)), client=("127.0.0.1", 50000)) as client,
    ):
        job = client.post("/v1/screenings", json={"study_instance_uid": uid}).json()["screening_id"]
        body = wait_for(client, job)
        client.portal.call(service.drain, 5.0)
    assert body["status"] == "FAILED" and body["error_reason"] == "INTERNAL_ERROR"
    assert "screening job failed (RuntimeError)" in caplog.text
    assert uid not in caplog.text and uid not in (body["error_detail"] or "")


def test_heap_is_trimmed_once_work_goes_idle(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the last running screening ends with nothing queued, the service gives freed heap
    back (models.heap) once nothing came for a moment; not while work is still queued or running."""
    import serving.online.service as service_module

    trims: list[float] = []
    monkeypatch.setattr(service_module, "trim_heap", lambda: trims.append(time.monotonic()) or True)
    with running(tmp_path, predictor, store_dir) as (client, _):
        assert trims == []  # nothing ran yet
        job = client.post("/v1/screenings", json={"study_instance_uid": uid_of(store_dir / "s42.dcm")})
        wait_for(client, job.json()["screening_id"])
        deadline = time.monotonic() + 10
        while not trims:
            assert time.monotonic() < deadline, "no trim after the work went idle"
            time.sleep(0.05)
        assert len(trims) == 1
