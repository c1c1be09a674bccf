"""Findings to the EMR through the durable outbox, against real receivers:
a FHIR R4 server (Medplum's router on node, validating every write) and an HL7 MLLP listener
(the ``hl7`` package's asyncio server). Counts are taken at the receivers. What the messages
contain is checked against independent validators in ``tests/conformance``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import hl7
import httpx
import pytest
from fastapi.testclient import TestClient

from models.errors import DeliveryFailed, DeliveryRejected
from models.predictor import OnnxPredictor
from models.results import ScreeningResult, TriagePriorityValues, triage_priority
from serving.core.screening import StudyScreener, screen_paths
from serving.delivery.worker import OutboxWorker
from serving.dicom.sources.local import LocalFolderSource
from serving.emr.fhir import FhirSink, FhirTriageSink
from serving.emr.fhir_resources import as_json, fhir_resources
from serving.emr.hl7 import Hl7MllpSink, Hl7PriorityUpdateSink
from serving.emr.hl7_messages import message_control_id
from serving.online.api import LazyService, create_api
from serving.online.pipeline import LocalPipeline
from serving.online.service import ScreeningService
from serving.persistence.outbox import Outbox
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings, SiteIdentity
from tests.conformance import receivers
from tests.conformance.receivers import mllp_listener
from tests.conftest import write_synthetic_cxr

pytestmark = pytest.mark.integration
IDENTITY = SiteIdentity()


@pytest.fixture
def fhir_server() -> Iterator[str]:
    with receivers.fhir_server() as base:
        yield base


def fhir_total(base: str, resource: str) -> int:
    return len(receivers.fhir_search(base, resource))


def test_fhir_report_is_valid_linked_and_idempotent(fhir_server: str, predictor: OnnxPredictor, tmp_path: Path) -> None:
    path = write_synthetic_cxr(tmp_path / "a.dcm", seed=21)
    result = screen_paths(StudyScreener([predictor], study_ref_key=b"k"), [path])[0]
    sink = FhirSink(f"{fhir_server}/fhir/R4", identity=IDENTITY)
    sink.deliver(1, result, [])
    sink.deliver(1, result, [])  # a retry after an ambiguous timeout
    sink.close()
    assert fhir_total(fhir_server, "DiagnosticReport") == 1
    assert fhir_total(fhir_server, "Observation") == len(result.findings)
    report = receivers.fhir_search(fhir_server, "DiagnosticReport")[0]
    assert report["status"] == "preliminary" and report["meta"]["security"][0]["code"] == "AIAST"
    assert report["subject"]["identifier"] == {"system": IDENTITY.patient_id_system, "value": result.patient_id}
    for ref in report["result"]:
        assert httpx.get(f"{fhir_server}/fhir/R4/{ref['reference']}").status_code == 200
    # the server validates: a malformed resource is refused, and the sink's transport calls that
    # permanent (dead letter, no retry), not retryable
    bad = as_json(fhir_resources(result, IDENTITY)[0]) | {"unknownElement": 1}
    refusing = FhirSink(f"{fhir_server}/fhir/R4", identity=IDENTITY)
    with pytest.raises(DeliveryRejected, match="HTTP 400"):
        refusing._request("PUT", f"/{bad['resourceType']}/{bad['id']}", json=bad)
    refusing.close()


def test_hl7_ack_handling_and_escaping(predictor: OnnxPredictor, tmp_path: Path) -> None:
    path = write_synthetic_cxr(tmp_path / "a.dcm", seed=22, patient_name="O'BRIEN^ANN|X")
    result = screen_paths(StudyScreener([predictor], study_ref_key=b"k"), [path])[0]
    result = result.model_copy(update={"patient_id": "ID|WITH^DELIMS"})
    sink = Hl7MllpSink("127.0.0.1", 9, identity=IDENTITY, timeout_s=2)
    text = sink.message(result)
    assert text is not None
    message = hl7.parse(text)
    control = message_control_id(result, "hl7")
    assert str(message.segment("MSH")[10]) == control and len(control) <= 20  # MSH-10 is ST(20)
    pid = message.segment("PID")
    assert str(pid[3]).startswith(r"ID\F\WITH\S\DELIMS^^^")
    assert str(pid[5]).startswith(r"O'BRIEN^ANN\F\X")  # PID-5 from the DICOM header
    assert len(message.segments("OBX")) == 2 * len(result.findings)  # present/absent + probability

    with mllp_listener(["AE", "AR"]) as listener:
        sink.port = listener.port
        with pytest.raises(DeliveryFailed, match="AE"):
            sink.deliver(7, result, [])
        with pytest.raises(DeliveryRejected, match="AR"):
            sink.deliver(7, result, [])
        sink.deliver(7, result, [])
        assert listener.received == [control] * 3  # a retry of one delivery keeps its MSH-10
        assert listener.accepted == {control}


def test_a_name_outside_ascii_arrives_intact(predictor: OnnxPredictor, tmp_path: Path) -> None:
    """DICOM names are often not ASCII: the message says UTF-8 (MSH-18) and is sent as UTF-8
    (an ASCII-only writer would fail this delivery on every retry)."""
    path = write_synthetic_cxr(tmp_path / "a.dcm", seed=26, patient_name="MÜLLER^JOSÉ")
    result = screen_paths(StudyScreener([predictor], study_ref_key=b"k"), [path])[0]
    assert result.patient_name == "MÜLLER^JOSÉ"
    with mllp_listener() as listener:
        Hl7MllpSink("127.0.0.1", listener.port, identity=IDENTITY, timeout_s=2).deliver(1, result, [])
    message = hl7.parse(listener.messages[0])
    assert str(message.segment("MSH")[18]) == "UNICODE UTF-8"
    assert str(message.segment("PID")[5]).startswith("MÜLLER^JOSÉ")


def test_a_results_database_reset_never_reuses_an_msh10(predictor: OnnxPredictor, tmp_path: Path) -> None:
    """The same study screened into two fresh results databases: both deliveries are row 1 of
    their outbox (an MSH-10 made from the delivery id would repeat), the receiver gets two ids."""
    path = write_synthetic_cxr(tmp_path / "a.dcm", seed=24)
    screener = StudyScreener([predictor], study_ref_key=b"k")
    with mllp_listener() as listener:
        for run in ("before", "after-reset"):
            store = ResultsStore(tmp_path / f"{run}.sqlite3")
            screening_id = store.finish_job(f"job-{run}", screen_paths(screener, [path])[0], sinks=["hl7"])
            outbox = Outbox(store.target)
            claimed = outbox.claim()
            assert [(row[0], row[1]) for row in claimed] == [(1, screening_id)]  # the same delivery id
            outbox.due_now()
            sink = Hl7MllpSink("127.0.0.1", listener.port, identity=IDENTITY, timeout_s=2)
            OutboxWorker(outbox, {"hl7": sink}, store.for_delivery).run_once()
            assert outbox.status().done == 1
            outbox.close()
            store.close()
    assert len(listener.accepted) == 2 and len(set(listener.received)) == 2


def test_not_screened_study_is_reported_to_the_emr(fhir_server: str, predictor: OnnxPredictor, tmp_path: Path) -> None:
    """The EMR is told that the AI looked and declined, and why: an ORU with the reason and a
    DiagnosticReport without observations (a lateral view is not accepted by the chest model)."""
    path = write_synthetic_cxr(tmp_path / "lat.dcm", seed=25, view="LL", patient_name="DOE^JOHN")
    result = screen_paths(StudyScreener([predictor], study_ref_key=b"k"), [path])[0]
    assert result.outcome == "NOT_SCREENED" and result.patient_id and result.patient_name == "DOE^JOHN"
    fhir = FhirSink(f"{fhir_server}/fhir/R4", identity=IDENTITY)
    fhir.deliver(1, result, [])
    fhir.close()
    report = receivers.fhir_search(fhir_server, "DiagnosticReport")[0]
    assert "result" not in report and fhir_total(fhir_server, "Observation") == 0
    assert report["conclusionCode"][0]["coding"][1]["code"] == str(result.reason)
    with mllp_listener() as listener:
        Hl7MllpSink("127.0.0.1", listener.port, identity=IDENTITY, timeout_s=2).deliver(2, result, [])
    message = hl7.parse(listener.messages[0])
    assert str(message.segment("PID")[5]).startswith("DOE^JOHN")
    assert str(message.segment("OBX")[5][0][0]) == str(result.reason)


def test_every_finding_delivered_exactly_once_through_emr_outage_and_restart(
    fhir_server: str, predictor: OnnxPredictor, tmp_path: Path, results_db: Path | str
) -> None:
    """Run once with the SQLite outbox (default) and once with the PostgreSQL one."""
    store_dir = tmp_path / "store"
    uploads = [write_synthetic_cxr(store_dir / f"s{i}.dcm", seed=300 + i).read_bytes() for i in range(4)]
    db = results_db
    screener = StudyScreener([predictor], study_ref_key=b"k")
    settings = ApiSettings(spool_dir=tmp_path / "spool")
    httpx.post(f"{fhir_server}/__control/down")  # the EMR is down

    with mllp_listener(["AE", "SILENT"]) as listener:

        def service() -> ScreeningService:
            sinks = {
                "fhir": FhirSink(f"{fhir_server}/fhir/R4", identity=IDENTITY, timeout_s=2),
                "hl7": Hl7MllpSink("127.0.0.1", listener.port, identity=IDENTITY, timeout_s=1),
            }
            return ScreeningService(
                LocalPipeline(screener, LocalFolderSource(store_dir)), screener, ResultsStore(db), settings, sinks=sinks
            )

        lazy = LazyService(service)
        with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:  # dev mode: loopback only
            client.get("/readyz")
            ids = [
                client.post("/v1/screenings/upload", files=[("files", (f"{i}.dcm", data, "application/dicom"))]).json()[
                    "screening_id"
                ]
                for i, data in enumerate(uploads)
            ]
            deadline = time.monotonic() + 30
            while any(client.get(f"/v1/screenings/{j}").json()["status"] != "DONE" for j in ids):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            time.sleep(1.0)  # deliveries fail against the down EMR and back off
            client.portal.call(lazy.started.drain, 5.0)  # type: ignore[union-attr]  # the service stops
            lazy.started.close()  # type: ignore[union-attr]
        outbox = Outbox(db)
        assert outbox.status().pending > 0  # nothing delivered to FHIR yet, nothing lost either

        httpx.post(f"{fhir_server}/__control/up")  # the EMR is back; a new process starts
        restarted = service()
        worker = OutboxWorker(Outbox(db, base_backoff_s=0.05), restarted.sinks, restarted.store.for_delivery)
        deadline = time.monotonic() + 60
        while outbox.status().pending and time.monotonic() < deadline:
            outbox.due_now()  # every backed-off row due now, as time passing would make it
            worker.run_once()
        status = outbox.status()
        assert (status.pending, status.dead, status.done) == (0, 0, 8)
        # the receivers' view: every study exactly once
        assert fhir_total(fhir_server, "DiagnosticReport") == 4
        assert fhir_total(fhir_server, "Observation") == 4 * len(predictor.manifest.labels)
        assert len(listener.accepted) == 4
        assert len(listener.received) >= 5  # the AE and the silent one were sent again, same MSH-10
        assert set(listener.received) == listener.accepted
        assert outbox.audit_count("DELIVERED") == 8 and outbox.audit_count("RETRY") >= 2
        assert {r.requested_priority for _, _, r in restarted.store.latest_per_study()} == {"routine"}
        for sink in restarted.sinks.values():
            sink.close()  # type: ignore[attr-defined]
        worker.outbox.close()
        outbox.close()
        restarted.close()


def _flagged(result: ScreeningResult, requested: str) -> ScreeningResult:
    """The same study with a critical finding positive, as a model would flag it (the tiny test
    model has no critical label: its first one plays that part)."""
    first, *rest = result.findings
    findings = [first.model_copy(update={"positive": True, "critical": True}), *rest]
    return result.model_copy(
        update={"findings": findings, "priority": triage_priority(findings), "requested_priority": requested}
    )


def test_priority_update_is_sent_only_when_the_ai_raises_the_priority(
    fhir_server: str, predictor: OnnxPredictor, tmp_path: Path
) -> None:
    path = write_synthetic_cxr(tmp_path / "a.dcm", seed=23)
    plain = screen_paths(StudyScreener([predictor], study_ref_key=b"k"), [path])[0]
    plain = plain.model_copy(
        update={
            "findings": [f.model_copy(update={"positive": False}) for f in plain.findings],
            "priority": TriagePriorityValues.ROUTINE,
            "requested_priority": "routine",
        }
    )
    urgent, already_stat = _flagged(plain, "routine"), _flagged(plain, "stat")
    assert urgent.priority == TriagePriorityValues.URGENT

    fhir = FhirTriageSink(f"{fhir_server}/fhir/R4", identity=IDENTITY)
    fhir.deliver(1, plain, [])  # nothing critical: no proposal
    fhir.deliver(2, already_stat, [])  # already STAT: the AI would only lower it
    assert fhir_total(fhir_server, "Task") == 0
    fhir.deliver(3, urgent, [])
    fhir.deliver(3, urgent, [])  # a retry: still one Task (the server validated it on write)
    fhir.close()
    tasks = httpx.get(f"{fhir_server}/fhir/R4/Task").json()["entry"]
    assert len(tasks) == 1
    task = tasks[0]["resource"]
    assert (task["priority"], task["intent"], task["status"]) == ("asap", "proposal", "requested")
    assert task["focus"]["identifier"]["value"] == urgent.accession_number
    critical = next(f.display for f in urgent.findings if f.critical)
    assert critical in task["reasonCode"]["text"]

    with mllp_listener() as listener:
        hl7_sink = Hl7PriorityUpdateSink("127.0.0.1", listener.port, identity=IDENTITY, timeout_s=2)
        hl7_sink.deliver(4, plain, [])
        hl7_sink.deliver(5, already_stat, [])
        assert listener.received == []
        hl7_sink.deliver(6, urgent, [])
        assert listener.accepted == {message_control_id(urgent, "hl7-triage")}
    message = hl7.parse(listener.messages[0])
    assert str(message.segment("MSH")[9]) == "OMG^O19^OMG_O19"  # a structure that carries TQ1
    assert str(message.segment("ORC")[1]) == "XO"
    assert str(message.segment("ORC")[3][0][0]) == urgent.accession_number
    assert str(message.segment("TQ1")[9]) == "A^ASAP^HL70485"
    obr = message.segment("OBR")
    assert len(obr) <= 13 or str(obr[13]) == ""  # never over the clinician's relevant clinical info
    assert critical in str(message.segment("NTE")[3])
