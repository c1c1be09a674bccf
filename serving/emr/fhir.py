"""FHIR R4 result sink: DiagnosticReport, Observations and Device, written with PUT on stable ids.

Idempotency comes from stable keys, not from the transport: resources have ids derived from the
study, model and finding, written with ``PUT`` (update-as-create), so a retry rewrites the same
resources and never adds a report. Bodies are never logged.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import httpx
from pydicom.dataset import Dataset

from models.errors import DeliveryFailed, DeliveryRejected
from models.results import Finding, ScreeningResult
from serving.emr.priority import raises_priority, triage_reason

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
        "reasonCode": {"text": triage_reason(result)},
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
            raise DeliveryRejected(f"FHIR server refused {resource['resourceType']}: HTTP {response.status_code}")

    def close(self) -> None:
        self.client.close()


class FhirTriageSink(FhirSink):
    """The worklist priority update as a FHIR ``Task`` (``emr.fhir.priority_updates``); sends
    only when the AI raised the priority."""

    name = "fhir-triage"

    def deliver(self, delivery_id: int, result: ScreeningResult, evidence: list[Dataset]) -> None:
        if raises_priority(result):
            self._put([fhir_triage_task(result)])
