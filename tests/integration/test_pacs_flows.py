"""How studies reach the service, end to end against a real Orthanc and dcmtk peers:

* push: storescu -> Orthanc -> (Lua OnStableStudy -> C-STORE) -> dxassist SCP -> screened -> SR
  stored back into the same study in Orthanc;
* webhook: storescu -> Orthanc -> (Lua OnStableStudy -> HTTP POST) -> dxassist fetches by DICOMweb;
* poller: storescu -> Orthanc; dxassist finds it by QIDO-RS, screens it once, never twice;
* C-GET: the DIMSE study source retrieves from Orthanc.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
import uvicorn

from models.predictor import OnnxPredictor
from models.registry import resolve
from serving.core.screening import InstanceInput, StudyScreener
from serving.dicom.dimse import DimseSource
from serving.dicom.sources import StudySource
from serving.dicom.sources.dicomweb import DicomWebSource
from serving.dicom.store_back import DicomSrSink
from serving.online.api import LazyService, create_api
from serving.online.pipeline import LocalPipeline
from serving.online.service import ScreeningService
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings, PollerSettings, ScpSettings
from tests.conftest import write_synthetic_cxr
from tests.integration.conftest import OrthancServer, free_port, start_orthanc

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
TOKEN = "integration-token"


@contextmanager
def dxassist(
    tmp_path: Path,
    orthanc: OrthancServer,
    *,
    scp_port: int | None = None,
    poll: bool = False,
    api_port: int | None = None,
    failed_fetches: int = 0,
) -> Iterator[tuple[str, ResultsStore]]:
    """The service in this process (LocalPipeline), its API on a real HTTP port. The first
    ``failed_fetches`` study fetches go to a port where no store listens (a real refusal)."""
    manifests = [resolve("cxr-triage").manifest]
    store = ResultsStore(tmp_path / "results.sqlite3")

    def source() -> DicomWebSource:
        return DicomWebSource(
            orthanc.dicomweb, username=orthanc.user, password=orthanc.password, manifests=manifests, timeout_s=10
        )

    screener = StudyScreener([OnnxPredictor(resolve("cxr-triage"), providers="cpu")], study_ref_key=b"k")

    def factory() -> ScreeningService:
        fetch_source: StudySource = source()
        if failed_fetches:
            fetch_source = StoreDownFirst(source(), failed_fetches, manifests)
        return ScreeningService(
            LocalPipeline(screener, fetch_source),
            screener,
            store,
            ApiSettings(spool_dir=tmp_path / "spool", tokens=[TOKEN]),  # type: ignore[list-item]
            sinks={"dicom-sr": DicomSrSink(source())},
            scp=ScpSettings(enabled=scp_port is not None, port=scp_port or 11112, stable_age_s=1.0),
            poller=PollerSettings(enabled=poll, interval_s=0.5, modalities=["CR"], lookback_days=36500),
            poll_source=source(),
        )

    lazy = LazyService(factory)
    port = api_port or free_port()
    server = uvicorn.Server(uvicorn.Config(create_api(lazy), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    import httpx

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
        service = lazy.started
        if service is not None:
            asyncio.run_coroutine_threadsafe(service.drain(5), service._loop).result(10)  # type: ignore[arg-type]
        server.should_exit = True
        thread.join(10)
        store.close()


class StoreDownFirst:
    """A study source whose first fetches hit a dead port (connection refused), then the store."""

    def __init__(self, real: DicomWebSource, failures: int, manifests: list) -> None:  # type: ignore[type-arg]
        self.real, self.failures = real, failures
        self.dead = DicomWebSource(f"http://127.0.0.1:{free_port()}/dicom-web", manifests=manifests, timeout_s=1)

    def instances(self, study_instance_uid: str) -> list[InstanceInput]:
        if self.failures > 0:
            self.failures -= 1
            return self.dead.instances(study_instance_uid)
        return self.real.instances(study_instance_uid)


def storescu(path: Path, port: int, called: str) -> None:
    subprocess.run(["storescu", "-aec", called, "127.0.0.1", str(port), str(path)], check=True, capture_output=True)


def wait_for_sr(orthanc: OrthancServer, study_uid: str, timeout: float = 40.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _sr_count(orthanc, study_uid) >= 1:
            return
        time.sleep(0.25)
    raise AssertionError("no SR appeared in the study")


def _sr_count(orthanc: OrthancServer, study_uid: str) -> int:
    with orthanc.client() as c:
        found = c.post(
            "/tools/find", json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}}
        )
        return len(found.json())


def _overlay_series(orthanc: OrthancServer, study_uid: str) -> int:
    with orthanc.client() as c:
        query = {"StudyInstanceUID": study_uid, "SeriesDescription": "dxassist AI overlay*"}
        return len(c.post("/tools/find", json={"Level": "Series", "Query": query}).json())


@pytest.fixture
def cxr(tmp_path: Path) -> tuple[Path, str]:
    path = write_synthetic_cxr(tmp_path / "in" / "cxr.dcm", seed=91, findings={"pneumothorax": True})
    return path, str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_pushed_study_is_screened_and_its_sr_lands_in_the_same_study(tmp_path: Path, cxr: tuple[Path, str]) -> None:
    scp_port = free_port()
    orthanc, proc = start_orthanc(
        tmp_path / "orthanc",
        modalities={"dxassist": ["DXASSIST", "127.0.0.1", scp_port]},
        lua=REPO / "configs/orthanc/route-to-dxassist-scp.lua",
    )
    try:
        with dxassist(tmp_path, orthanc, scp_port=scp_port) as (_, store):
            start = time.monotonic()
            storescu(cxr[0], orthanc.dicom_port, orthanc.aet)
            wait_for_sr(orthanc, cxr[1])
            elapsed = time.monotonic() - start
            time.sleep(3.0)  # Orthanc sees the study change again; the Lua guard must stop a loop
            assert _sr_count(orthanc, cxr[1]) == 1
            assert store.count() == 1
            # a DIMSE peer sees it too: findscu finds one SR series in the study
            found = subprocess.run(
                [
                    "findscu",
                    "-S",
                    "-aec",
                    orthanc.aet,
                    "-k",
                    "QueryRetrieveLevel=SERIES",
                    "-k",
                    f"StudyInstanceUID={cxr[1]}",
                    "-k",
                    "Modality=SR",
                    "-k",
                    "SeriesDescription",
                    "127.0.0.1",
                    str(orthanc.dicom_port),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            assert found.stderr.count("dxassist AI findings") == 1
            latest = store.latest(cxr[1])
            assert latest is not None and latest.outcome == "SCREENED"
            # viewers without SR support get the heatmap overlay when a finding is positive
            assert _overlay_series(orthanc, cxr[1]) == (1 if latest.positive_findings else 0)
        assert elapsed < 30
    finally:
        proc.terminate()
        proc.wait(10)


def test_webhook_from_orthanc_lua_screens_by_dicomweb(tmp_path: Path, cxr: tuple[Path, str]) -> None:
    api_port = free_port()
    lua = tmp_path / "webhook.lua"
    template = (REPO / "configs/orthanc/notify-dxassist-webhook.lua.template").read_text()
    lua.write_text(
        template.replace("${DXASSIST_URL}", f"http://127.0.0.1:{api_port}").replace("${DXASSIST_TOKEN}", TOKEN)
    )
    orthanc, proc = start_orthanc(tmp_path / "orthanc", lua=lua)
    try:
        with dxassist(tmp_path, orthanc, api_port=api_port) as (_, store):
            storescu(cxr[0], orthanc.dicom_port, orthanc.aet)
            wait_for_sr(orthanc, cxr[1])
            time.sleep(3.0)  # the SR makes the study stable again: the webhook fires, nothing is re-screened
            assert _sr_count(orthanc, cxr[1]) == 1 and store.count() == 1
    finally:
        proc.terminate()
        proc.wait(10)


def test_poller_catches_a_study_and_never_screens_it_twice(
    tmp_path: Path, orthanc: OrthancServer, cxr: tuple[Path, str]
) -> None:
    with dxassist(tmp_path, orthanc, poll=True) as (_, store):
        storescu(cxr[0], orthanc.dicom_port, orthanc.aet)
        wait_for_sr(orthanc, cxr[1])
        time.sleep(2.0)  # several more polls
        assert store.count() == 1 and _sr_count(orthanc, cxr[1]) == 1


def test_poller_offers_a_study_again_after_its_fetch_failed(
    tmp_path: Path, orthanc: OrthancServer, cxr: tuple[Path, str]
) -> None:
    with dxassist(tmp_path, orthanc, poll=True, failed_fetches=1) as (_, store):
        storescu(cxr[0], orthanc.dicom_port, orthanc.aet)
        wait_for_sr(orthanc, cxr[1])
        time.sleep(1.5)  # more polls: screened now, never again
        jobs = [(j.status, j.error_reason) for j in store.jobs_of_study(cxr[1])]
        assert jobs == [("FAILED", "SOURCE_UNAVAILABLE"), ("DONE", None)]
        assert store.count() == 1 and _sr_count(orthanc, cxr[1]) == 1


def test_dimse_c_get_source_retrieves_the_study(orthanc: OrthancServer, cxr: tuple[Path, str]) -> None:
    storescu(cxr[0], orthanc.dicom_port, orthanc.aet)
    source = DimseSource("127.0.0.1", orthanc.dicom_port, orthanc.aet)
    assert cxr[1] in source.search_studies(modality="CR")
    items = source.instances(cxr[1])
    assert len(items) == 1
    got = pydicom.dcmread(io.BytesIO(items[0].source))  # type: ignore[arg-type]
    assert got.SOPInstanceUID == pydicom.dcmread(cxr[0]).SOPInstanceUID
    from models.errors import StudyNotFound

    with pytest.raises(StudyNotFound):
        source.instances("1.2.826.0.1.3680043.8.498.999")


def test_modality_pushes_straight_to_the_scp(tmp_path: Path, orthanc: OrthancServer, cxr: tuple[Path, str]) -> None:
    """storescu as a modality, pushing to dxassist's C-STORE SCP; the SR lands in Orthanc."""
    scp_port = free_port()
    with dxassist(tmp_path, orthanc, scp_port=scp_port) as (_, store):
        start = time.monotonic()
        storescu(cxr[0], scp_port, "DXASSIST")
        deadline = time.monotonic() + 30
        while store.latest(cxr[1]) is None:
            assert time.monotonic() < deadline, "pushed study was not screened"
            time.sleep(0.2)
        assert store.latest(cxr[1]).outcome == "SCREENED"  # type: ignore[union-attr]
        wait_for_sr(orthanc, cxr[1])  # STOW creates the study in the PACS with the SR
        assert time.monotonic() - start < 30
        storescu(cxr[0], scp_port, "DXASSIST")  # the same study pushed again: not screened twice
        time.sleep(2.5)
        assert store.count() == 1
