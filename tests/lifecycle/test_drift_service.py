"""Drift inside the running service: a real ``ScreeningService`` (the ASGI app over it, no Ray)
with its periodic drift watch. An in-distribution mix keeps the gauges at 0; a shifted mix
(another manufacturer, DX instead of CR, far more positive studies) screened through the API
moves ``dxassist_drift_crossed`` to 1 on ``/metrics`` and logs one line per crossed check, once
(not at every pass), naming the version, quantity, statistic, value and threshold: no UID, no
patient, accession or header value. A promotion drops the old version's gauges."""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from pydicom import dcmread

from models.importing import derive_version
from models.predictor import OnnxPredictor
from models.registry import REGISTRY_ROOT, resolve
from models.synthetic.cxr import generate_cxr_dataset
from serving.core.screening import StudyScreener, screen_paths
from serving.dicom.sources.local import LocalFolderSource
from serving.observability.drift import observation_of, save_observations
from serving.online.api import LazyService, create_api
from serving.online.factory import build_service
from serving.online.versions import VersionedPipeline, VersionRouter
from serving.persistence.lifecycle import LifecycleStore
from serving.settings import ApiSettings, DriftSettings, ModelSettings, ResultsSettings, SecuritySettings, Settings

REF = "cxr-triage@1.0.0"
PATIENT_NAME, PATIENT_ID, ACCESSION = "Drift^Patient^Jane", "PID-DRIFT-4711", "ACC-DRIFT-0042"


def _gauge(metrics: str, name: str, quantity: str, statistic: str) -> float | None:
    pattern = rf'{name}\{{model="{re.escape(REF)}",quantity="{re.escape(quantity)}",statistic="{statistic}"\}} (\S+)'
    found = re.search(pattern, metrics)
    return float(found.group(1)) if found else None


def _screen_all(client: TestClient, folder: Path) -> list[str]:
    ids = []
    for path in sorted(folder.glob("*.dcm")):
        answer = client.post(
            "/v1/screenings/upload", files=[("files", (path.name, path.read_bytes(), "application/dicom"))]
        )
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["screening_id"])
    deadline = time.monotonic() + 300
    while any(client.get(f"/v1/screenings/{j}").json()["status"] not in ("DONE", "FAILED") for j in ids):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return ids


def _wait_metric(client: TestClient, name: str, quantity: str, statistic: str, want: float) -> str:
    deadline = time.monotonic() + 60
    while True:
        metrics = client.get("/metrics").text
        if _gauge(metrics, name, quantity, statistic) == want:
            return metrics
        assert time.monotonic() < deadline, f"{name}{{{quantity},{statistic}}} never reached {want}"
        time.sleep(0.2)


