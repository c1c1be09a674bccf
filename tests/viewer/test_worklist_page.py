"""The reading worklist page in Debian's chromium, against the running service with a real Orthanc.

Studies are stored in Orthanc and screened through the API seconds before the page is read:
one with findings (pneumothorax), one negative, one not screened (a leg), and one uploaded while
the PACS is down so its store-back delivery fails. The page must show each outcome class, draw
the AI region over the image, save a reader's feedback, and pick up a new result without a reload.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from models.predictor import OnnxPredictor
from models.registry import resolve
from serving.core.screening import StudyScreener
from serving.dicom.sources.dicomweb import DicomWebSource
from serving.dicom.store_back import DicomSrSink
from serving.online.api import LazyService, create_api
from serving.online.pipeline import LocalPipeline
from serving.online.service import ScreeningService
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings
from tests.conftest import write_synthetic_cxr
from tests.integration.conftest import OrthancServer, free_port, start_orthanc

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
READER = "reader-secret-for-tests"
DOC_SCREENSHOTS = os.environ.get("DXASSIST_DOC_SCREENSHOTS") == "1"


@contextmanager
def service(tmp_path: Path, orthanc: OrthancServer) -> Iterator[tuple[str, ResultsStore]]:
    """dxassist in this process: studies fetched from Orthanc, results stored back into it."""
    manifests = [resolve("cxr-triage").manifest]
    store = ResultsStore(tmp_path / "results.sqlite3")

    def source() -> DicomWebSource:
        return DicomWebSource(
            orthanc.dicomweb, username=orthanc.user, password=orthanc.password, manifests=manifests, timeout_s=5
        )

    screener = StudyScreener([OnnxPredictor(resolve("cxr-triage"), providers="cpu")], study_ref_key=b"k")

    def factory() -> ScreeningService:
        return ScreeningService(
            LocalPipeline(screener, source()),
            screener,
            store,
            ApiSettings(
                spool_dir=tmp_path / "spool",
                tokens=[f"reader-1:reader:{READER}", "admin-for-tests"],  # type: ignore[list-item]
                ohif_url="http://ohif.example",
            ),
            sinks={"dicom-sr": DicomSrSink(source(), objects=["sr", "gsps"])},
        )

    lazy = LazyService(factory)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_api(lazy), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}", store
    finally:
        started = lazy.started
        if started is not None:
            asyncio.run_coroutine_threadsafe(started.drain(5), started._loop).result(10)  # type: ignore[arg-type]
        server.should_exit = True
        thread.join(10)
        store.close()


def _screen(base: str, study_uid: str) -> str:
    answer = httpx.post(
        f"{base}/v1/screenings?wait=60",
        json={"study_instance_uid": study_uid},
        headers={"Authorization": "Bearer admin-for-tests"},
        timeout=70,
    )
    answer.raise_for_status()
    body = answer.json()
    assert body["status"] == "DONE", body
    return str(body["screening_id"])


def _study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _wait_delivered(store: ResultsStore, timeout: float = 30.0) -> None:
    from serving.persistence.outbox import Outbox

    outbox = Outbox(store.target)
    try:
        deadline = time.monotonic() + timeout
        while outbox.status().pending and time.monotonic() < deadline:
            time.sleep(0.2)
        assert outbox.status().pending == 0
    finally:
        outbox.close()


def test_worklist_page_shows_every_outcome_draws_regions_and_saves_feedback(browser: Any, tmp_path: Path) -> None:
    orthanc, proc = start_orthanc(tmp_path / "orthanc")
    files = {
        "findings": write_synthetic_cxr(
            tmp_path / "a.dcm", seed=81, findings={"pneumothorax": True}, size=(640, 560), patient_name="FINDINGS^A"
        ),
        "negative": write_synthetic_cxr(tmp_path / "b.dcm", seed=82, patient_name="NEGATIVE^B"),
        "not-screened": write_synthetic_cxr(tmp_path / "c.dcm", seed=83, body_part="LEG", patient_name="LEG^C"),
    }
    late = write_synthetic_cxr(tmp_path / "d.dcm", seed=84, findings={"pneumothorax": True}, patient_name="LATE^D")
    try:
        with service(tmp_path, orthanc) as (base, store):
            ids = {}
            for kind, path in files.items():
                orthanc.upload(path)
                ids[kind] = _screen(base, _study_uid(path))
            _wait_delivered(store)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{base}/ui/")
            page.fill("#token", READER)
            page.press("#token", "Enter")
            for kind, sid in ids.items():
                row = page.locator(f'tr[data-screening-id="{sid}"]')
                row.wait_for(timeout=20_000)
                assert row.get_attribute("data-outcome") == kind
                assert row.get_attribute("data-delivery-failed") == "false"
            # live updates come from the event stream (Server-Sent Events), not from polling
            _wait_until(page, "() => document.getElementById('live').dataset.mode === 'stream'")
            first = page.locator("#worklist tbody tr").first
            assert first.get_attribute("data-screening-id") == ids["findings"]  # URGENT reads first
            assert "URGENT" in first.inner_text() and "Pneumothorax" in first.inner_text()
            assert (
                "UNSUPPORTED_BODY_PART" in page.locator(f'tr[data-screening-id="{ids["not-screened"]}"]').inner_text()
            )

            # study view: the image from the store with the AI region drawn over it, toggled by "o"
            page.locator(f'tr[data-screening-id="{ids["findings"]}"]').click()
            canvas = page.locator("#canvas")
            _wait_until(page, "() => document.getElementById('canvas').dataset.regions === '1'")
            assert canvas.get_attribute("width") == "560" and canvas.get_attribute("height") == "640"
            red = page.evaluate(_edge_pixel_js())
            assert red[0] > 200 and red[1] < 100, red  # the critical finding's outline is red
            assert page.locator("#ohif").get_attribute("href", timeout=1000).startswith("http://ohif.example/viewer")
            if DOC_SCREENSHOTS:
                page.screenshot(path=str(REPO / "docs/img/worklist-study.png"))
            page.locator("#back").focus()
            page.keyboard.press("o")
            _wait_until(page, "() => document.getElementById('canvas').dataset.regions === '0'")
            page.keyboard.press("o")

            # feedback on the pneumothorax finding is stored in the results database
            finding = page.locator('#findings tr[data-finding="pneumothorax"]')
            finding.locator("input").fill("clear pleural line")
            finding.locator('button[data-verdict="agree"]').click()
            # the pressed state, not the status line: a refresh arriving meanwhile rewrites that line,
            # while the button stays pressed (set on save, then from the stored verdict)
            _wait_until(
                page,
                '() => document.querySelector(\'#findings tr[data-finding="pneumothorax"] '
                "button[data-verdict=\"agree\"]')?.getAttribute('aria-pressed') === 'true'",
            )
            saved = store.feedback_for(ids["findings"])
            assert [(f.finding_key, str(f.verdict), f.comment, f.reader_id) for f in saved] == [
                ("pneumothorax", "agree", "clear pleural line", "reader-1")
            ]

            # the PACS goes down; a study uploaded now is screened, its store-back fails, and the
            # open page shows it without a reload
            proc.terminate()
            proc.wait(10)
            page.keyboard.press("Escape")
            events = int(page.locator("#live").get_attribute("data-events") or 0)
            with late.open("rb") as fh:
                answer = httpx.post(
                    f"{base}/v1/screenings/upload?wait=60",
                    files={"files": ("d.dcm", fh, "application/dicom")},
                    headers={"Authorization": "Bearer admin-for-tests"},
                    timeout=70,
                )
            assert answer.status_code in (200, 202) and answer.json()["status"] == "DONE", answer.text
            late_id = answer.json()["screening_id"]
            late_row = page.locator(f'tr[data-screening-id="{late_id}"][data-delivery-failed="true"]')
            late_row.wait_for(timeout=30_000)
            assert "FAILED" in late_row.inner_text()
            assert page.locator("#live").get_attribute("data-mode") == "stream"
            assert int(page.locator("#live").get_attribute("data-events") or 0) > events  # the stream told it
            if DOC_SCREENSHOTS:  # every outcome class on one page
                page.screenshot(path=str(REPO / "docs/img/worklist.png"))
            page.select_option("#f-status", "delivery-failed")
            shown = page.locator("#worklist tbody tr")
            assert [shown.nth(i).get_attribute("data-screening-id") for i in range(shown.count())] == [late_id]
            page.close()

            # where the stream cannot be had (a draining service, a proxy that refuses it) the
            # page polls instead
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.route("**/v1/ui/events", lambda route: route.fulfill(status=503, body="draining"))
            page.goto(f"{base}/ui/")
            page.fill("#token", READER)
            page.press("#token", "Enter")
            page.locator(f'tr[data-screening-id="{late_id}"]').wait_for(timeout=20_000)
            _wait_until(page, "() => document.getElementById('live').dataset.cause === 'poll'")  # a timed re-read
            assert page.locator("#live").get_attribute("data-mode") == "polling"
            page.close()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_until(page: Any, predicate: str, timeout: float = 20.0) -> None:
    """Poll a JS predicate (the page's CSP forbids eval, which ``wait_for_function`` needs)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(predicate):
        assert time.monotonic() < deadline, f"not true within {timeout} s: {predicate}"
        page.wait_for_timeout(100)


def _edge_pixel_js() -> str:
    """RGBA of the canvas pixel on the left edge of the first drawn region, half-way down."""
    return """() => {
      const c = document.getElementById('canvas');
      const [x, y, w, h] = JSON.parse(c.dataset.boxes)[0];
      return Array.from(c.getContext('2d').getImageData(x, y + Math.round(h / 2), 1, 1).data);
    }"""
