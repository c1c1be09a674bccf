"""What an interface engineer checks before connecting an EMR: every message type dxassist sends,
produced through the real service, outbox and sinks for the demo study set (screened positive,
screened negative, not screened), received by real receivers, and validated by validators this
project did not write (``tests/conformance/validators.py``): zero errors, and only warnings a
listed validator gap explains."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import hl7
import httpx
import pytest
from fastapi.testclient import TestClient

from models.predictor import OnnxPredictor
from models.registry import resolve
from models.results import OutcomeValues, ScreeningResult
from serving.cli.demo import build_demo_set
from serving.core.screening import StudyScreener
from serving.dicom.sources.local import LocalFolderSource
from serving.emr.fhir import FhirSink, FhirTriageSink
from serving.emr.fhir_resources import code_system, report_id
from serving.emr.hl7 import Hl7MllpSink, Hl7PriorityUpdateSink
from serving.emr.hl7_messages import message_control_id
from serving.online.api import LazyService, create_api
from serving.online.pipeline import LocalPipeline
from serving.online.service import ScreeningService
from serving.persistence.outbox import Outbox
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings, SiteIdentity
from tests.conformance.receivers import fhir_search, fhir_server, mllp_listener
from tests.conformance.validators import Findings, validate_fhir, validate_hl7

pytestmark = pytest.mark.integration
RESOURCE_TYPES = ("Device", "Observation", "DiagnosticReport", "Task")


@dataclass
class Delivered:
    """What the receivers got for the whole demo set."""

    results: list[ScreeningResult]
    hl7_messages: list[str]
    fhir: dict[str, list[dict]]


@pytest.fixture(scope="module")
def delivered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Delivered]:
    root = tmp_path_factory.mktemp("conformance")
    demo = build_demo_set(root / "demo")
    files = sorted(p for p in demo.rglob("*.dcm"))
    predictors = [OnnxPredictor(resolve(m), providers="cpu") for m in ("cxr-triage", "endoscopy-polyp")]
    screener = StudyScreener(predictors, study_ref_key=b"conformance")
    identity = SiteIdentity()
    with fhir_server() as base, mllp_listener() as listener:
        sinks = {
            "fhir": FhirSink(f"{base}/fhir/R4", identity=identity, timeout_s=5),
            "fhir-triage": FhirTriageSink(f"{base}/fhir/R4", identity=identity, timeout_s=5),
            "hl7": Hl7MllpSink("127.0.0.1", listener.port, identity=identity, timeout_s=5),
            "hl7-triage": Hl7PriorityUpdateSink("127.0.0.1", listener.port, identity=identity, timeout_s=5),
        }
        store = ResultsStore(root / "results.sqlite3")
        service = ScreeningService(
            LocalPipeline(screener, LocalFolderSource(demo)),
            screener,
            store,
            ApiSettings(spool_dir=root / "spool"),
            sinks=sinks,
        )
        lazy = LazyService(lambda: service)
        with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:
            client.get("/readyz")
            ids = []
            for path in files:
                upload = [("files", (path.name, path.read_bytes(), "application/dicom"))]
                answer = client.post("/v1/screenings/upload", files=upload)
                assert answer.status_code == 202, answer.text
                ids.append(answer.json()["screening_id"])
            deadline = time.monotonic() + 300
            while any(client.get(f"/v1/screenings/{j}").json()["status"] not in ("DONE", "FAILED") for j in ids):
                assert time.monotonic() < deadline
                time.sleep(0.2)
            answers = [client.get(f"/v1/screenings/{j}").json() for j in ids]
            results = [ScreeningResult.model_validate(a["result"]) for a in answers if a.get("result")]
            assert len(results) == len(files)
            outbox = Outbox(store.target)
            while outbox.status().pending and time.monotonic() < deadline:
                time.sleep(0.2)
            status = outbox.status()
            outbox.close()
            assert (status.pending, status.dead) == (0, 0)
            client.portal.call(lazy.started.drain, 5.0)  # type: ignore[union-attr]
        fhir = {t: fhir_search(base, t) for t in RESOURCE_TYPES}
        for sink in sinks.values():
            sink.close()
        service.close()
        # what an EMR can file: results of a study (a file that is not DICOM has none)
        yield Delivered([r for r in results if r.study_instance_uid], list(listener.messages), fhir)


def _report(found: list[tuple[str, Findings]]) -> str:
    return "\n".join(f"{what}: {f.errors + f.warnings}" for what, f in found if not f.clean)


def _msh9(er7: str) -> str:
    return str(hl7.parse(er7).segment("MSH")[9])


def test_demo_set_covers_every_kind_of_result(delivered: Delivered) -> None:
    screened = [r for r in delivered.results if r.outcome == OutcomeValues.SCREENED]
    assert any(r.positive_findings for r in screened), "no screened-positive demo study"
    assert any(not r.positive_findings for r in screened), "no screened-negative demo study"
    assert any(r.outcome == OutcomeValues.NOT_SCREENED for r in delivered.results)
    assert any(r.priority == "URGENT" for r in screened), "no demo study raises a priority"


def test_every_hl7_message_passes_hl7apy_strict_and_the_hl7_package(delivered: Delivered) -> None:
    oru = [m for m in delivered.hl7_messages if _msh9(m) == "ORU^R01^ORU_R01"]
    omg = [m for m in delivered.hl7_messages if _msh9(m) == "OMG^O19^OMG_O19"]
    # one ORU per screening (NOT_SCREENED included), one OMG per raised priority
    assert len(oru) == len(delivered.results)
    assert len(omg) == sum(r.priority == "URGENT" for r in delivered.results) > 0
    assert len(oru) + len(omg) == len(delivered.hl7_messages)
    found = [(_msh9(m) + " " + str(hl7.parse(m).segment("MSH")[10]), validate_hl7(m)) for m in oru + omg]
    assert all(f.clean for _, f in found), _report(found)
    # the listed gaps are used (a gap that never occurs should leave the list)
    assert any(f.explained for _, f in found)


def test_oru_content_an_interface_engine_files_on(delivered: Delivered) -> None:
    by_control_id = {message_control_id(r, "hl7"): r for r in delivered.results}
    synthetic = 0
    for er7 in delivered.hl7_messages:
        message = hl7.parse(er7)
        if str(message.segment("MSH")[9]) != "ORU^R01^ORU_R01":
            continue
        result = by_control_id.pop(str(message.segment("MSH")[10]))
        obr = message.segment("OBR")
        assert str(obr[25]) == "P"
        if result.patient_id.startswith("SYN"):  # the synthetic studies carry a full identity
            synthetic += 1
            pid = message.segment("PID")
            assert str(pid[3][0][0]) == result.patient_id and str(pid[3][0][3]) == "HOSPITAL"
            assert str(pid[3][0][4]) == "MR"
            assert str(pid[5][0][0]) == result.patient_name.split("^")[0]  # PID-5 from the DICOM header
            assert str(obr[2][0][0]) == str(obr[3][0][0]) == result.accession_number  # placer and filler
            assert str(obr[7]).startswith("20260101120000")  # the study's time, not the build time
        obx = message.segments("OBX")
        if result.outcome == OutcomeValues.NOT_SCREENED:
            assert len(obx) == 1 and str(obx[0][5][0][0]) == str(result.reason)
            continue
        models = {f.model_id for f in result.findings}
        assert str(obr[4][0][0]) == ("18751-8" if models == {"endoscopy-polyp"} else "18748-4")
        assert (str(obr[24]) == "RAD") == ("cxr-triage" in models)
        assert len(obx) == 2 * len(result.findings)  # present/absent + probability per finding
        for finding, coded, prob in zip(result.findings, obx[0::2], obx[1::2], strict=True):
            assert str(coded[3][0][0]) == finding.code.value and str(coded[3][0][2]) == finding.code.scheme.value
            assert str(coded[5][0][0]) == ("52101004" if finding.positive else "2667000")
            assert float(str(prob[5])) == pytest.approx(finding.score, abs=1e-4)
            assert str(prob[6][0][0]) == "1" and str(prob[6][0][2]) == "UCUM"
            assert str(coded[4]) == str(prob[4])  # OBX-4 groups the pair
            assert str(coded[18][0][0]) == f"{finding.model_id}@{finding.model_version}"
    assert not by_control_id and synthetic > 0  # every result got its ORU


def test_every_fhir_resource_passes_fhirjs_medplum_and_fhir_resources(delivered: Delivered) -> None:
    resources = [dict(r) for t in RESOURCE_TYPES for r in delivered.fhir[t]]
    for r in resources:  # what the server added to meta is not ours to validate
        meta = {k: v for k, v in r.pop("meta", {}).items() if k not in ("versionId", "lastUpdated", "author")}
        if meta:
            r["meta"] = meta
    resources.append(code_system(SiteIdentity()).model_dump(mode="json", exclude_none=True))
    found = [
        (f"{r['resourceType']}/{r.get('id')}", f) for r, f in zip(resources, validate_fhir(resources), strict=True)
    ]
    assert all(f.clean for _, f in found), _report(found)
    raised = {r.study_instance_uid for r in delivered.results if r.priority == "URGENT"}
    assert len(delivered.fhir["Task"]) == len(raised) > 0  # one proposal per study


def test_fhir_shape_follows_ai_results_guidance(delivered: Delivered) -> None:
    reports = delivered.fhir["DiagnosticReport"]
    ids = {r["id"] for r in reports}
    assert ids == {report_id(r) for r in delivered.results}  # one per study and model set, NOT_SCREENED too
    not_screened = [r for r in reports if "result" not in r]
    assert not_screened
    for report in not_screened:
        codes = {c["code"] for c in report["conclusionCode"][0]["coding"]}
        assert "not-performed" in codes and report["conclusion"].startswith("Not screened by AI")
    for report in reports:
        assert "performer" not in report and "extension" not in report
        assert report["meta"]["security"][0]["code"] == "AIAST"
        assert report["imagingStudy"][0]["type"] == "ImagingStudy"
    for obs in delivered.fhir["Observation"]:
        assert obs["partOf"][0]["type"] == "ImagingStudy" and "extension" not in obs
        assert obs["device"]["reference"].startswith("Device/")
        assert obs["valueCodeableConcept"]["coding"][0]["code"] in ("52101004", "2667000")
        assert obs["component"][0]["valueQuantity"]["code"] == "1"
        if obs.get("subject", {}).get("identifier", {}).get("value", "").startswith("SYN"):
            assert obs["effectiveDateTime"].startswith("2026-01-01T12:00:00")  # the study's time
    for device in delivered.fhir["Device"]:
        assert "security" not in device.get("meta", {})  # the algorithm is not AI-asserted content


def test_the_validators_catch_the_defects_the_issue_found() -> None:
    """The harness is not a rubber stamp: the messages dxassist sent before are refused."""
    old_report = {
        "resourceType": "DiagnosticReport",
        "id": "old",
        "status": "preliminary",
        "code": {"text": "AI screening"},
        "performer": [{"reference": "Device/x"}],
    }
    assert any("performer" in e for e in validate_fhir([old_report])[0].errors)
    old_orm = "\r".join(
        [
            "MSH|^~\\&|DXASSIST|DXASSIST|RIS|HOSPITAL|20260101||ORM^O01^ORM_O01|DXP1|P|2.5.1|||AL|NE",
            "PID|1||X^^^HOSP^MR",
            "ORC|XO||ACC||||||20260101",
            "TQ1|1||||||||A^ASAP^HL70485",
            "OBR|1||ACC|18748-4^Diagnostic imaging study^LN|||||||||reason",
        ]
    )
    errors = validate_hl7(old_orm).errors
    assert any("PID_5" in e for e in errors)  # no patient name
    assert any("ORM_O01_ORDER.ORC" in e for e in errors)  # TQ1 opened an order group without ORC


def test_fhir_references_are_literal_where_the_server_holds_the_targets(tmp_path: Path) -> None:
    """``fhir_references: resolve`` finds the Patient, order and study on the server and
    references them literally; ``identifier`` keeps logical references (a site's choice)."""
    from tests.conftest import write_synthetic_cxr

    predictor = OnnxPredictor(resolve("cxr-triage"), providers="cpu")
    screener = StudyScreener([predictor], study_ref_key=b"k")
    from serving.core.screening import screen_paths

    result = screen_paths(screener, [write_synthetic_cxr(tmp_path / "a.dcm", seed=3, patient_name="DOE^JANE")])[0]
    identity = SiteIdentity()
    with fhir_server() as base:
        fhir = f"{base}/fhir/R4"
        patient = httpx.post(
            f"{fhir}/Patient",
            json={
                "resourceType": "Patient",
                "identifier": [{"system": identity.patient_id_system, "value": result.patient_id}],
            },
        ).json()
        order = httpx.post(
            f"{fhir}/ServiceRequest",
            json={
                "resourceType": "ServiceRequest",
                "status": "active",
                "intent": "order",
                "subject": {"reference": f"Patient/{patient['id']}"},
                "identifier": [{"system": identity.accession_system, "value": result.accession_number}],
            },
        ).json()
        resolving = FhirSink(fhir, identity=identity)
        resolving.deliver(1, result, [])
        resolving.close()
        report = fhir_search(base, "DiagnosticReport")[0]
        assert report["subject"]["reference"] == f"Patient/{patient['id']}"
        assert report["basedOn"][0]["reference"] == f"ServiceRequest/{order['id']}"
        assert "reference" not in report["imagingStudy"][0]  # no ImagingStudy on the server: by identifier
        logical = FhirSink(fhir, identity=identity.model_copy(update={"fhir_references": "identifier"}))
        logical.deliver(1, result, [])
        logical.close()
        report = httpx.get(f"{fhir}/DiagnosticReport/{report['id']}").json()
        assert "reference" not in report["subject"] and report["subject"]["identifier"]["value"] == result.patient_id
        # a server that refuses the search still gets the report, with logical references
        for refuse in (False, True):
            if refuse:
                httpx.post(f"{base}/__control/refuse-search")
            sink = FhirSink(fhir, identity=identity)
            sink.deliver(1, result, [])
            sink.close()
            report = httpx.get(f"{fhir}/DiagnosticReport/{report['id']}").json()
            assert ("reference" in report["subject"]) is not refuse


def test_each_code_goes_out_in_its_own_coding_system() -> None:
    """OBX-3 and Observation.code name the scheme the manifest gives each code (RadLex here),
    not SNOMED CT for everything; the strict validators still pass (RADLEX: a listed table gap)."""
    from models.manifest import Code
    from models.results import Finding
    from serving.emr.fhir_resources import as_json, fhir_resources
    from serving.emr.hl7_messages import oru_r01

    radlex = Code(scheme="RADLEX", value="RID5352", meaning="Atelectasis")
    finding = Finding(
        key="atelectasis",
        display="Atelectasis",
        code=radlex,
        body_site=Code(scheme="SCT", value="39607008", meaning="Lung structure"),
        score=0.7,
        threshold=0.5,
        positive=True,
        critical=False,
        model_id="cxr-triage",
        model_version="9.9.9",
        manifest_sha256="0" * 64,
    )
    result = ScreeningResult(
        study_instance_uid="1.2.3.4",
        study_ref="r",
        outcome=OutcomeValues.SCREENED,
        patient_id="P1",
        patient_name="DOE^JANE",
        accession_number="A1",
        findings=[finding],
        priority="ABNORMAL",
        models=["cxr-triage@9.9.9"],
    )
    identity = SiteIdentity()
    er7 = oru_r01(result, identity, message_control_id(result, "hl7"))
    obx = hl7.parse(er7).segment("OBX")
    assert (str(obx[3][0][0]), str(obx[3][0][2])) == ("RID5352", "RADLEX")
    found = validate_hl7(er7)
    assert found.clean and any("RADLEX" in e for e in found.explained)
    observation = next(as_json(r) for r in fhir_resources(result, identity) if r.get_resource_type() == "Observation")
    assert observation["code"]["coding"][0]["system"] == "http://radlex.org"
    assert validate_fhir([observation])[0].clean
