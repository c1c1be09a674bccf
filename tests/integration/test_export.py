"""`dxassist export` against a real Orthanc: canaries planted in every identifying attribute, in
a private block and burned into the pixels never appear anywhere in the exported files or
labels; dates keep their intervals; one patient keeps one pseudonym; readers' feedback corrects
the labels; the private mapping table is written only where configured."""

from __future__ import annotations

import csv
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import yaml
from typer.testing import CliRunner

from models.predictor import OnnxPredictor
from models.registry import resolve
from serving.cli.main import app
from serving.core.screening import StudyScreener, screen_paths
from serving.export.job import CHESTXRAY14
from serving.persistence.results import Provenance, ResultsStore
from serving.persistence.schema import SourceValues, TriggerValues
from tests.conftest import write_synthetic_cxr
from tests.integration.conftest import OrthancServer
from training.datasets import ChestXray14Dataset

pytestmark = pytest.mark.integration

#: every identifying attribute of the PS3.15 Table E.1-1 kind that a chest radiograph may carry
TEXT_CANARIES = {
    "PatientName": "CANARYNAME^ALICE",
    "PatientID": "CANARYPID01",
    "OtherPatientIDs": "CANARYOPID",
    "AccessionNumber": "CANARYACC1",
    "StudyID": "CANARYSID",
    "PatientAddress": "CANARYADDR STREET",
    "ReferringPhysicianName": "CANARYREF^DOC",
    "PerformingPhysicianName": "CANARYPERF^DOC",
    "OperatorsName": "CANARYOPER^TECH",
    "InstitutionName": "CANARYINST HOSPITAL",
    "InstitutionAddress": "CANARYINSTADDR",
    "StationName": "CANARYSTN",
    "DeviceSerialNumber": "CANARYSERIAL",
    "StudyDescription": "CANARYSTUDYDESC",
    "SeriesDescription": "CANARYSERIESDESC",
    "PatientComments": "CANARYCOMMENT",
    "ImageComments": "CANARYIMGCOMMENT",
    "AdmissionID": "CANARYADM",
    "PlacerOrderNumberImagingServiceRequest": "CANARYPLACER",
    "FillerOrderNumberImagingServiceRequest": "CANARYFILLER",
    "RequestingPhysician": "CANARYREQ^DOC",
    "PatientBirthDate": "19230405",
    "PatientTelephoneNumbers": "CANARYPHONE",
}
PRIVATE_CANARY = "CANARYPRIVATE"
STUDY_DATES = ("20230117", "20230216")  # 30 days apart


def _canary_study(path: Path, seed: int, study_date: str) -> pydicom.Dataset:
    write_synthetic_cxr(path, seed=seed, size=(256, 256))
    ds = pydicom.dcmread(path)
    for keyword, value in TEXT_CANARIES.items():
        setattr(ds, keyword, value)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    block = ds.private_block(0x0011, "CANARY CREATOR", create=True)
    block.add_new(0x01, "LO", PRIVATE_CANARY)
    ds.save_as(path.with_suffix(".screened.dcm"))  # what the screening saw (the OOD gate refuses the text)
    # text burned into the pixels by the "modality", in the top band
    pixels = ds.pixel_array.copy()
    text = np.zeros(pixels.shape, np.uint8)
    cv2.putText(text, "CANARY", (4, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
    pixels[text > 0] = pixels.max()
    ds.PixelData = pixels.tobytes()
    ds.BurnedInAnnotation = "YES"
    ds.save_as(path)
    return ds


def _settings(tmp_path: Path, orthanc: OrthancServer, export: dict[str, object]) -> Path:
    path = tmp_path / f"settings-{len(list(tmp_path.glob('settings-*')))}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "cpu"}],
                "store": {
                    "kind": "dicomweb",
                    "dicomweb": {"url": orthanc.dicomweb, "username": orthanc.user, "password": orthanc.password},
                },
                "results": {"sqlite_path": str(tmp_path / "results.sqlite3")},
                "export": export,
            }
        )
    )
    return path


