"""The DICOM result objects of a screened study: SR (TID 1500 with TID 1410 SCOORD groups), GSPS,
Secondary Captures and SEG are valid IODs for dciodvfy (no errors, no warnings), carry what
viewers need (regions on the source image in its pixel coordinates, the finding as the label,
declared coding schemes), and keep their UIDs for the same result."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

import serving.dicom.sc as sc_module
from models.errors import ReasonCode
from models.pixels import decode_frames, read_dataset
from models.predictor import OnnxPredictor
from models.registry import resolve
from models.results import OutcomeValues, ScreeningResult
from models.synthetic.endoscopy import generate_endoscopy_demo
from serving.cli.demo import DEMO_SEED
from serving.core.screening import InstanceInput, StudyScreener
from serving.dicom.common import placed_findings
from serving.dicom.gsps import build_gsps
from serving.dicom.sc import build_scs
from serving.dicom.seg import build_seg
from serving.dicom.sr import build_sr
from tests.conftest import write_synthetic_cxr


@pytest.fixture(scope="module")
def screener() -> StudyScreener:
    return StudyScreener(
        [
            OnnxPredictor(resolve("cxr-triage"), providers="cpu"),
            OnnxPredictor(resolve("endoscopy-polyp"), providers="cpu"),
        ],
        study_ref_key=b"k",
    )


def _screen(screener: StudyScreener, path: Path) -> tuple[ScreeningResult, list, Dataset]:
    image = screener.prepare(InstanceInput(str(path), "x"))
    assert not hasattr(image, "reason"), image
    paired = [(image, screener.infer(image.model_id, image.tensors))]
    return screener.assemble(image.study_instance_uid, paired, []), paired, image.header


@pytest.fixture(scope="module")
def chest(screener: StudyScreener, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    path = write_synthetic_cxr(
        tmp_path_factory.mktemp("sr") / "cxr.dcm",
        seed=81,
        findings={"pneumothorax": True, "pleural_effusion": True},
        size=(640, 560),
    )
    result, _, header = _screen(screener, path)
    assert {f.key for f in result.positive_findings} >= {"pneumothorax"}
    return result, header, path


def dciodvfy(ds: Dataset, path: Path) -> list[str]:
    """dciodvfy's errors and warnings for ``ds``."""
    ds.save_as(path, enforce_file_format=True)
    check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (check.stdout + check.stderr).splitlines() if line.startswith(("Error", "Warning"))]


def test_sr_has_a_scoord_group_per_positive_finding_on_the_source_image(chest: tuple, tmp_path: Path) -> None:
    result, header, _ = chest
    sr = build_sr(result, [header])
    assert dciodvfy(sr, tmp_path / "sr.dcm") == []
    back = pydicom.dcmread(tmp_path / "sr.dcm")
    assert back.StudyInstanceUID == header.StudyInstanceUID and back.PatientID == header.PatientID
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"
    content = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in back.ContentSequence}
    assert "Image Library" in content
    groups = content["Imaging Measurements"].ContentSequence
    assert len(groups) == len(result.positive_findings)
    for group, placed in zip(groups, placed_findings(result, [header]), strict=True):
        items = group.ContentSequence
        scoord = next(i for i in items if i.ValueType == "SCOORD")
        assert scoord.GraphicType == "POLYLINE"
        ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
        assert ref.ReferencedSOPInstanceUID == header.SOPInstanceUID
        xs, ys = scoord.GraphicData[0::2], scoord.GraphicData[1::2]
        assert 0 <= min(xs) < max(xs) <= header.Columns and 0 <= min(ys) < max(ys) <= header.Rows
        # OHIF labels a region with its first NUM: that must be the finding itself
        first_num = next(i for i in items if i.ValueType == "NUM")
        assert first_num.ConceptNameCodeSequence[0].CodeMeaning == placed.finding.code.meaning
        assert first_num.ConceptNameCodeSequence[0].CodingSchemeDesignator == "SCT"
    negatives = content["Qualitative Evaluations"].ContentSequence
    assert len(negatives) == 1 + len(result.findings) - len(groups)  # the summary, then each other finding
    declared = {item.CodingSchemeDesignator for item in back.CodingSchemeIdentificationSequence}
    assert {"DCM", "SCT", "UCUM", "UMLS"} <= declared and not any(d.startswith("99") for d in declared)


def test_same_result_gives_same_uids(chest: tuple) -> None:
    result, header, _ = chest
    a, b = build_sr(result, [header]), build_sr(result, [header])
    assert a.SOPInstanceUID == b.SOPInstanceUID and a.SeriesInstanceUID == b.SeriesInstanceUID
    ga, gb = build_gsps(result, [header]), build_gsps(result, [header])
    assert ga is not None and gb is not None and ga.SOPInstanceUID == gb.SOPInstanceUID != a.SOPInstanceUID


