"""A viewer that applies presentation states draws dxassist's GSPS regions on the chest image.

OHIF 3.13 has no presentation-state support and DCMTK's renderer (``dcmp2pgm``) applies a GSPS's
LUTs but not its graphics, so the renderer here is Larvitar (npm ``larvitar``, the pinned dist
that ``scripts/install_servers.sh`` unpacks into ``tests/viewer/.larvitar/``): a cornerstone
viewer library whose GSPS tool draws Graphic Annotation Sequence polylines and text objects.

The study is screened, its result objects are stored into real Orthanc by the store-back sink,
and the image and the presentation state are read back from Orthanc as the PACS keeps them.
Debian's chromium renders the image alone, then with the GSPS applied; the assertions read the
two renderings' pixels: they differ along each positive region's outline (mapped to the canvas
through the viewport's own transform), in each region's caption box and in the "not for
diagnosis" banner, and nowhere else (the GSPS keeps the image's own window, so the radiograph
itself looks the same).
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image

from serving.dicom.common import placed_findings
from tests.conftest import write_synthetic_cxr
from tests.integration.conftest import OrthancServer
from tests.viewer.test_ohif import _screen_and_store

pytestmark = pytest.mark.integration
DOC_SCREENSHOTS = os.environ.get("DXASSIST_DOC_SCREENSHOTS") == "1"
REPO = Path(__file__).resolve().parents[2]

LARVITAR_VERSION = "3.8.7"  # scripts/install_servers.sh pins the same
LARVITAR_JS = Path(__file__).parent / ".larvitar" / "package" / "dist" / "larvitar.js"
PAGE = Path(__file__).parent / "gsps_page.html"
GSPS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
#: a canvas pixel counts as changed by the GSPS when a colour channel moves by more than this
CHANGED = 24
#: how far (canvas px) a drawn outline may sit from where the region's edge maps
SLACK = 3


class _PageServer:
    """The test page, the Larvitar dist and the two Part-10 files on one 127.0.0.1 origin."""

    def __init__(self, files: dict[str, tuple[bytes, str]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def do_GET(self) -> None:
                body, kind = files.get(self.path.split("?")[0], (b"not found", "text/plain"))
                self.send_response(200 if self.path.split("?")[0] in files else 404)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> _PageServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def _stored_objects(orthanc: OrthancServer, study_uid: str, image_uid: str) -> tuple[bytes, bytes]:
    """The source image and the GSPS, as Orthanc returns them."""
    image = gsps = None
    with orthanc.client() as client:
        for instance in orthanc.study_instances(study_uid):
            data = client.get(f"/instances/{instance['ID']}/file")
            data.raise_for_status()
            ds = pydicom.dcmread(io.BytesIO(data.content), stop_before_pixels=True)
            if str(ds.SOPInstanceUID) == image_uid:
                image = data.content
            elif str(ds.SOPClassUID) == GSPS_SOP_CLASS:
                assert gsps is None, "one GSPS per study"
                gsps = data.content
    assert image is not None and gsps is not None, "the image and its GSPS are in the study"
    return image, gsps


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _near(mask: np.ndarray, radius: int) -> np.ndarray:
    """``mask`` grown by ``radius`` pixels (a square neighbourhood)."""
    grown = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            grown |= np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
    return grown


def _rect_mask(shape: tuple[int, ...], box: tuple[float, float, float, float], pad: int) -> np.ndarray:
    mask = np.zeros(shape[:2], dtype=bool)
    x0, y0, x1, y1 = box
    mask[
        max(0, int(np.floor(y0)) - pad) : max(0, int(np.ceil(y1)) + pad + 1),
        max(0, int(np.floor(x0)) - pad) : max(0, int(np.ceil(x1)) + pad + 1),
    ] = True
    return mask


def _outline_mask(shape: tuple[int, ...], box: tuple[float, float, float, float], pad: int) -> np.ndarray:
    """The band of ``pad`` pixels either side of a rectangle's four edges."""
    x0, y0, x1, y1 = box
    inner = (x0 + pad + 1, y0 + pad + 1, x1 - pad - 1, y1 - pad - 1)
    band = _rect_mask(shape, box, pad)
    if inner[0] < inner[2] and inner[1] < inner[3]:
        band &= ~_rect_mask(shape, inner, 0)
    return band


def _canvas_box(page: Any, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    (ax, ay), (bx, by) = page.evaluate("points => toCanvas(points)", [[box[0], box[1]], [box[2], box[3]]])
    return (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))


def _text_boxes(pr: pydicom.Dataset) -> dict[str, tuple[float, float, float, float]]:
    """Each text object's bounding box (image pixels), by its text."""
    boxes = {}
    for annotation in pr.GraphicAnnotationSequence:
        for text in annotation.TextObjectSequence:
            (x0, y0), (x1, y1) = text.BoundingBoxTopLeftHandCorner, text.BoundingBoxBottomRightHandCorner
            boxes[str(text.UnformattedTextValue)] = (float(x0), float(y0), float(x1), float(y1))
    return boxes