def test_export_passes_the_canary_scan_and_keeps_what_retraining_needs(orthanc: OrthancServer, tmp_path: Path) -> None:
    originals = [
        _canary_study(tmp_path / "in" / f"s{n}.dcm", seed=40 + n, study_date=day) for n, day in enumerate(STUDY_DATES)
    ]
    uids = [str(ds.StudyInstanceUID) for ds in originals]
    canaries = [*TEXT_CANARIES.values(), PRIVATE_CANARY, *STUDY_DATES]
    canaries += [
        str(ds[k].value) for ds in originals for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
    ]
    for n in range(2):
        orthanc.upload(tmp_path / "in" / f"s{n}.dcm")
    # the studies were screened from the store; a reader disagreed with one finding of the first
    screener = StudyScreener([OnnxPredictor(resolve("cxr-triage"), providers="cpu")], study_ref_key=b"k")
    store = ResultsStore(tmp_path / "results.sqlite3")
    for n in range(2):
        (result,) = screen_paths(screener, [tmp_path / "in" / f"s{n}.screened.dcm"])
        assert result.outcome == "SCREENED"
        store.save(result, Provenance(SourceValues.PACS_FETCH, TriggerValues.API))
    first = store.screenings_for(uids[0])[0]
    flipped = first.result.findings[0]
    store.add_feedback(first.screening_uuid, flipped.key, "disagree", "reader-1")
    store.close()
    (tmp_path / "uids.txt").write_text("\n".join(uids))
    mapping = tmp_path / "private" / "mapping.csv"
    settings = _settings(
        tmp_path,
        orthanc,
        {"clean_pixels": [{"x0": 0, "y0": 0, "x1": 1, "y1": 0.15}], "mapping_file": str(mapping)},
    )
    out = tmp_path / "export"
    run = CliRunner().invoke(
        app, ["export", "--uids", str(tmp_path / "uids.txt"), "--out", str(out), "--settings", str(settings)]
    )
    assert run.exit_code == 0, run.output

    # 1. the canary scan: no identifier in any byte of any exported file, labels included
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(list(out.glob("*.dcm"))) == 2 and len(files) == 4  # two images, Data_Entry.csv, export.json
    for path in files:
        content = path.read_bytes()
        found = [c for c in canaries if c.encode() in content or c.encode("utf-16-le") in content]
        assert not found, f"{path.relative_to(out)} carries {found}"
    assert all(c not in run.output for c in canaries)
    # 2. the burned-in text is gone from the pixels (it was there before)
    band = slice(0, int(256 * 0.15))
    assert np.ptp(originals[0].pixel_array[band]) > 0
    for path in out.rglob("*.dcm"):
        exported = pydicom.dcmread(path)
        assert np.ptp(exported.pixel_array[band]) == 0 and exported.BurnedInAnnotation == "NO"
        assert exported.PatientIdentityRemoved == "YES"
        assert not [e for e in exported if e.tag.is_private]
        codes = {item.CodeValue for item in exported.DeidentificationMethodCodeSequence}
        assert {"113100", "113101", "113107"} <= codes
    # 3. longitudinal: one pseudonymous patient, dates shifted with their interval kept
    exported = sorted((pydicom.dcmread(p) for p in out.rglob("*.dcm")), key=lambda d: str(d.StudyDate))
    assert exported[0].PatientID == exported[1].PatientID != originals[0].PatientID
    shifted = [date.fromisoformat(f"{d.StudyDate[:4]}-{d.StudyDate[4:6]}-{d.StudyDate[6:]}") for d in exported]
    assert (shifted[1] - shifted[0]).days == 30 and exported[0].StudyDate != STUDY_DATES[0]
    # 4. ChestX-ray14 labels: AI findings, with the reader's correction; training reads the folder as is
    with (out / "Data_Entry.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["Patient ID"] for r in rows] == ["1", "1"] and sorted(r["Follow-up #"] for r in rows) == ["0", "1"]
    assert sorted(r["Label Source"] for r in rows) == ["ai", "reader"]
    assert all(r["Patient Age"] == "" and r["Patient Gender"] == "" for r in rows)  # option off
    corrected = next(r for r in rows if r["Label Source"] == "reader")
    assert (CHESTXRAY14[flipped.key] in corrected["Finding Labels"]) is (not flipped.positive)
    dataset = ChestXray14Dataset.from_folder(out, label_keys=tuple(f.key for f in first.result.findings))
    assert len(dataset) == 2 and all(p.exists() for p in dataset.files)
    # 5. the private mapping table: only where configured, outside the export
    table = mapping.read_text()
    assert originals[0].PatientID in table and exported[0].PatientID in table
    assert mapping.stat().st_mode & 0o077 == 0


def test_burned_in_images_are_left_out_without_pixel_cleaning(orthanc: OrthancServer, tmp_path: Path) -> None:
    ds = _canary_study(tmp_path / "in" / "s.dcm", seed=50, study_date=STUDY_DATES[0])
    orthanc.upload(tmp_path / "in" / "s.dcm")
    screener = StudyScreener([OnnxPredictor(resolve("cxr-triage"), providers="cpu")], study_ref_key=b"k")
    store = ResultsStore(tmp_path / "results.sqlite3")
    (result,) = screen_paths(screener, [tmp_path / "in" / "s.screened.dcm"])
    store.save(result, Provenance(SourceValues.PACS_FETCH, TriggerValues.API))
    store.close()
    (tmp_path / "uids.txt").write_text(str(ds.StudyInstanceUID))
    out = tmp_path / "export"
    settings = _settings(tmp_path, orthanc, {"retain_longitudinal_dates": False})
    run = CliRunner().invoke(
        app, ["export", "--uids", str(tmp_path / "uids.txt"), "--out", str(out), "--settings", str(settings)]
    )
    assert run.exit_code == 1 and "skipped: 1 UNSUPPORTED_MODALITY" in run.output
    assert not list(out.rglob("*.dcm")) and not list(out.rglob("*.png"))
    assert not (tmp_path / "private").exists()  # no mapping table unless configured
    # with the burned-in band cleaned it goes out, here in the Kvasir-SEG layout (images + masks)
    kvasir = tmp_path / "kvasir"
    settings = _settings(tmp_path, orthanc, {"clean_pixels": [{"x0": 0, "y0": 0, "x1": 1, "y1": 0.15}]})
    command = ["export", "--uids", str(tmp_path / "uids.txt"), "--out", str(kvasir), "--layout", "kvasir"]
    run = CliRunner().invoke(app, [*command, "--settings", str(settings)])
    assert run.exit_code == 0, run.output
    assert [p.stem for p in (kvasir / "images").glob("*.dcm")] == [p.stem for p in (kvasir / "masks").glob("*.png")]
    assert (kvasir / "labels.csv").read_text().count("\n") == 2
