"""Orders in: the HL7 v2 MLLP listener driven by a real MLLP client (the ``hl7`` package), and
the hospital flow end to end against real Orthanc, dcmtk ``storescu`` and a real MLLP receiver:
an ORM^O01 STAT order, then the study's images, give a STAT screening whose ORU^R01 carries
the order's placer and filler numbers; an order for a study already screened raises its
worklist rank without a second screening."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hl7
import pydicom
import pytest
from fastapi.testclient import TestClient
from hl7.client import MLLPClient

from models.predictor import OnnxPredictor
from models.registry import resolve
from serving.core.screening import StudyScreener
from serving.dicom.sources.dicomweb import DicomWebSource
from serving.emr.hl7 import Hl7MllpSink
from serving.online.api import LazyService, create_api
from serving.online.orders import OrderListener
from serving.online.pipeline import LocalPipeline
from serving.online.service import ScreeningService
from serving.persistence.orders import OrderBook, OrderPriorityValues, OrderRecord, OrderStatusValues
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings, OrdersHl7Settings, OrdersSettings, ScpSettings
from tests.conformance.receivers import mllp_listener
from tests.conftest import write_synthetic_cxr
from tests.integration.conftest import OrthancServer, free_port, start_orthanc
from tests.integration.test_pacs_flows import REPO, storescu

pytestmark = pytest.mark.integration


def orm(
    control_id: str,
    *,
    placer: str = "PL1001",
    filler: str = "FL2002",
    accession: str = "ACC3003",
    priority: str = "S",
    order_control: str = "NW",
    order_status: str = "SC",
    patient_id: str = "PAT77",
    study_uid: str = "",
    kind: str = "ORM^O01^ORM_O01",
) -> str:
    """An ORM^O01 as a RIS sends it (IHE Scheduled Workflow: accession in OBR-18, Study UID in ZDS-1)."""
    obr = ["OBR", "1", f"{placer}^EMR", f"{filler}^RIS", "CXR2V^Chest X-ray 2 views^L"] + [""] * 13 + [accession]
    segments = [
        f"MSH|^~\\&|RIS|HOSP|DXASSIST|DXA|20261201120000||{kind}|{control_id}|P|2.5.1",
        f"PID|1||{patient_id}^^^HOSP^MR||DOE^JANE",
        f"ORC|{order_control}|{placer}^EMR|{filler}^RIS||{order_status}",
        f"TQ1|1||||||||{priority}^{'Stat' if priority == 'S' else 'Routine'}^HL70485",
        "|".join(obr),
    ]
    if study_uid:
        segments.append(f"ZDS|{study_uid}^DXA^Application^DICOM")
    return "\r".join(segments)


def send(port: int, message: str) -> hl7.Message:
    with MLLPClient("127.0.0.1", port) as client:
        return hl7.parse(client.send_message(message).decode())


def ack_code(ack: hl7.Message) -> str:
    return str(ack.segment("MSA")[1])


@contextmanager
def listener(tmp_path: Path, **hl7_settings: object) -> Iterator[tuple[int, OrderBook, list[OrderRecord]]]:
    """The listener alone in its own event loop thread, on the results database in tmp_path."""
    book = OrderBook(tmp_path / "results.sqlite3")
    heard: list[OrderRecord] = []
    settings = OrdersSettings(hl7=OrdersHl7Settings(enabled=True, port=free_port(), **hl7_settings))  # type: ignore[arg-type]
    orders = OrderListener(book, settings, heard.extend)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        await orders.start()
        started.set()
        await stop.wait()
        await orders.stop()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield orders.port, book, heard
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
        book.close()


def test_order_is_stored_before_aa_and_a_retry_is_not_applied_twice(tmp_path: Path) -> None:
    with listener(tmp_path) as (port, book, heard):
        ack = send(port, orm("MSG-1"))
        assert ack_code(ack) == "AA" and str(ack.segment("MSA")[2]) == "MSG-1"
        record = book.get("P:PL1001")
        assert record is not None
        order = record.order
        assert (order.placer_number, order.filler_number, order.accession_number) == ("PL1001", "FL2002", "ACC3003")
        assert order.priority == OrderPriorityValues.STAT and order.priority_code == "S"
        assert (order.procedure_code, order.procedure_text) == ("CXR2V", "Chest X-ray 2 views")
        assert order.patient_id == "PAT77" and order.status == OrderStatusValues.ACTIVE
        # the ACK was lost; the RIS sends the same message again: AA, stored once, heard once
        assert ack_code(send(port, orm("MSG-1", priority="R"))) == "AA"
        assert book.message_count() == 1 and len(heard) == 1
        assert book.get("P:PL1001").order.priority == OrderPriorityValues.STAT  # type: ignore[union-attr]
        # a new message (new MSH-10) changes the order: cancelled orders rank nothing
        assert ack_code(send(port, orm("MSG-2", order_control="CA", order_status="CA"))) == "AA"
        assert book.get("P:PL1001").order.status == OrderStatusValues.CANCELLED  # type: ignore[union-attr]
        assert book.match(accession_number="ACC3003") is None
        assert book.stat_keys() == (set(), set())


def test_omi_order_links_accession_and_study_uid(tmp_path: Path) -> None:
    omi = "\r".join(
        [
            "MSH|^~\\&|RIS|HOSP|DXASSIST|DXA|20261201120000||OMI^O23^OMI_O23|OMI-1|P|2.5.1",
            "PID|1||PAT88^^^HOSP^MR",
            "ORC|NW|PL9^EMR|FL9^RIS||SC",
            "TQ1|1||||||||R^Routine^HL70485",
            "OBR|1|PL9^EMR|FL9^RIS|CXR1V^Chest X-ray 1 view^L",
            "IPC|ACC9|RP9|1.2.826.0.1.3680043.8.498.77|SPS9|CR",
        ]
    )
    with listener(tmp_path) as (port, book, _):
        assert ack_code(send(port, omi)) == "AA"
        match = book.match(study_instance_uid="1.2.826.0.1.3680043.8.498.77")
        assert match is not None and match.order.accession_number == "ACC9"
        assert match.order.priority == OrderPriorityValues.ROUTINE


def test_refusals_carry_the_reason_in_msa_and_err(tmp_path: Path) -> None:
    with listener(tmp_path, max_message_bytes=4096) as (port, book, _):
        unsupported = send(port, orm("X-1", kind="ADT^A01^ADT_A01"))
        assert ack_code(unsupported) == "AR" and str(unsupported.segment("ERR")[3]).startswith("201^")
        no_number = send(port, orm("X-2", placer="", filler=""))
        assert ack_code(no_number) == "AE" and str(no_number.segment("ERR")[3]).startswith("101^")
        assert "placer or filler" in str(no_number.segment("MSA")[3])
        bad_uid = send(port, orm("X-3", study_uid="1.2.x<script>"))
        assert ack_code(bad_uid) == "AE" and str(bad_uid.segment("ERR")[3]).startswith("102^")
        assert "script" not in str(bad_uid)  # the answer never echoes a value
        wrong_version = send(port, orm("X-4").replace("|P|2.5.1", "|P|3.0"))
        assert ack_code(wrong_version) == "AR" and str(wrong_version.segment("ERR")[3]).startswith("203^")
        assert ack_code(send(port, "MSH|^~\\&|RIS|HOSP")) == "AR"  # no MSH-10, no type
        assert ack_code(send(port, "this is not HL7")) == "AR"
        assert book.message_count() == 0  # nothing refused was stored
        # larger than orders.hl7.max_message_bytes: refused, connection closed, listener still up
        huge = orm("X-5") + "\rNTE|1||" + "A" * 8000
        assert ack_code(send(port, huge)) == "AR"
        assert ack_code(send(port, orm("X-6"))) == "AA"


def test_patient_merge_moves_orders_to_the_surviving_id(tmp_path: Path) -> None:
    merge = "\r".join(
        [
            "MSH|^~\\&|ADT|HOSP|DXASSIST|DXA|20261201120000||ADT^A40^ADT_A39|M-1|P|2.5.1",
            "EVN|A40|20261201120000",
            "PID|1||PAT-NEW^^^HOSP^MR",
            "MRG|PAT77^^^HOSP^MR",
        ]
    )
    with listener(tmp_path) as (port, book, _):
        assert ack_code(send(port, orm("MSG-1"))) == "AA"
        assert ack_code(send(port, merge)) == "AA"
        assert book.get("P:PL1001").order.patient_id == "PAT-NEW"  # type: ignore[union-attr]


# -- the hospital flow, end to end ------------------------------------------------------------


@contextmanager
def hospital(tmp_path: Path, hl7_port: int) -> Iterator[tuple[TestClient, ResultsStore, int, object]]:
    """Orthanc routing stable studies to dxassist's SCP (Lua), dxassist with the order listener
    and an HL7 sink to a real MLLP receiver; yields (API client, results, order port, Orthanc)."""
    scp_port, orders_port = free_port(), free_port()
    orthanc, proc = start_orthanc(
        tmp_path / "orthanc",
        modalities={"dxassist": ["DXASSIST", "127.0.0.1", scp_port]},
        lua=REPO / "configs/orthanc/route-to-dxassist-scp.lua",
    )
    store = ResultsStore(tmp_path / "results.sqlite3")
    manifests = [resolve("cxr-triage").manifest]
    screener = StudyScreener([OnnxPredictor(resolve("cxr-triage"), providers="cpu")], study_ref_key=b"k")
    source = DicomWebSource(
        orthanc.dicomweb, username=orthanc.user, password=orthanc.password, manifests=manifests, timeout_s=10
    )

    def factory() -> ScreeningService:
        return ScreeningService(
            LocalPipeline(screener, source),
            screener,
            store,
            ApiSettings(spool_dir=tmp_path / "spool"),
            sinks={"hl7": Hl7MllpSink("127.0.0.1", hl7_port, timeout_s=5)},
            scp=ScpSettings(enabled=True, port=scp_port, stable_age_s=1.0),
            orders=OrdersSettings(hl7=OrdersHl7Settings(enabled=True, port=orders_port)),
        )

    lazy = LazyService(factory)
    try:
        with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:
            assert client.get("/readyz").status_code == 200
            yield client, store, orders_port, orthanc
            client.portal.call(lazy.started.drain, 5.0)  # type: ignore[union-attr]
            lazy.started.close()  # type: ignore[union-attr]
    finally:
        proc.terminate()
        proc.wait(10)


def _study(tmp_path: Path, name: str, seed: int, accession: str) -> tuple[Path, str]:
    path = write_synthetic_cxr(tmp_path / "in" / f"{name}.dcm", seed=seed)
    ds = pydicom.dcmread(path)
    ds.AccessionNumber = accession
    ds.save_as(path)
    return path, str(ds.StudyInstanceUID)


def _wait(predicate: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_stat_order_then_images_give_a_stat_screening_whose_oru_carries_the_order_numbers(tmp_path: Path) -> None:
    with mllp_listener() as receiver, hospital(tmp_path, receiver.port) as (client, store, orders_port, orthanc):
        path, uid = _study(tmp_path, "stat", 71, "ACC-STAT-1")
        # 1. the RIS orders a STAT chest X-ray (accession only: the study does not exist yet)
        ack = send(orders_port, orm("ORD-1", placer="PL-STAT-1", filler="FL-STAT-1", accession="ACC-STAT-1"))
        assert ack_code(ack) == "AA"
        # 2. the modality stores the images into the PACS; Orthanc pushes the stable study to dxassist
        storescu(path, orthanc.dicom_port, orthanc.aet)  # type: ignore[attr-defined]
        _wait(lambda: store.latest(uid) is not None)
        ((_, job_priority, result),) = store.latest_per_study()
        assert job_priority == "stat" and result.requested_priority == "stat"
        assert (result.placer_order_number, result.filler_order_number) == ("PL-STAT-1", "FL-STAT-1")
        item = client.get("/v1/worklist").json()[0]
        assert (item["rank"], item["rank_reason"]) == (0, "STAT requested")
        # 3. the ORU^R01 reaches the EMR with the order's numbers
        _wait(lambda: len(receiver.accepted) == 1)
        oru = hl7.parse(receiver.messages[0])
        assert str(oru.segment("MSH")[9]).startswith("ORU^R01")
        for segment in ("ORC", "OBR"):
            assert str(oru.segment(segment)[2]).startswith("PL-STAT-1")
            assert str(oru.segment(segment)[3]).startswith("FL-STAT-1")
        # the order now knows its study
        assert store.latest(uid) is not None
        assert client.get("/v1/worklist").json()[0]["study_instance_uid"] == uid


def test_order_for_an_already_screened_study_raises_its_rank_without_screening_again(tmp_path: Path) -> None:
    with mllp_listener() as receiver, hospital(tmp_path, receiver.port) as (client, store, orders_port, orthanc):
        path, uid = _study(tmp_path, "late", 72, "ACC-LATE-1")
        storescu(path, orthanc.dicom_port, orthanc.aet)  # type: ignore[attr-defined]
        _wait(lambda: store.latest(uid) is not None)
        before = client.get("/v1/worklist").json()[0]
        assert before["rank"] > 0 and before["requested_priority"] == "routine"
        ack = send(orders_port, orm("ORD-2", placer="PL-LATE", filler="FL-LATE", accession="ACC-LATE-1"))
        assert ack_code(ack) == "AA"
        after = client.get("/v1/worklist").json()[0]
        assert (after["rank"], after["rank_reason"]) == (0, "STAT requested")
        page = client.get("/v1/ui/worklist").json()[0]  # the reading page ranks it the same
        assert (page["rank"], page["rank_reason"]) == (0, "STAT requested")
        # a completed order naming the study: the study is screened already, so nothing is queued
        done = orm(
            "ORD-3", placer="PL-LATE", filler="FL-LATE", accession="ACC-LATE-1", study_uid=uid, order_status="CM"
        )
        assert ack_code(send(orders_port, done)) == "AA"  # the order was handed on before this ACK
        assert store.pending_jobs() == [] and store.count() == 1


def test_order_book_on_both_databases(results_db: Path | str) -> None:
    """The orders tables (migration 0005) and their rules on SQLite and PostgreSQL: one message
    stored once, orders merged by key, STAT first when a study matches several orders."""
    from serving.online.orders import parse_order_message

    book = OrderBook(results_db)
    settings = OrdersSettings()
    routine = parse_order_message(orm("A-1", placer="P-R", priority="R", accession="ACC-X"), settings)
    stat = parse_order_message(orm("A-2", placer="P-S", accession="ACC-X"), settings)
    assert not book.record_message(routine.sender, routine.control_id, "ORM^O01", "body", routine.orders).duplicate
    assert book.record_message(routine.sender, routine.control_id, "ORM^O01", "body", routine.orders).duplicate
    book.record_message(stat.sender, stat.control_id, "ORM^O01", "body", stat.orders)
    match = book.match(accession_number="ACC-X")
    assert match is not None and match.order.placer_number == "P-S"
    book.link_study(match.id, "1.2.826.0.1.3680043.8.498.5")
    assert book.stat_keys() == ({"1.2.826.0.1.3680043.8.498.5"}, {"ACC-X"})
    status_only = parse_order_message(orm("A-3", placer="P-S", accession="", priority="", order_status="CM"), settings)
    book.record_message(status_only.sender, status_only.control_id, "ORM^O01", "body", status_only.orders)
    kept = book.get("P:P-S")
    assert kept is not None and kept.order.accession_number == "ACC-X"  # not forgotten by a status update
    assert kept.order.priority == OrderPriorityValues.STAT and kept.order.status == OrderStatusValues.COMPLETED
    assert book.message_count() == 3
    book.close()


def test_completed_order_known_by_accession_only_has_its_study_fetched_at_stat(
    tmp_path: Path, orthanc: OrthancServer
) -> None:
    """The RIS says the images are taken (ORC-5 CM) and gives only the accession: dxassist finds
    the study in the store by accession, links the order to it and fetches it at STAT."""
    path, uid = _study(tmp_path, "done", 73, "ACC-DONE-1")
    storescu(path, orthanc.dicom_port, orthanc.aet)  # in the PACS; nothing routes it to dxassist
    store = ResultsStore(tmp_path / "results.sqlite3")
    screener = StudyScreener([OnnxPredictor(resolve("cxr-triage"), providers="cpu")], study_ref_key=b"k")
    manifests = [resolve("cxr-triage").manifest]

    def source() -> DicomWebSource:
        return DicomWebSource(
            orthanc.dicomweb, username=orthanc.user, password=orthanc.password, manifests=manifests, timeout_s=10
        )

    orders_port = free_port()

    def factory() -> ScreeningService:
        return ScreeningService(
            LocalPipeline(screener, source()),
            screener,
            store,
            ApiSettings(spool_dir=tmp_path / "spool"),
            poll_source=source(),
            orders=OrdersSettings(hl7=OrdersHl7Settings(enabled=True, port=orders_port)),
        )

    lazy = LazyService(factory)
    with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:
        assert client.get("/readyz").status_code == 200
        scheduled = orm("ORD-9", placer="PL-D", filler="FL-D", accession="ACC-DONE-1", order_status="SC")
        unknown = orm("ORD-10", placer="PL-U", filler="FL-U", accession="ACC-NOT-THERE", order_status="CM")
        assert ack_code(send(orders_port, unknown)) == "AA"  # no such study yet: nothing fetched
        assert ack_code(send(orders_port, scheduled)) == "AA"  # scheduled, not done: nothing fetched
        assert store.pending_jobs() == [] and store.count() == 0
        done = orm("ORD-11", placer="PL-D", filler="FL-D", accession="ACC-DONE-1", order_status="CM")
        assert ack_code(send(orders_port, done)) == "AA"
        _wait(lambda: store.latest(uid) is not None)
        ((_, job_priority, result),) = store.latest_per_study()
        assert job_priority == "stat" and (result.placer_order_number, result.filler_order_number) == ("PL-D", "FL-D")
        service = lazy.started
        assert service is not None and service.orders is not None
        linked = service.orders.match(study_instance_uid=uid)
        assert linked is not None and linked.order.placer_number == "PL-D"
        client.portal.call(service.drain, 5.0)
        service.close()