@pytest.fixture
def larvitar_js() -> Iterator[bytes]:
    if not LARVITAR_JS.is_file():
        pytest.fail(f"larvitar {LARVITAR_VERSION} dist missing: scripts/install_servers.sh unpacks it")
    yield LARVITAR_JS.read_bytes()


def test_a_presentation_state_viewer_draws_each_region_where_the_finding_is(
    orthanc: OrthancServer, browser: Any, larvitar_js: bytes, tmp_path: Path
) -> None:
    path = write_synthetic_cxr(
        tmp_path / "cxr.dcm", seed=81, findings={"pneumothorax": True, "pleural_effusion": True}, size=(1024, 896)
    )
    header = pydicom.dcmread(path, stop_before_pixels=True)
    result, study_uid = _screen_and_store(orthanc, path)
    placed = placed_findings(result, [header])
    assert len(placed) >= 2  # two regions, each with its outline and caption
    image, gsps = _stored_objects(orthanc, study_uid, str(header.SOPInstanceUID))
    texts = _text_boxes(pydicom.dcmread(io.BytesIO(gsps)))
    banner = next(box for text, box in texts.items() if "NOT FOR DIAGNOSIS" in text.upper())

    files = {
        "/": (PAGE.read_bytes(), "text/html"),
        "/larvitar.js": (larvitar_js, "application/javascript"),
        "/image.dcm": (image, "application/dicom"),
        "/pr.dcm": (gsps, "application/dicom"),
    }
    errors: list[str] = []
    with _PageServer(files) as server:
        page = browser.new_page(viewport={"width": 800, "height": 800})
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(server.url + "/")
        shown = page.evaluate("showImage()")
        canvas = page.locator("#viewer canvas").first
        before = _pixels(canvas.screenshot())
        applied = page.evaluate("applyPresentationState()")
        after = _pixels(canvas.screenshot())
        if DOC_SCREENSHOTS:
            page.screenshot(path=str(REPO / "docs/img/gsps-larvitar.png"))
        boxes = [_canvas_box(page, p.box) for p in placed]
        caption_boxes = [_canvas_box(page, texts[p.caption]) for p in placed]
        banner_box = _canvas_box(page, banner)
        page.close()

    assert not errors, errors
    assert shown == str(header.SOPInstanceUID)
    assert applied["referenced"] == [str(header.SOPInstanceUID)]  # the GSPS applies to the image shown
    assert applied["objects"] == 2 * len(placed) + 1  # outlines, captions, banner
    changed = (np.abs(after - before) > CHANGED).any(axis=2)
    near_changed = _near(changed, SLACK)
    # Larvitar strokes polylines in black: an outline shows where the image around it is not black
    visible = ~_near(before.max(axis=2) <= 2 * CHANGED, SLACK)

    for p, (x0, y0, x1, y1) in zip(placed, boxes, strict=True):
        # the outline runs along every edge of the region, where the region maps on the canvas
        xs, ys = np.linspace(x0, x1, 120), np.linspace(y0, y1, 120)
        edges = {
            "top": [(x, y0) for x in xs],
            "bottom": [(x, y1) for x in xs],
            "left": [(x0, y) for y in ys],
            "right": [(x1, y) for y in ys],
        }
        for edge, points in edges.items():
            cells = [(min(int(y), 799), min(int(x), 799)) for x, y in points]
            seen = [c for c in cells if visible[c]]
            assert len(seen) >= 0.25 * len(cells), f"{p.finding.key}: {edge} edge mostly over black"
            hit = np.mean([near_changed[c] for c in seen])
            assert hit >= 0.9, f"{p.finding.key}: {edge} edge drawn at {hit:.0%} of its visible length"
        # and not across the region: its inside stays the image
        inside = _rect_mask(changed.shape, (x0 + 2 * SLACK, y0 + 2 * SLACK, x1 - 2 * SLACK, y1 - 2 * SLACK), 0)
        for caption_box in caption_boxes:
            inside &= ~_rect_mask(changed.shape, caption_box, SLACK)
        for other, other_box in zip(placed, boxes, strict=True):
            if other is not p:
                inside &= ~_outline_mask(changed.shape, other_box, SLACK)
        assert changed[inside].mean() < 0.001, f"{p.finding.key}: the region's inside was drawn over"

    for p, box, region in zip(placed, caption_boxes, boxes, strict=True):
        # the caption is written at its region's top-left corner (the text's pixels in its box)
        assert abs(box[0] - region[0]) <= SLACK and box[1] - SLACK <= region[1] <= box[3] + SLACK
        assert changed[_rect_mask(changed.shape, box, 0)].sum() > 50, f"{p.finding.key}: no caption drawn"

    # nothing else changes: the radiograph keeps its window, no stray graphics
    expected = _rect_mask(changed.shape, banner_box, SLACK)
    for box in boxes:
        expected |= _outline_mask(changed.shape, box, SLACK)
    for box in caption_boxes:
        expected |= _rect_mask(changed.shape, box, SLACK)
    stray = changed & ~expected
    assert stray.sum() <= 0.0005 * stray.size, f"{int(stray.sum())} canvas pixels changed away from the GSPS graphics"
    assert changed.sum() > 0