def test_the_service_watches_drift_and_reports_a_shifted_mix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # the version's validation baseline, beside its manifest (as `models validate` leaves it)
    registry = tmp_path / "registry"
    shutil.copytree(REGISTRY_ROOT / "cxr-triage" / "1.0.0", registry / "cxr-triage" / "1.0.0")
    generate_cxr_dataset(tmp_path / "baseline", 30, seed=41, size=(320, 320), prevalence=0.25)
    screener = StudyScreener(
        [OnnxPredictor(resolve("cxr-triage", "1.0.0", registry), providers="cpu")], study_ref_key=b"k" * 16
    )
    files = sorted((tmp_path / "baseline").glob("*.dcm"))
    baseline = [
        observation_of(result, REF, "baseline", dcmread(path, stop_before_pixels=True))
        for path, result in zip(files, screen_paths(screener, files, group_by_study=False), strict=True)
    ]
    save_observations(registry / "cxr-triage" / "1.0.0" / "baseline.json", [o for o in baseline if o is not None])

    control, shifted = tmp_path / "control", tmp_path / "shifted"
    generate_cxr_dataset(control, 10, seed=47, size=(320, 320), prevalence=0.25)
    generate_cxr_dataset(shifted, 16, seed=43, size=(320, 320), prevalence=0.9)
    uids = set()
    for path in [*control.glob("*.dcm"), *shifted.glob("*.dcm")]:
        ds = dcmread(path)
        ds.PatientName, ds.PatientID, ds.AccessionNumber = PATIENT_NAME, PATIENT_ID, ACCESSION
        if path.parent == shifted:
            ds.Manufacturer, ds.Modality = "Other Vendor Imaging", "DX"
        ds.save_as(path)
        uids |= {str(ds.StudyInstanceUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)}

    settings = Settings(
        models=[ModelSettings(id="cxr-triage", version="1.0.0", providers="cpu")],
        results=ResultsSettings(sqlite_path=tmp_path / "results.sqlite3"),
        security=SecuritySettings(study_ref_key=SecretStr("drift-test-key-0123456789abc")),
        api=ApiSettings(spool_dir=tmp_path / "spool"),
        drift=DriftSettings(min_studies=10, interval_s=0.2, window_h=1),
    )
    lifecycle = LifecycleStore(settings.results.target)
    service = build_service(
        settings, VersionedPipeline(VersionRouter(settings, lifecycle, root=registry), LocalFolderSource(tmp_path))
    )
    lazy = LazyService(lambda: service)
    caplog.set_level(logging.INFO)
    with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:
        client.get("/readyz")
        # in-distribution studies: judged (10 >= min_studies), the input facts not crossed
        _screen_all(client, control)
        metrics = _wait_metric(client, "dxassist_drift_statistic", "manufacturer", "psi", 0.0)
        assert _gauge(metrics, "dxassist_drift_crossed", "manufacturer", "psi") == 0.0
        assert _gauge(metrics, "dxassist_drift_crossed", "modality", "psi") == 0.0
        # (10 studies move score and bit-depth figures by chance; the input mix is the control)
        facts = (" manufacturer psi ", " modality psi ")
        assert not [r for r in caplog.records if any(f in r.getMessage() for f in facts)]

        # the shifted mix joins the window: the input-fact gauges cross
        _screen_all(client, shifted)
        metrics = _wait_metric(client, "dxassist_drift_crossed", "manufacturer", "psi", 1.0)
        assert _gauge(metrics, "dxassist_drift_crossed", "modality", "psi") == 1.0
        value = _gauge(metrics, "dxassist_drift_statistic", "manufacturer", "psi")
        assert value is not None and value > settings.drift.psi_alert
        assert "Other Vendor" not in metrics
        # the pass that crossed may have read only part of the shifted mix: wait for a pass over all
        settled = _gauge(metrics, "dxassist_drift_statistic", "manufacturer", "psi")
        deadline = time.monotonic() + 30
        while True:
            time.sleep(settings.drift.interval_s * 3)
            now = _gauge(client.get("/metrics").text, "dxassist_drift_statistic", "manufacturer", "psi")
            if now == settled:
                break
            settled = now
            assert time.monotonic() < deadline, "the drift statistic never settled"
        passes = 0  # a few more passes: a check that stays crossed is not logged again
        while passes < 3:
            before = _gauge(client.get("/metrics").text, "dxassist_drift_statistic", "manufacturer", "psi")
            time.sleep(settings.drift.interval_s * 2)
            passes += 1
            assert before == _gauge(client.get("/metrics").text, "dxassist_drift_statistic", "manufacturer", "psi")

        # a promotion moves the watch to the new version: the old version's gauges go (a stale 1
        # would keep an alert firing)
        keys = ["cardiomegaly", "pleural_effusion", "pneumothorax", "nodule_mass", "consolidation"]
        derive_version("cxr-triage", "1.0.0", "1.0.1", dict.fromkeys(keys, (0.5, "test: drift follows")), root=registry)
        lifecycle.switch(
            "cxr-triage", "1.0.1", action="promote", actor="test", reason="gauges follow the version", current="1.0.0"
        )
        deadline = time.monotonic() + 60
        while _gauge(client.get("/metrics").text, "dxassist_drift_crossed", "manufacturer", "psi") is not None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        client.portal.call(lazy.started.drain, 5.0)  # type: ignore[union-attr]
    service.close()
    lifecycle.close()

    lines = [r.getMessage() for r in caplog.records if "drift threshold crossed" in r.getMessage()]
    crossed_lines = [line for line in lines if " manufacturer psi " in line]
    assert len(crossed_lines) == 1, lines  # once, when it crossed
    assert crossed_lines[0].startswith(f"drift threshold crossed: {REF} manufacturer psi ")
    assert len([line for line in lines if " modality psi " in line]) == 1
    assert any(" positive_rate:" in line for line in lines)
    assert len(lines) == len(set(lines))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for value_seen in (PATIENT_NAME, "Drift^", PATIENT_ID, ACCESSION, "Other Vendor", *uids):
        assert value_seen not in logged
    assert not any(re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", line) for line in lines)  # nothing UID-shaped
    assert not any("SYN" in line or "phantom" in line for line in lines)  # nor the baseline's header values
