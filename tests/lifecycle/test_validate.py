"""`dxassist models validate` on a labelled synthetic set (ChestX-ray14-style CSV) reproduces the
shipped model card's AUROCs within their confidence intervals and writes the JSON/HTML report
with plots, proposed thresholds and a drift baseline; `dxassist models register
--from-validation` makes a new version with those thresholds (the report kept beside it) and
refuses to overwrite it; a Kvasir-style masks folder labels the polyp model."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.registry import REGISTRY_ROOT, resolve
from models.synthetic.cxr import generate_cxr_dataset
from models.synthetic.endoscopy import generate_kvasir_folder
from tests.integration.conftest import OrthancServer, orthanc  # noqa: F401  (fixture)

CARD_ROW = re.compile(r"^\| (\w+) \| ([0-9.]+) \(([0-9.]+)-([0-9.]+)\) \|", re.MULTILINE)


def _dxassist(registry: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DXASSIST_REGISTRY": str(registry), "DXASSIST_SCREENING__DECODE_ISOLATION": "inline"}
    return subprocess.run(
        [sys.executable, "-m", "serving.cli.main", *args], capture_output=True, text=True, env=env, timeout=900
    )


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    for model in ("cxr-triage", "endoscopy-polyp"):
        shutil.copytree(REGISTRY_ROOT / model / "1.0.0", root / model / "1.0.0")
    return root


def test_validate_reproduces_the_model_card_and_register_makes_a_new_version(tmp_path: Path, registry: Path) -> None:
    labelled = tmp_path / "labelled"
    csv_path = generate_cxr_dataset(labelled, 120, seed=2027, size=(448, 448), prevalence=0.3)
    out = tmp_path / "reports"
    run = _dxassist(
        registry,
        "models",
        "validate",
        "cxr-triage@1.0.0",
        "--labels",
        str(csv_path),
        "--images",
        str(labelled),
        "--out",
        str(out),
        "--target-sensitivity",
        "0.9",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report_dir = out / "cxr-triage-1.0.0"
    report = json.loads((report_dir / "validation.json").read_text())
    assert report["studies"] == 120
    card = (registry / "cxr-triage" / "1.0.0" / "MODEL_CARD.md").read_text()
    card_rows = {m[1]: (float(m[2]), float(m[3]), float(m[4])) for m in CARD_ROW.finditer(card)}
    assert set(card_rows) == set(report["findings"])
    for key, (_auc, card_low, card_high) in card_rows.items():
        low, high = report["findings"][key]["auroc_ci95"]
        # the two estimates agree: the intervals overlap
        assert low <= card_high + 1e-9 and card_low <= high + 1e-9, (key, (low, high), (card_low, card_high))
    for f in report["findings"].values():
        assert {"sensitivity", "specificity", "ppv", "npv", "ece", "reliability"} <= set(f)
        assert f["proposed"]["sensitivity"] >= 0.9
    assert report["ood_refusal_rate"] is not None
    assert any(k.startswith("view=") for k in report["subgroups"])
    assert any(k.startswith("sex=") for k in report["subgroups"])
    page = (report_dir / "validation.html").read_text()
    assert page.count("data:image/png;base64,") == len(report["findings"])
    assert json.loads((report_dir / "baseline.json").read_text())
    # no UIDs in the report: studies by ref only
    assert "1.2.826" not in (report_dir / "validation.json").read_text()

    run = _dxassist(registry, "models", "register", "--from-validation", str(report_dir), "--version", "1.1.0-site1")
    assert run.returncode == 0, run.stdout + run.stderr
    new = resolve("cxr-triage", "1.1.0-site1", registry)
    for label in new.manifest.labels:
        assert label.threshold == pytest.approx(report["proposed_thresholds"][label.key]["threshold"], abs=1e-6)
        assert "site validation" in label.threshold_basis
    assert (new.directory / "validation.json").is_file() and (new.directory / "baseline.json").is_file()
    again = _dxassist(registry, "models", "register", "--from-validation", str(report_dir), "--version", "1.1.0-site1")
    assert again.returncode == 1 and "already registered" in again.stdout


def test_validate_reads_kvasir_masks(tmp_path: Path, registry: Path) -> None:
    folder = generate_kvasir_folder(tmp_path / "kvasir", 24, seed=9, size=256)
    out = tmp_path / "reports"
    run = _dxassist(registry, "models", "validate", "endoscopy-polyp@1.0.0", "--labels", str(folder), "--out", str(out))
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((out / "endoscopy-polyp-1.0.0" / "validation.json").read_text())
    polyp = next(iter(report["findings"].values()))
    assert polyp["n"] + sum(report["not_screened"].values()) == 24
    assert polyp["positives"] > 0 and polyp["auroc"] > 0.5


@pytest.mark.integration
def test_validate_fetches_labelled_studies_from_the_store(
    tmp_path: Path,
    registry: Path,
    orthanc: OrthancServer,  # noqa: F811
) -> None:
    import csv

    import pydicom
    import yaml

    folder = tmp_path / "labelled"
    csv_path = generate_cxr_dataset(folder, 16, seed=77, size=(320, 320), prevalence=0.4)
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    with (tmp_path / "store_labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Study Instance UID", "Finding Labels", "Patient Gender"])
        for row in rows:
            path = folder / row["Image Index"]
            orthanc.upload(path)
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
            writer.writerow([uid, row["Finding Labels"], row["Patient Gender"]])
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "models": [{"id": "cxr-triage", "version": "1.0.0", "providers": "cpu"}],
                "store": {
                    "kind": "dicomweb",
                    "dicomweb": {"url": orthanc.dicomweb, "username": orthanc.user, "password": orthanc.password},
                },
                "results": {"sqlite_path": str(tmp_path / "results.sqlite3")},
            }
        )
    )
    out = tmp_path / "reports"
    run = _dxassist(
        registry,
        "models",
        "validate",
        "cxr-triage@1.0.0",
        "--labels",
        str(tmp_path / "store_labels.csv"),
        "--source",
        "store",
        "--settings",
        str(settings),
        "--out",
        str(out),
    )
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((out / "cxr-triage-1.0.0" / "validation.json").read_text())
    assert report["studies"] == 16 and report["screened"] == 16
    assert {"sex=F", "sex=M"} <= set(report["subgroups"])
    assert all(f["n"] == 16 for f in report["findings"].values())
