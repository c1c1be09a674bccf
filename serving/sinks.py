"""Result sinks for the outbox: FHIR R4, HL7 v2.5 ORU^R01 over MLLP, DICOM SR to the store.

Idempotency comes from stable keys, not from the transport:
* FHIR resources have ids derived from the study, model and finding, written with ``PUT``
  (update-as-create): a retry rewrites the same resources, never adds a report.
* HL7 MSH-10 is the outbox delivery id: the same on every retry of that delivery, never reused
  for another (the id is a database key), also after a restart; receivers dedupe on it.
* The SR's UIDs derive from the result (``serving.dicom_sr``).
Bodies are never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from typing import Any

import httpx
from pydicom.dataset import Dataset

from models.errors import DeliveryFailed, SourceError
from models.results import Finding, ScreeningResult, TriagePriorityValues
from serving.dicom_sc import is_own_overlay
from serving.dicom_sr import build_sr
from serving.outbox import PermanentDeliveryError
from serving.sources.dicomweb import DicomWebSource

AI_ASSERTED = {
    "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    "code": "AIAST",
    "display": "Artificial Intelligence asserted",
}
_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "RADLEX": "http://radlex.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
}


def _id(*parts: str) -> str:
    """A FHIR id (<= 64 chars, [A-Za-z0-9-.]) stable for the same inputs."""
    return "dxa-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:40]


def _coding(code: Any) -> dict[str, str]:
    return {"system": _SYSTEMS[code.scheme.value], "code": code.value, "display": code.meaning}


def fhir_resources(result: ScreeningResult) -> list[dict[str, Any]]:
    """Device(s), one Observation per finding, and the DiagnosticReport, in write order."""
    study_identifier = {"system": "urn:dicom:uid", "value": f"urn:oid:{result.study_instance_uid}"}
    subject = {"identifier": {"system": "urn:dxassist:patient-id", "value": result.patient_id or "unknown"}}
    meta = {"security": [AI_ASSERTED]}
    devices: dict[str, dict[str, Any]] = {}
    observations = []
    for f in result.findings:
        device_id = _id("device", f.model_id, f.model_version)
        devices.setdefault(
            device_id,
            {
                "resourceType": "Device",
                "id": device_id,
                "meta": meta,
                "deviceName": [{"name": f.model_id, "type": "model-name"}],
                "version": [{"value": f.model_version}],
                "manufacturer": "dxassist",
                "note": [{"text": f"AI model {f.model_id}@{f.model_version}, manifest sha256 {f.manifest_sha256}"}],
            },
        )
        observations.append(_observation(result, f, device_id, subject, study_identifier, meta))
    report = {
        "resourceType": "DiagnosticReport",
        "id": _id("report", result.study_instance_uid, *result.models),
        "meta": meta,
        "identifier": [
            {"system": "urn:dxassist:report", "value": _id("report", result.study_instance_uid, *result.models)}
        ],
        "basedOn": [
            {"identifier": {"system": "urn:dxassist:accession", "value": result.accession_number or "unknown"}}
        ],
        "status": "preliminary",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD"}]}],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "18748-4", "display": "Diagnostic imaging study"}],
            "text": "AI screening",
        },
        "subject": subject,
        "issued": datetime.now(UTC).isoformat(timespec="seconds"),
        "performer": [{"reference": f"Device/{d}"} for d in devices],
        "imagingStudy": [{"identifier": study_identifier}],
        "result": [{"reference": f"Observation/{o['id']}"} for o in observations],
        "conclusion": f"AI triage priority {result.priority}; positive: "
        + (", ".join(f.display for f in result.positive_findings) or "none")
        + ". Preliminary, AI-generated; not a diagnosis.",
    }
    return [*devices.values(), *observations, report]


def _observation(
    result: ScreeningResult,
    f: Finding,
    device_id: str,
    subject: dict[str, Any],
    study: dict[str, str],
    meta: dict[str, Any],
) -> dict[str, Any]:
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": _id("obs", result.study_instance_uid, f.model_id, f.model_version, f.key),
        "meta": meta,
        "status": "preliminary",
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "imaging"}]}
        ],
        "code": {"coding": [_coding(f.code)], "text": f.display},
        "subject": subject,
        "device": {"reference": f"Device/{device_id}"},
        "bodySite": {"coding": [_coding(f.body_site)]},
        "valueQuantity": {"value": f.score, "unit": "probability", "system": "http://unitsofmeasure.org", "code": "1"},
        "interpretation": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "POS" if f.positive else "NEG",
                    }
                ]
            }
        ],
        "referenceRange": [{"text": f"positive at score >= {f.threshold} (model operating point)"}],
        "note": [{"text": f"{f.model_id}@{f.model_version}; threshold {f.threshold}"}],
        "extension": [{"url": "urn:dxassist:imaging-study", "valueIdentifier": study}],
    }
    if f.region is not None:
        r = f.region
        observation["component"] = [
            {
                "code": {"text": "region (fractions of image width/height: x, y, width, height)"},
                "valueString": f"{r.x:.3f},{r.y:.3f},{r.width:.3f},{r.height:.3f}",
            }
        ]
    return observation


def raises_priority(result: ScreeningResult) -> bool:
    """The AI raised this study's reading priority: a critical finding is positive and the study
    was not already requested STAT (the AI never lowers a priority, so nothing is sent then)."""
    return result.priority == TriagePriorityValues.URGENT and (result.requested_priority or "").lower() != "stat"


def _triage_reason(result: ScreeningResult) -> str:
    critical = ", ".join(f.display for f in result.positive_findings if f.critical)
    return f"AI triage: critical finding(s) positive: {critical}. Preliminary, AI-generated; not a diagnosis."


def fhir_triage_task(result: ScreeningResult) -> dict[str, Any]:
    """A FHIR R4 Task proposing ASAP reading for the study's order, with the reason.

    One Task per study (stable id): a re-screen rewrites it, never adds a second proposal."""
    report_id = _id("report", result.study_instance_uid, *result.models)
    return {
        "resourceType": "Task",
        "id": _id("triage", result.study_instance_uid),
        "meta": {"security": [AI_ASSERTED]},
        "status": "requested",
        "intent": "proposal",
        "priority": "asap",
        "code": {"text": "Raise reading priority (AI worklist triage)"},
        "businessStatus": {"text": f"AI triage {result.priority}"},
        "focus": {"identifier": {"system": "urn:dxassist:accession", "value": result.accession_number or "unknown"}},
        "for": {"identifier": {"system": "urn:dxassist:patient-id", "value": result.patient_id or "unknown"}},
        "authoredOn": datetime.now(UTC).isoformat(timespec="seconds"),
        "reasonCode": {"text": _triage_reason(result)},
        "reasonReference": {"identifier": {"system": "urn:dxassist:report", "value": report_id}},
    }


class FhirSink:
    """DiagnosticReport + Observations + Device to a FHIR R4 server, idempotent by PUT on stable ids."""

    name = "fhir"

    def __init__(
        self,
        base_url: str,
        *,
        token: str | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )

    def deliver(self, delivery_id: int, result: ScreeningResult, evidence: list[Dataset]) -> None:
        if not result.findings:
            return  # NOT_SCREENED: nothing to report
        self._put(fhir_resources(result))

    def _put(self, resources: list[dict[str, Any]]) -> None:
        for resource in resources:
            try:
                response = self.client.put(f"/{resource['resourceType']}/{resource['id']}", json=resource)
            except httpx.HTTPError as exc:
                raise DeliveryFailed(f"FHIR server unreachable ({type(exc).__name__})") from exc
            if response.status_code in (200, 201):
                continue
            if response.status_code in (408, 429) or response.status_code >= 500:
                raise DeliveryFailed(f"FHIR server answered HTTP {response.status_code}")
            raise PermanentDeliveryError(f"FHIR server refused {resource['resourceType']}: HTTP {response.status_code}")

    def close(self) -> None:
        self.client.close()


class FhirTriageSink(FhirSink):
    """The worklist priority update as a FHIR ``Task`` (``emr.fhir.priority_updates``); sends
    only when the AI raised the priority."""

    name = "fhir-triage"

    def deliver(self, delivery_id: int, result: ScreeningResult, evidence: list[Dataset]) -> None:
        if raises_priority(result):
            self._put([fhir_triage_task(result)])


def _hl7_text(value: str) -> str:
    """Escape HL7 v2 delimiters in text that came from DICOM (names, IDs, free text)."""
    return (
        (
            value.replace("\\", "\\E\\")
            .replace("|", "\\F\\")
            .replace("^", "\\S\\")
            .replace("&", "\\T\\")
            .replace("~", "\\R\\")
        )
        .replace("\r", " ")
        .replace("\n", " ")
    )


def control_id(delivery_id: int, prefix: str = "DXA") -> str:
    """MSH-10: the outbox delivery id, so the same on every retry and never reused."""
    return f"{prefix}{delivery_id:012d}"


def oru_r01(
    delivery_id: int, result: ScreeningResult, *, sending_app: str = "DXASSIST", receiving_app: str = "EMR"
) -> str:
    """HL7 v2.5 ORU^R01 with one OBX per finding; MSH-10 = the outbox delivery id."""
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    control = control_id(delivery_id)
    segments = [
        f"MSH|^~\\&|{sending_app}|DXASSIST|{receiving_app}|HOSPITAL|{now}||ORU^R01^ORU_R01|{control}|P|2.5|||AL|NE",
        f"PID|1||{_hl7_text(result.patient_id)}^^^HOSP^MR",
        f"ORC|RE||{_hl7_text(result.accession_number)}",
        f"OBR|1||{_hl7_text(result.accession_number)}|18748-4^Diagnostic imaging study^LN|||{now}|||||||||||||||{now}||RAD|P",
    ]
    for n, f in enumerate(result.findings, start=1):
        flag = "A" if f.positive else "N"
        code = f"{f.code.value}^{_hl7_text(f.code.meaning)}^SCT"
        segments.append(
            f"OBX|{n}|NM|{code}|{f.model_id}|{f.score:.4f}|1^probability^UCUM|<{f.threshold}|{flag}|||P|||{now}"
        )
    segments.append(f"NTE|1||AI-generated, preliminary; priority {result.priority}; models {', '.join(result.models)}")
    return "\r".join(segments)


def orm_priority_update(
    delivery_id: int, result: ScreeningResult, *, sending_app: str = "DXASSIST", receiving_app: str = "RIS"
) -> str:
    """HL7 v2.5 ORM^O01 change-order request (ORC-1 XO) raising the order's priority to ASAP
    (TQ1-9, table 0485), with the reason in OBR-13 and NTE. MSH-10 = ``DXP`` + the delivery id."""
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    accession = _hl7_text(result.accession_number)
    reason = _hl7_text(_triage_reason(result))
    return "\r".join(
        [
            f"MSH|^~\\&|{sending_app}|DXASSIST|{receiving_app}|HOSPITAL|{now}||ORM^O01^ORM_O01|"
            f"{control_id(delivery_id, 'DXP')}|P|2.5|||AL|NE",
            f"PID|1||{_hl7_text(result.patient_id)}^^^HOSP^MR",
            f"ORC|XO||{accession}||||||{now}",
            "TQ1|1||||||||A^ASAP^HL70485",
            f"OBR|1||{accession}|18748-4^Diagnostic imaging study^LN|||||||||{reason}",
            f"NTE|1||{reason}",
        ]
    )


class Hl7MllpSink:
    """ORU^R01 over MLLP. ACK AA: done; AE or no ACK: retry; AR: dead letter."""

    name = "hl7"
    prefix = "DXA"

    def __init__(self, host: str, port: int, *, timeout_s: float = 10.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s

    def message(self, delivery_id: int, result: ScreeningResult) -> str | None:
        """The message to send for this result, or None when there is nothing to send."""
        return oru_r01(delivery_id, result) if result.findings else None

    def deliver(self, delivery_id: int, result: ScreeningResult, evidence: list[Dataset]) -> None:
        message = self.message(delivery_id, result)
        if message is None:
            return
        try:
            ack = asyncio.run(self._send(message))
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise DeliveryFailed(f"MLLP peer unreachable or silent ({type(exc).__name__})") from exc
        code = str(ack.segment("MSA")[1]) if ack is not None else ""
        control = str(ack.segment("MSA")[2]) if ack is not None else ""
        if control and control != control_id(delivery_id, self.prefix):
            raise DeliveryFailed("ACK does not acknowledge this message (MSA-2 mismatch)")
        if code in ("AA", "CA"):
            return
        if code in ("AR", "CR"):
            raise PermanentDeliveryError(f"HL7 receiver rejected the message ({code})")
        raise DeliveryFailed(f"HL7 receiver answered {code or 'nothing'}")

    async def _send(self, message: str) -> Any:
        import hl7
        from hl7.mllp import open_hl7_connection

        reader, writer = await asyncio.wait_for(open_hl7_connection(self.host, self.port), self.timeout_s)
        try:
            writer.writemessage(hl7.parse(message))
            await writer.drain()
            # the timeout cancels only the read, so the connection below is always closed
            return await asyncio.wait_for(reader.readmessage(), self.timeout_s)
        finally:
            writer.close()
            await writer.wait_closed()

    def close(self) -> None:
        """Nothing held between deliveries (one connection per message)."""


class Hl7PriorityUpdateSink(Hl7MllpSink):
    """The worklist priority update as ORM^O01 over MLLP (``emr.hl7.priority_updates``); sends
    only when the AI raised the priority. Same ACK rules as the ORU sink."""

    name = "hl7-triage"
    prefix = "DXP"

    def message(self, delivery_id: int, result: ScreeningResult) -> str | None:
        return orm_priority_update(delivery_id, result) if raises_priority(result) else None


class DicomSrSink:
    """The TID 1500 SR, and the heatmap Secondary Capture when there is one, into the same study
    (one STOW-RS request)."""

    name = "dicom-sr"

    def __init__(self, source: DicomWebSource) -> None:
        self.source = source

    def close(self) -> None:
        self.source.close()

    def deliver(self, delivery_id: int, result: ScreeningResult, evidence: list[Dataset]) -> None:
        if not result.findings:
            return
        images = [e for e in evidence if not is_own_overlay(e)]
        overlays = [e for e in evidence if is_own_overlay(e)]
        if not images:
            raise PermanentDeliveryError("no evidence headers kept for this result")
        try:
            self.source.store([build_sr(result, images), *overlays])
        except SourceError as exc:
            raise DeliveryFailed(f"store unavailable ({type(exc).__name__})") from exc
