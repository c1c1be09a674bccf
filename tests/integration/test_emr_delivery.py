"""Findings to the EMR through the durable outbox, against real receivers:
a FHIR R4 server (Medplum's router on node, validating every write) and an HL7 MLLP listener
(the ``hl7`` package's asyncio server). Counts are taken at the receivers."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import hl7
import httpx
import pytest
from fastapi.testclient import TestClient

from models.predictor import OnnxPredictor
from models.results import ScreeningResult, TriagePriorityValues, triage_priority
from serving.core.screening import StudyScreener, screen_paths
from serving.delivery.worker import OutboxWorker
from serving.dicom.sources.local import LocalFolderSource
from serving.emr.fhir import FhirSink, FhirTriageSink, fhir_resources
from serving.emr.hl7 import Hl7MllpSink, Hl7PriorityUpdateSink, orm_priority_update, oru_r01
from serving.online.api import LazyService, create_api
from serving.online.pipeline import LocalPipeline
from serving.online.service import ScreeningService
from serving.persistence.outbox import Outbox
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings
from tests.conftest import write_synthetic_cxr
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration
FHIR_DIR = Path(__file__).resolve().parents[1] / "fhir_server"


@pytest.fixture
def fhir_server() -> Iterator[str]:
    node = shutil.which("node")
    if node is None or not (FHIR_DIR / "node_modules" / "@medplum" / "fhir-router").is_dir():
        pytest.fail("node and tests/fhir_server/node_modules are required (scripts/install_servers.sh installs them)")
    port = free_port()
    proc = subprocess.Popen(
        [node, "--experimental-websocket", "server.mjs", str(port)],
        cwd=FHIR_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None and "ready" in proc.stdout.readline()
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)
    proc.stdout.close()


def fhir_total(base: str, resource: str) -> int:
    bundle = httpx.get(f"{base}/fhir/R4/{resource}", params={"_count": 1000}).json()
    return len(bundle.get("entry", []))


@dataclass
class MllpListener:
    """A real MLLP listener; ``answers`` is the ACK code for each message in turn (then AA)."""

    answers: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)  # MSH-10 of every message received
    accepted: set[str] = field(default_factory=set)  # MSH-10 acknowledged AA (the receiver's record)
    port: int = 0


@contextmanager
def mllp_listener(answers: list[str] | None = None) -> Iterator[MllpListener]:
    from hl7.mllp import start_hl7_server

    state = MllpListener(answers=list(answers or []), port=free_port())
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def handle(reader, writer) -> None:  # type: ignore[no-untyped-def]
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                control = str(message.segment("MSH")[10])
                state.received.append(control)
                code = state.answers.pop(0) if state.answers else "AA"
                if code == "AA":
                    state.accepted.add(control)
                if code != "SILENT":
                    writer.writemessage(message.create_ack(code))
                    await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    stop = asyncio.Event()

    async def main() -> None:
        server = await start_hl7_server(handle, host="127.0.0.1", port=state.port)
        started.set()
        await stop.wait()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let handlers finish closing their writers

    def run() -> None:
        loop.run_until_complete(main())
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(5)
    yield state
    loop.call_soon_threadsafe(stop.set)
    thread.join(5)


def test_fhir_report_is_valid_linked_and_idempotent(fhir_server: str, predictor: OnnxPredictor, tmp_path: Path) -> None:
    path = write_synthetic_cxr(tmp_path / "a.dcm", seed=21)
    result = screen_paths(StudyScreener([predictor], study_ref_key=b"k"), [path])[0]
    sink = FhirSink(f"{fhir_server}/fhir/R4")
    sink.deliver(1, result, [])
    sink.deliver(1, result, [])  # a retry after an ambiguous timeout
    sink.close()
    assert fhir_total(fhir_server, "DiagnosticReport") == 1
    assert fhir_total(fhir_server, "Observation") == len(result.findings)
    report = httpx.get(f"{fhir_server}/fhir/R4/DiagnosticReport").json()["entry"][0]["resource"]
    assert report["status"] == "preliminary" and report["meta"]["security"][0]["code"] == "AIAST"
    assert report["subject"]["identifier"]["value"] == result.patient_id
    for ref in report["result"]:
        assert httpx.get(f"{fhir_server}/fhir/R4/{ref['reference']}").status_code == 200
    # the server validates: a malformed resource is refused, and the sink calls that permanent
    bad = fhir_resources(result)[0] | {"unknownElement": 1}
    assert httpx.put(f"{fhir_server}/fhir/R4/Device/{bad['id']}", json=bad).status_code == 400


def test_hl7_ack_handling_and_escaping(predictor: OnnxPredictor, tmp_path: Path) -> None:
    path = write_synthetic_cxr(tmp_path / "a.dcm", seed=22, patient_name="O'BRIEN^ANN|X")
    result = screen_paths(StudyScreener([predictor], study_ref_key=b"k"), [path])[0]
    result = result.model_copy(update={"patient_id": "ID|WITH^DELIMS"})
    message = hl7.parse(oru_r01(7, result))
    assert str(message.segment("MSH")[10]) == "DXA000000000007"
    assert str(message.segment("PID")[3]).startswith("ID\\F\\WITH\\S\\DELIMS")
    assert len(message.segments("OBX")) == len(result.findings)
    from models.errors import DeliveryFailed, DeliveryRejected

    with mllp_listener(["AE", "AR"]) as listener:
        sink = Hl7MllpSink("127.0.0.1", listener.port, timeout_s=2)
        with pytest.raises(DeliveryFailed, match="AE"):
            sink.deliver(7, result, [])
        with pytest.raises(DeliveryRejected, match="AR"):
            sink.deliver(8, result, [])
        sink.deliver(9, result, [])
        assert listener.accepted == {"DXA000000000009"}


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
                "fhir": FhirSink(f"{fhir_server}/fhir/R4", timeout_s=2),
                "hl7": Hl7MllpSink("127.0.0.1", listener.port, timeout_s=1),
            }
            return ScreeningService(
                LocalPipeline(screener, LocalFolderSource(store_dir)), screener, ResultsStore(db), settings, sinks=sinks
            )

        lazy = LazyService(service)
        with TestClient(create_api(lazy)) as client:
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

    fhir = FhirTriageSink(f"{fhir_server}/fhir/R4")
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
        hl7_sink = Hl7PriorityUpdateSink("127.0.0.1", listener.port, timeout_s=2)
        hl7_sink.deliver(4, plain, [])
        hl7_sink.deliver(5, already_stat, [])
        assert listener.received == []
        hl7_sink.deliver(6, urgent, [])
        assert listener.accepted == {"DXP000000000006"}
    message = hl7.parse(orm_priority_update(6, urgent))
    assert str(message.segment("MSH")[9]) == "ORM^O01^ORM_O01"
    assert str(message.segment("ORC")[1]) == "XO"
    assert str(message.segment("ORC")[3]) == urgent.accession_number
    assert str(message.segment("TQ1")[9]).startswith("A^ASAP")
    assert critical in str(message.segment("OBR")[13])