def test_negative_study_gets_one_region_outlining_the_examined_image(chest: tuple, tmp_path: Path) -> None:
    result, header, _ = chest
    negative = result.model_copy(
        update={"findings": [f.model_copy(update={"positive": False}) for f in result.findings], "priority": None}
    )
    sr = build_sr(negative, [header])
    assert dciodvfy(sr, tmp_path / "sr.dcm") == []
    content = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}
    (group,) = content["Imaging Measurements"].ContentSequence  # every group has a SCOORD (OHIF 3.13)
    scoord = next(i for i in group.ContentSequence if i.ValueType == "SCOORD")
    assert list(scoord.GraphicData) == [0, 0, header.Columns, 0, header.Columns, header.Rows, 0, header.Rows, 0, 0]
    finding = next(i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Finding")
    assert finding.ConceptCodeSequence[0].CodeMeaning == "No abnormality detected"
    nums = [i for i in group.ContentSequence if i.ValueType == "NUM"]
    assert len(nums) == len(result.findings)
    values = [float(n.MeasuredValueSequence[0].NumericValue) for n in nums]
    assert values == sorted(values, reverse=True)  # OHIF's label is the first: the highest score


def test_not_screened_result_gets_no_sr(chest: tuple) -> None:
    result, header, _ = chest
    failed = result.model_copy(
        update={
            "outcome": OutcomeValues.NOT_SCREENED,
            "findings": [],
            "reason": ReasonCode.INFERENCE_FAILED,
            "priority": None,
        }
    )
    with pytest.raises(ValueError, match="only a SCREENED"):
        build_sr(failed, [header])


def test_gsps_outlines_each_region_with_a_short_text(chest: tuple, tmp_path: Path) -> None:
    result, header, _ = chest
    gsps = build_gsps(result, [header])
    assert gsps is not None and dciodvfy(gsps, tmp_path / "pr.dcm") == []
    annotation = gsps.GraphicAnnotationSequence[0]
    assert annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
    assert len(annotation.GraphicObjectSequence) == len(result.positive_findings)
    texts = [t.UnformattedTextValue for t in annotation.TextObjectSequence]
    top = max(result.positive_findings, key=lambda f: f.score)
    assert f"AI, preliminary: {top.display} {top.score:.2f}" in texts
    assert any("NOT FOR DIAGNOSIS" in t for t in texts)


def test_secondary_captures_are_registered_to_the_original(
    chest: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    result, header, path = chest
    pixels = decode_frames(read_dataset(str(path)))[0].pixels
    scs = build_scs(result, [header], {(str(header.SOPInstanceUID), None): pixels})
    critical = [f for f in result.positive_findings if f.critical]
    assert len(scs) == len(critical) + 1  # one per critical positive finding, then the summary
    for n, sc in enumerate(scs):
        assert dciodvfy(sc, tmp_path / f"sc{n}.dcm") == []
        assert (sc.Rows, sc.Columns) == (header.Rows, header.Columns)
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
        assert sc.BurnedInAnnotation == "YES" and list(sc.ImageType) == ["DERIVED", "SECONDARY"]
        assert "preliminary" in sc.DerivationDescription
    drawn = scs[-1].pixel_array
    assert drawn[:10].mean() < drawn[10:].mean()  # the black banner strip is on top
    # and the "not for diagnosis" text is burned into it: the same capture without it differs there
    monkeypatch.setattr(sc_module, "BANNER", "")
    blank = build_scs(result, [header], {(str(header.SOPInstanceUID), None): pixels})[-1].pixel_array
    strip = slice(0, max(12, drawn.shape[0] // 20))
    assert (drawn[strip] != blank[strip]).any() and (drawn[strip.stop :] == blank[strip.stop :]).all()


def test_polyp_mask_becomes_a_valid_seg(screener: StudyScreener, tmp_path: Path) -> None:
    generate_endoscopy_demo(tmp_path / "endoscopy", DEMO_SEED)  # the demo set's frames, made here
    result, paired, header = _screen(screener, tmp_path / "endoscopy" / "frame_polyp.dcm")
    assert [f.key for f in result.positive_findings] == ["polyp"]
    segs = build_seg(result, paired, screener.loaded)
    assert len(segs) == 1 and dciodvfy(segs[0], tmp_path / "seg.dcm") == []
    seg = segs[0]
    assert seg.SegmentSequence[0].SegmentLabel == "Colonic polyp"
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        header.SOPInstanceUID
    )
    assert 0 < seg.pixel_array.sum() < header.Rows * header.Columns / 2


def test_cli_dicom_out_writes_valid_objects(tmp_path: Path) -> None:
    import yaml
    from typer.testing import CliRunner

    from serving.cli.main import app

    settings = tmp_path / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "cpu"}],
                "store": {"kind": "local", "path": str(tmp_path / "store")},
                "results": {"sqlite_path": str(tmp_path / "results.sqlite3")},
            }
        )
    )
    cxr = write_synthetic_cxr(tmp_path / "in" / "cxr.dcm", seed=81, findings={"pneumothorax": True}, size=(512, 448))
    out = tmp_path / "out"
    answer = CliRunner().invoke(
        app, ["screen", str(cxr), "--no-save", "--dicom-out", str(out), "--settings", str(settings)]
    )
    assert answer.exit_code == 0, answer.output
    written = sorted(p.name for p in out.rglob("*.dcm"))
    assert written == ["gsps.dcm", "sc-1.dcm", "sc-2.dcm", "sr.dcm"]  # one critical finding + the summary
    for path in out.rglob("*.dcm"):
        check = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        assert not [line for line in check.stderr.splitlines() if line.startswith(("Error", "Warning"))], path.name
    assert "4 DICOM result objects written" in answer.output


