"""Drift: a shifted input mix (another manufacturer, DX instead of CR, far more positive
studies) screened through the service crosses the thresholds against the validation baseline,
sets the Prometheus gauges and logs one PHI-free line per crossed check; an unshifted mix of the
same kind crosses none of the input-fact checks. Radiologists' feedback on the version's findings
is counted beside the drift."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from pydicom import dcmread

from models.predictor import OnnxPredictor
from models.registry import resolve
from models.synthetic.cxr import generate_cxr_dataset
from serving.cli.models import drift_and_feedback
from serving.core.screening import StudyScreener, screen_paths
from serving.dicom.sources.local import LocalFolderSource
from serving.observability.drift import DriftMonitor, drift_checks, observation_of, save_observations
from serving.online.api import LazyService, create_api
from serving.online.factory import build_service
from serving.online.versions import VersionedPipeline, VersionRouter
from serving.persistence.lifecycle import LifecycleStore
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings, DriftSettings, ModelSettings, ResultsSettings, SecuritySettings, Settings

REF = "cxr-triage@1.0.0"


def _observations(folder: Path, day: str) -> list:
    screener = StudyScreener([OnnxPredictor(resolve("cxr-triage", "1.0.0"), providers="cpu")], study_ref_key=b"k" * 16)
    files = sorted(folder.glob("*.dcm"))
    out = []
    for path, result in zip(files, screen_paths(screener, files, group_by_study=False), strict=True):
        o = observation_of(result, REF, day, dcmread(path, stop_before_pixels=True))
        if o is not None:
            out.append(o)
    return out


def _shift(folder: Path) -> None:
    for path in folder.glob("*.dcm"):
        ds = dcmread(path)
        ds.Manufacturer = "Other Vendor Imaging"
        ds.Modality = "DX"
        ds.save_as(path)


def test_a_shifted_input_mix_crosses_the_drift_thresholds(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    generate_cxr_dataset(tmp_path / "baseline", 30, seed=41, size=(320, 320), prevalence=0.25)
    baseline = _observations(tmp_path / "baseline", "baseline")
    save_observations(tmp_path / "baseline.json", baseline)

    shifted = tmp_path / "shifted"
    generate_cxr_dataset(shifted, 16, seed=43, size=(320, 320), prevalence=0.9)
    _shift(shifted)
    settings = Settings(
        models=[ModelSettings(id="cxr-triage", version="1.0.0", providers="cpu")],
        results=ResultsSettings(sqlite_path=tmp_path / "results.sqlite3"),
        security=SecuritySettings(study_ref_key=SecretStr("drift-test-key-0123456789abc")),
        api=ApiSettings(spool_dir=tmp_path / "spool"),
        drift=DriftSettings(min_studies=10),
    )
    lifecycle = LifecycleStore(settings.results.target)
    service = build_service(
        settings, VersionedPipeline(VersionRouter(settings, lifecycle), LocalFolderSource(tmp_path))
    )
    lazy = LazyService(lambda: service)
    with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:
        client.get("/readyz")
        ids = []
        for path in sorted(shifted.glob("*.dcm")):
            answer = client.post(
                "/v1/screenings/upload", files=[("files", (path.name, path.read_bytes(), "application/dicom"))]
            )
            ids.append(answer.json()["screening_id"])
        deadline = time.monotonic() + 300
        while any(client.get(f"/v1/screenings/{j}").json()["status"] not in ("DONE", "FAILED") for j in ids):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        client.portal.call(lazy.started.drain, 5.0)  # type: ignore[union-attr]
    service.close()
    lifecycle.close()

    # a radiologist disagrees with one finding, agrees with another: counted beside the drift
    store = ResultsStore(settings.results.target)
    store.add_feedback(ids[0], "pneumothorax", "disagree", "reader-1", "no pneumothorax")
    store.add_feedback(ids[1], "pneumothorax", "agree", "reader-1")
    store.close()
    checks, feedback = drift_and_feedback(settings, REF, days=1, baseline=tmp_path / "baseline.json")
    assert feedback == {"pneumothorax": {"agree": 1, "disagree": 1}}
    crossed = {c.quantity for c in checks if c.crossed}
    assert {"manufacturer", "modality"} <= crossed
    assert any(q.startswith("positive_rate:") for q in crossed)
    monitor = DriftMonitor()
    with caplog.at_level(logging.WARNING, logger="serving.observability.drift"):
        logged = monitor.publish(REF, checks)
    assert {c.quantity for c in logged} == crossed
    lines = [r.getMessage() for r in caplog.records if "drift threshold crossed" in r.getMessage()]
    assert len(lines) == len(logged) and any(" manufacturer psi " in line for line in lines)
    text = "\n".join(lines)
    assert "Other Vendor" not in text and "1.2.826" not in text and "SYN" not in text
    assert (
        monitor.registry.get_sample_value(
            "dxassist_drift_crossed", {"model": REF, "quantity": "manufacturer", "statistic": "psi"}
        )
        == 1.0
    )
    monitor.write_textfile(tmp_path / "drift.prom")
    prom = (tmp_path / "drift.prom").read_text()
    assert 'dxassist_drift_crossed{model="cxr-triage@1.0.0",quantity="manufacturer",statistic="psi"} 1.0' in prom

    # control: an unshifted mix of the same kind crosses none of the input-fact checks
    generate_cxr_dataset(tmp_path / "control", 16, seed=47, size=(320, 320), prevalence=0.25)
    control = drift_checks(
        baseline, _observations(tmp_path / "control", "day"), psi_alert=0.25, ks_alert=0.2, min_studies=10
    )
    assert not [c for c in control if c.crossed and c.quantity in ("manufacturer", "modality", "view", "bit_depth")]
