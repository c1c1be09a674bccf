"""DICOM SR TID 1500 of a screening result: valid IOD (dciodvfy), findings and algorithm inside,
same UIDs for the same result (no duplicate on re-send), refused for NOT_SCREENED."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest

from models.predictor import OnnxPredictor
from models.registry import resolve
from serving.core.screening import StudyScreener, screen_paths
from serving.dicom.sr import build_sr
from tests.conftest import write_synthetic_cxr


@pytest.fixture(scope="module")
def screened(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    path = write_synthetic_cxr(tmp_path_factory.mktemp("sr") / "cxr.dcm", seed=81, findings={"pneumothorax": True})
    screener = StudyScreener([OnnxPredictor(resolve("cxr-triage"), providers="cpu")], study_ref_key=b"k")
    result = screen_paths(screener, [path])[0]
    return result, pydicom.dcmread(path, stop_before_pixels=True)


def test_sr_is_a_valid_comprehensive_3d_sr(screened: tuple, tmp_path: Path) -> None:
    result, header = screened
    sr = build_sr(result, [header])
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
    back = pydicom.dcmread(path)
    assert back.StudyInstanceUID == header.StudyInstanceUID and back.PatientID == header.PatientID
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True).stdout
    assert "Pneumothorax" in dump and "cxr-triage" in dump and "threshold=" in dump


def test_same_result_gives_same_sr_uids(screened: tuple) -> None:
    result, header = screened
    a, b = build_sr(result, [header]), build_sr(result, [header])
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID


def test_not_screened_result_has_no_sr(screened: tuple) -> None:
    result, header = screened
    with pytest.raises(ValueError, match="only SCREENED"):
        build_sr(result.model_copy(update={"outcome": "NOT_SCREENED", "findings": []}), [header])


def test_heatmap_secondary_capture_is_valid_and_labelled(screened: tuple, tmp_path: Path) -> None:
    import numpy as np

    from serving.dicom.sc import BANNER, build_sc, render_overlay

    result, header = screened
    image = np.random.default_rng(0).random((1, 224, 224), dtype=np.float32)
    heat = np.zeros((7, 7), np.float32)
    heat[2, 5] = 1.0
    overlay = render_overlay(image, heat, "Pneumothorax 0.97")
    assert overlay.shape == (512, 512, 3) and overlay.dtype == np.uint8
    assert overlay[:24].mean() < overlay[24:].mean()  # the banner strip is drawn
    sc = build_sc(result, header, overlay)
    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    assert [line for line in (check.stdout + check.stderr).splitlines() if line.startswith("Error")] == []
    back = pydicom.dcmread(path)
    assert back.StudyInstanceUID == header.StudyInstanceUID and back.BurnedInAnnotation == "YES"
    assert "NOT FOR DIAGNOSIS" in BANNER and back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
