"""OHIF (the pinned ``@ohif/app`` dist) shows dxassist's AI findings as labelled regions on the
original chest image: the study is screened, its result objects are stored into real Orthanc by
the store-back sink, and the assertions read the rendered page.

OHIF 3.13 draws an SR's TID 1410 SCOORD groups as boxes with a text box whose first line is the
group's first NUM (``<concept meaning>: <value> <unit>``): dxassist makes that the finding. It
crashes ("Something went wrong") on an SR with a group without SCOORD or with no group at all:
the negative study's SR must open cleanly too.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pydicom
import pytest

from models.predictor import OnnxPredictor
from models.registry import resolve
from serving.core.screening import InstanceInput, StudyScreener
from serving.dicom.sources.dicomweb import DicomWebSource
from serving.dicom.store_back import DicomSrSink
from tests.conftest import write_synthetic_cxr
from tests.integration.conftest import OrthancServer
from tests.viewer.ohif_server import OHIF_DIST, OhifServer

pytestmark = pytest.mark.integration
DOC_SCREENSHOTS = os.environ.get("DXASSIST_DOC_SCREENSHOTS") == "1"
REPO = Path(__file__).resolve().parents[2]


def _screen_and_store(orthanc: OrthancServer, path: Path) -> tuple[Any, str]:
    """Screen ``path`` with the reference chest model and store it and its result objects
    (SR, GSPS, SC) into Orthanc through the store-back sink."""
    screener = StudyScreener([OnnxPredictor(resolve("cxr-triage"), providers="cpu")], study_ref_key=b"k")
    image = screener.prepare(InstanceInput(str(path), "chest"))
    paired = [(image, screener.infer(image.model_id, image.tensors))]  # type: ignore[union-attr]
    result = screener.assemble(image.study_instance_uid, paired, [])
    orthanc.upload(path)
    source = DicomWebSource(orthanc.dicomweb, username=orthanc.user, password=orthanc.password, timeout_s=10)
    sink = DicomSrSink(source, objects=["sr", "gsps", "sc"])
    try:
        sink.deliver(1, result, [image.header])  # type: ignore[union-attr]
    finally:
        sink.close()
    return result, str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_ohif_shows_each_positive_finding_as_a_labelled_region(
    orthanc: OrthancServer, browser: Any, tmp_path: Path
) -> None:
    if not (OHIF_DIST / "index.html").is_file():
        pytest.fail("OHIF dist missing: scripts/install_servers.sh packs @ohif/app into tests/viewer/.ohif")
    path = write_synthetic_cxr(
        tmp_path / "cxr.dcm", seed=81, findings={"pneumothorax": True, "pleural_effusion": True}, size=(1024, 896)
    )
    result, study_uid = _screen_and_store(orthanc, path)
    positives = [f for f in result.findings if f.positive and f.region is not None]
    negatives = [f for f in result.findings if not f.positive]
    assert len(positives) >= 2 and negatives  # the document mixes regions and negatives
    with OhifServer(orthanc.url, orthanc.user, orthanc.password) as ohif:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{ohif.url}/viewer?StudyInstanceUIDs={study_uid}")
        page.locator(".cornerstone-canvas, canvas").first.wait_for(timeout=90_000)  # the viewport is up
        skip = page.get_by_text("Skip all")
        if skip.count():
            skip.click()
        page.get_by_text("dxassist AI findings").first.dblclick(timeout=60_000)
        labels = page.locator("svg text")
        first_lines = set()
        for finding in positives:
            box = labels.filter(has_text=f"{finding.code.meaning}:").first
            box.wait_for(timeout=60_000)
            first_lines.add(box.locator("tspan").first.text_content() or box.text_content() or "")
        if DOC_SCREENSHOTS:
            page.screenshot(path=str(REPO / "docs/img/ohif-sr.png"))
        texts = [labels.nth(i).text_content() or "" for i in range(labels.count())]
        page.close()

        # a negative study: its SR outlines the examined image, labelled with the top score
        negative, negative_uid = _screen_and_store(orthanc, write_synthetic_cxr(tmp_path / "neg.dcm", seed=82))
        assert negative.outcome == "SCREENED" and not negative.positive_findings
        top = max(negative.findings, key=lambda f: f.score)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(f"{ohif.url}/viewer?StudyInstanceUIDs={negative_uid}")
        page.locator(".cornerstone-canvas, canvas").first.wait_for(timeout=90_000)
        if page.get_by_text("Skip all").count():
            page.get_by_text("Skip all").click()
        page.get_by_text("dxassist AI findings").first.dblclick(timeout=60_000)
        whole = page.locator("svg text").filter(has_text=f"{top.code.meaning}:").first
        whole.wait_for(timeout=60_000)
        assert not page.get_by_text("Something went wrong").count()
        page.close()
    assert not [e for e in errors if "ReferencedSOPSequence" in e or "displaySetInstanceUID" in e], errors
    # one labelled box per positive finding; its first line is the finding, not the finding site
    assert len([t for t in texts if "Threshold Value" in t]) == len(positives)
    for finding in positives:
        assert any(line.startswith(f"{finding.code.meaning}:") for line in first_lines), first_lines
    for finding in negatives:
        assert not any(t.startswith(f"{finding.code.meaning}:") for t in texts)