def test_sc_of_a_source_with_a_one_part_name_warns_nothing_and_leaves_the_source(chest: tuple) -> None:
    import warnings

    result, _, path = chest
    source = pydicom.dcmread(path, stop_before_pixels=True)
    source.ReferringPhysicianName = "ward"  # highdicom would warn, quoting the name (PHI) in the log
    pixels = decode_frames(read_dataset(str(path)))[0].pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scs = build_scs(result, [source], {(str(source.SOPInstanceUID), None): pixels})
    assert scs and str(scs[0].ReferringPhysicianName) == "ward^"
    assert str(source.ReferringPhysicianName) == "ward"


def test_dcmtk_presentation_state_engine_applies_the_gsps_to_the_image(chest: tuple, tmp_path: Path) -> None:
    """DCMTK's presentation-state engine (the one behind the DICOMscope GSPS viewer) loads the GSPS
    with its image and attaches the AI layer: one outline per positive region, with its caption;
    its presentation-state checker passes. (dcmp2pgm does not burn graphics into pixels.)"""
    result, header, path = chest
    gsps = build_gsps(result, [header])
    assert gsps is not None
    gsps.save_as(tmp_path / "pr.dcm", enforce_file_format=True)
    check = subprocess.run(["dcmpschk", str(tmp_path / "pr.dcm")], capture_output=True, text=True)
    assert "Test passed" in check.stdout + check.stderr
    dump = subprocess.run(
        ["dcmp2pgm", "-v", "-p", str(tmp_path / "pr.dcm"), str(path), str(tmp_path / "out.pgm")],
        capture_output=True,
        text=True,
    )
    text = dump.stdout + dump.stderr
    assert dump.returncode == 0 and "Graphic Layer #1 [AI]" in text
    placed = placed_findings(result, [header])
    assert f"Number of graphic objects: {len(placed)}" in text
    for p in placed:
        x0, y0, x1, y1 = p.box
        assert f"coordinates: {x0:g}\\{y0:g}, {x1:g}\\{y0:g}, {x1:g}\\{y1:g}" in text
        assert f'"{p.caption}"' in text


def _pgm(path: Path) -> np.ndarray:
    data = path.read_bytes()
    header = re.match(rb"P5\s+(?:#[^\n]*\n\s*)*(\d+)\s+(\d+)\s+(\d+)\s", data)
    assert header is not None
    width, height, _ = (int(v) for v in header.groups())
    return np.frombuffer(data[header.end() :], np.uint8)[: width * height].reshape(height, width).astype(float)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_gsps_keeps_the_radiograph_the_right_way_round(
    screener: StudyScreener, tmp_path: Path, photometric: str
) -> None:
    """A viewer applying the GSPS shows the image as it shows it without one: a MONOCHROME1 source
    needs the INVERSE presentation LUT (with IDENTITY, DCMTK's renderer drew the chest inverted)."""
    path = write_synthetic_cxr(
        tmp_path / "cxr.dcm", seed=82, findings={"pneumothorax": True}, size=(512, 512), photometric=photometric
    )
    result, _, header = _screen(screener, path)
    gsps = build_gsps(result, [header])
    assert gsps is not None
    gsps.save_as(tmp_path / "pr.dcm", enforce_file_format=True)
    for args, out in (([], "plain.pgm"), (["-p", str(tmp_path / "pr.dcm")], "pr.pgm")):
        run = subprocess.run(["dcmp2pgm", *args, str(path), str(tmp_path / out)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
    plain, with_pr = _pgm(tmp_path / "plain.pgm"), _pgm(tmp_path / "pr.pgm")
    assert np.corrcoef(plain.ravel(), with_pr.ravel())[0, 1] > 0.9
