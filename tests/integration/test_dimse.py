"""DIMSE paths against real peers: AE-title refusals seen from dcmtk ``storescu`` and
``movescu``, a durable SCP spool across a restart, C-MOVE through the service's own SCP, and
DICOM TLS against Orthanc."""

from __future__ import annotations

import io
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest

from serving.dicom.dimse import HANDED_FILE, UID_FILE, DimseSource, StoreScp, tls_context
from tests.conftest import write_synthetic_cxr
from tests.integration.conftest import OrthancServer, free_port, start_orthanc

pytestmark = pytest.mark.integration


def _copy_in_study(source: Path, target: Path, *, new_sop: bool) -> Path:
    """``source`` again (same study), as a second instance when ``new_sop``."""
    ds = pydicom.dcmread(source)
    if new_sop:
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target)
    return target


def storescu(path: Path, port: int, *, calling: str, called: str = "DXASSIST") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "-aet", calling, "-aec", called, "127.0.0.1", str(port), str(path)],
        capture_output=True,
        text=True,
    )


@contextmanager
def scp(spool: Path, port: int, **kwargs: object) -> Iterator[tuple[StoreScp, list[tuple[str, list[str]]]]]:
    """A running StoreScp; yields it and the (Study UID, instance file names) it handed on."""
    handed: list[tuple[str, list[str]]] = []
    ready = threading.Event()

    def on_stable(uid: str, folder: Path) -> bool:
        handed.append((uid, sorted(p.name for p in folder.glob("*.dcm"))))
        ready.set()
        return True

    server = StoreScp("DXASSIST", port, spool, on_stable, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server, handed
    finally:
        server.stop()


def _wait_for(handed: list[tuple[str, list[str]]], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not handed:
        assert time.monotonic() < deadline, "no study handed on"
        time.sleep(0.1)


@pytest.fixture
def cxr(tmp_path: Path) -> tuple[Path, str]:
    path = write_synthetic_cxr(tmp_path / "in" / "a.dcm", seed=61)
    return path, str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def test_unknown_calling_ae_title_is_refused_and_a_known_one_stores(tmp_path: Path, cxr: tuple[Path, str]) -> None:
    port = free_port()
    with scp(tmp_path / "spool", port, stable_age_s=0.3, allowed_ae_titles=["MODALITY1"]) as (_, handed):
        refused = storescu(cxr[0], port, calling="INTRUDER")
        assert refused.returncode != 0
        assert "Association Rejected" in refused.stderr + refused.stdout
        assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
        accepted = storescu(cxr[0], port, calling="MODALITY1")
        assert accepted.returncode == 0, accepted.stderr
        _wait_for(handed)
        assert [uid for uid, _ in handed] == [cxr[1]]


def test_pacs_allowed_only_to_answer_our_moves_cannot_push_and_movescu_sees_it(
    tmp_path: Path, orthanc: OrthancServer, cxr: tuple[Path, str]
) -> None:
    """Orthanc (AE ORTHANC) is a move source, not a pusher: a C-MOVE nobody here asked for
    (movescu from a third party) fails its sub-operations; the study is not spooled."""
    orthanc.upload(cxr[0])
    with scp(
        tmp_path / "spool",
        orthanc.dxassist_port,
        stable_age_s=0.3,
        allowed_ae_titles=["MODALITY1"],
        move_ae_titles=[orthanc.aet],
    ):
        moved = subprocess.run(
            [
                "movescu",
                "-S",
                "-aet",
                "THIRDPARTY",
                "-aec",
                orthanc.aet,
                "-aem",
                "DXASSIST",
                "-k",
                "QueryRetrieveLevel=STUDY",
                "-k",
                f"StudyInstanceUID={cxr[1]}",
                "127.0.0.1",
                str(orthanc.dicom_port),
            ],
            capture_output=True,
            text=True,
        )
        report = moved.stdout + moved.stderr
        assert "Failed" in report or moved.returncode != 0, report
        assert not list((tmp_path / "spool").glob("scp-*"))
    # an unknown PACS cannot even associate
    with scp(tmp_path / "spool2", orthanc.dxassist_port, allowed_ae_titles=["MODALITY1"]):
        source = DimseSource(
            "127.0.0.1", orthanc.dicom_port, orthanc.aet, retrieve="move", move_port=orthanc.dxassist_port
        )
        from models.errors import SourceUnavailable

        with pytest.raises(SourceUnavailable, match="C-MOVE"):
            source.instances(cxr[1])


def test_c_move_arrives_through_the_services_own_scp_without_being_spooled(
    tmp_path: Path, orthanc: OrthancServer, cxr: tuple[Path, str]
) -> None:
    orthanc.upload(cxr[0])
    with scp(
        tmp_path / "spool", orthanc.dxassist_port, stable_age_s=0.3, allowed_ae_titles=[], move_ae_titles=[orthanc.aet]
    ) as (_, handed):
        source = DimseSource(
            "127.0.0.1", orthanc.dicom_port, orthanc.aet, retrieve="move", move_port=orthanc.dxassist_port
        )
        items = source.instances(cxr[1])
        assert source._own_receiver is None  # the running SCP received it
        got = pydicom.dcmread(io.BytesIO(items[0].source))  # type: ignore[arg-type]
        assert got.SOPInstanceUID == pydicom.dcmread(cxr[0]).SOPInstanceUID
        assert not list((tmp_path / "spool").glob("scp-*")) and handed == []  # a retrieval, not a push


def test_restart_with_a_half_received_study_loses_nothing(tmp_path: Path, cxr: tuple[Path, str]) -> None:
    spool, port = tmp_path / "spool", free_port()
    second = _copy_in_study(cxr[0], tmp_path / "in" / "b.dcm", new_sop=True)
    # first process: one instance arrives, the study is not stable yet, the process stops
    with scp(spool, port, stable_age_s=3600) as (_, handed):
        assert storescu(cxr[0], port, calling="MODALITY1").returncode == 0
        assert handed == []
    (folder,) = spool.glob("scp-*")
    assert (folder / UID_FILE).read_text() == cxr[1]
    (folder / "00002.part").write_bytes(b"cut off mid-write")  # a crash mid-instance: never told Success
    # second process: the spooled study is resumed, its timing restarted; the rest arrives
    with scp(spool, port, stable_age_s=1.0) as (_, handed):
        assert storescu(second, port, calling="MODALITY1").returncode == 0
        _wait_for(handed)
        assert handed == [(cxr[1], ["00001.dcm", "00002.dcm"])]
    assert (folder / HANDED_FILE).exists() and not (folder / "00002.part").exists()
    # a third start does not hand the same study again: the job owns it
    with scp(spool, port, stable_age_s=0.2) as (server, handed):
        assert server._arrivals == {} and handed == []


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA and two certificates it signed (server 127.0.0.1, client), made with openssl."""
    folder.mkdir(parents=True)

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
    )
    for name in ("server", "client"):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
        )
        (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1\n")
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        )  # fmt: skip
    return {p.stem + p.suffix: p for p in folder.iterdir()}


def test_dimse_over_tls_against_orthanc(tmp_path: Path, cxr: tuple[Path, str]) -> None:
    """C-FIND + C-GET over DICOM TLS with mutual certificates (Orthanc requires the client's)."""
    certs = _certificates(tmp_path / "pki")
    server, proc = start_orthanc(tmp_path / "orthanc", extra={
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(certs["server.pem"]),
        "DicomTlsPrivateKey": str(certs["server.key"]),
        "DicomTlsTrustedCertificates": str(certs["ca.pem"]),
        "DicomTlsRemoteCertificateRequired": True,
    })  # fmt: skip
    try:
        server.upload(cxr[0])
        context = tls_context(certs["client.pem"], certs["client.key"], certs["ca.pem"], server=False)
        secure = DimseSource("127.0.0.1", server.dicom_port, server.aet, ssl_context=context)
        items = secure.instances(cxr[1])
        assert pydicom.dcmread(io.BytesIO(items[0].source)).SOPInstanceUID == pydicom.dcmread(cxr[0]).SOPInstanceUID  # type: ignore[arg-type]
    finally:
        proc.terminate()
        proc.wait(10)
