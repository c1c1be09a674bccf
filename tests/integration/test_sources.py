"""StudySource contract, run against every implementation, plus DICOMweb failure behaviour
against real peers (a real Orthanc; a closed port; a server that accepts and never answers)."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from models.errors import SourceUnavailable, StudyNotFound
from models.pixels import load_frames
from models.registry import resolve
from serving.dicom.dimse import DimseSource
from serving.dicom.sources.dicomweb import DicomWebSource
from serving.dicom.sources.local import LocalFolderSource
from serving.online.factory import build_source
from serving.settings import Settings
from tests.conftest import write_synthetic_cxr
from tests.integration.conftest import OrthancServer

pytestmark = pytest.mark.integration


def _study(folder: Path, encoding: str = "explicit") -> tuple[str, Path]:
    cxr = write_synthetic_cxr(folder / "cxr.dcm", seed=71, encoding=encoding, bits=16)
    return str(pydicom.dcmread(cxr, stop_before_pixels=True).StudyInstanceUID), cxr


@pytest.fixture(params=["local", "dicomweb", "dimse", "dimse-move"])
def source_and_study(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[object, str, Path]]:
    uid, cxr = _study(tmp_path / "files", encoding="j2k")  # compressed: must come back as stored
    if request.param == "local":
        yield LocalFolderSource(tmp_path / "files"), uid, cxr
        return
    orthanc: OrthancServer = request.getfixturevalue("orthanc")
    orthanc.upload(cxr)
    # every store path is chosen by the settings alone (the factory the service uses)
    kind = request.param.split("-")[0]
    store: dict[str, object] = {"kind": kind}
    scp: dict[str, object] = {}
    if kind == "dimse":
        store["dimse"] = {"host": "127.0.0.1", "port": orthanc.dicom_port, "called_ae_title": orthanc.aet}
        if request.param == "dimse-move":  # Orthanc moves the study to our SCP's port (its DicomModalities)
            store["dimse"] |= {"retrieve": "move"}  # type: ignore[operator]
            scp = {"port": orthanc.dxassist_port}
    else:
        store["dicomweb"] = {"url": orthanc.dicomweb, "username": orthanc.user, "password": orthanc.password}
    settings = Settings.model_validate({"models": [{"id": "cxr-triage"}], "store": store, "scp": scp})
    source = build_source(settings)
    assert isinstance(source, DimseSource if kind == "dimse" else DicomWebSource)
    if request.param == "dimse-move":
        assert isinstance(source, DimseSource) and source.retrieve == "move"
    yield source, uid, cxr
    close = getattr(source, "close", None)
    if close is not None:
        close()


def test_searches_page_through_every_result(orthanc: OrthancServer, tmp_path: Path) -> None:
    """QIDO-RS answers in pages: a sweep with a page smaller than the result set sees every study."""
    uids = []
    for n in range(5):
        cxr = write_synthetic_cxr(tmp_path / f"p{n}.dcm", seed=300 + n)
        uids.append(str(pydicom.dcmread(cxr, stop_before_pixels=True).StudyInstanceUID))
        orthanc.upload(cxr)
    with DicomWebSource(orthanc.dicomweb, username=orthanc.user, password=orthanc.password) as source:
        found = source.search_studies(modality="CR", page_size=2)
    assert set(uids) <= set(found)
    assert len(found) == len(set(found))


def test_source_returns_the_study_instances_as_stored(source_and_study: tuple) -> None:
    source, uid, original = source_and_study
    items = source.instances(uid)
    assert len(items) == 1
    src = items[0].source
    data = Path(src).read_bytes() if isinstance(src, str | Path) else src
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    got = load_frames(data)[0].pixels
    np.testing.assert_array_equal(got, load_frames(original)[0].pixels)


def test_source_unknown_study_is_study_not_found(source_and_study: tuple) -> None:
    source, _, _ = source_and_study
    with pytest.raises(StudyNotFound) as info:
        source.instances("1.2.826.0.1.3680043.8.498.1")
    assert "1.2.826" not in str(info.value)


def test_dicomweb_search_and_retrieve_only_what_a_model_accepts(orthanc: OrthancServer, tmp_path: Path) -> None:
    uid, cxr = _study(tmp_path)
    orthanc.upload(cxr)
    # a second, non-image instance in the same study (a structured report)
    sr = pydicom.dcmread(pydicom.data.get_testdata_file("reportsi.dcm"))
    sr.StudyInstanceUID = uid
    sr.SeriesInstanceUID = pydicom.uid.generate_uid()
    sr.SOPInstanceUID = pydicom.uid.generate_uid()
    sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
    sr.save_as(tmp_path / "sr.dcm")
    orthanc.upload(tmp_path / "sr.dcm")
    manifests = [resolve("cxr-triage").manifest]
    with DicomWebSource(
        orthanc.dicomweb, username=orthanc.user, password=orthanc.password, manifests=manifests
    ) as source:
        assert uid in source.search_studies(modality="CR")
        assert len(source.list_instances(uid)) == 2
        assert len(source.instances(uid)) == 1  # the SR is never downloaded
    with (
        DicomWebSource(orthanc.dicomweb, username=orthanc.user, password="wrong", retries=0) as wrong,
        pytest.raises(SourceUnavailable, match="HTTP 401"),
    ):
        wrong.search_studies()


def test_dicomweb_stow_stores_into_the_same_study(orthanc: OrthancServer, tmp_path: Path) -> None:
    uid, cxr = _study(tmp_path)
    orthanc.upload(cxr)
    extra = write_synthetic_cxr(tmp_path / "derived.dcm", seed=71, photometric="MONOCHROME1")
    ds = pydicom.dcmread(extra)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    with DicomWebSource(orthanc.dicomweb, username=orthanc.user, password=orthanc.password) as source:
        source.store([ds])
    assert len(orthanc.study_instances(uid)) == 2


def test_store_down_retries_with_backoff_then_fails_clearly() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connection refused
    delays: list[float] = []
    with (
        DicomWebSource(f"http://127.0.0.1:{port}/dicom-web", retries=3, backoff_s=0.1, sleep=delays.append) as source,
        pytest.raises(SourceUnavailable, match="after 4 attempts"),
    ):
        source.instances("1.2.3")
    # exponential from 0.1 s, plus up to 0.1 s of jitter each (never all on the bare schedule)
    assert len(delays) == 3
    assert all(0.1 * 2**i <= d <= 0.1 * 2**i + 0.1 for i, d in enumerate(delays))
    assert delays != [0.1, 0.2, 0.4]


def test_store_that_never_answers_times_out_and_fails_within_bounds() -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # accept, never answer
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.getsockname()[1]}/dicom-web"
        start = time.monotonic()
        with (
            DicomWebSource(url, timeout_s=0.3, retries=1, backoff_s=0.05) as source,
            pytest.raises(SourceUnavailable, match="ReadTimeout"),
        ):
            source.search_studies()
        assert time.monotonic() - start < 3.0
    finally:
        stop.set()
        thread.join()
        for c in held:
            c.close()
        server.close()
