"""FHIR R4 resources for a screening result, built as typed models (``fhir.resources``' R4B
classes, which match R4 for every element used here; ADR 0014 says why not its R4 release).

Shape (IHE AI Results and the HL7 DICOM SR-to-FHIR mapping):

* ``Device`` per model version: the algorithm (name, version, manifest digest). Not a performer
  (R4 allows only Practitioner/Organization roles there); observations point at it in ``device``.
* ``Observation`` per finding: code in its own system, ``valueCodeableConcept`` Present/Absent
  (SNOMED CT), the probability as a component (UCUM "1", the operating point as its reference
  range), the region of a present finding as a component, ``interpretation`` POS/NEG, ``partOf`` the ImagingStudy,
  ``basedOn`` the order, ``effectiveDateTime`` the study's time, ``device`` the algorithm.
* ``DiagnosticReport``: preliminary, the report code/category per model (settings), subject,
  ``imagingStudy``, ``basedOn``, ``effectiveDateTime``, the observations, a conclusion.
  NOT_SCREENED: no observations; the conclusion says why and ``conclusionCode`` carries
  ``data-absent-reason#not-performed`` and the reason in dxassist's code system.
* ``Task`` (priority updates): intent proposal, priority asap, focus the order.

AI-asserted content (report, observations, task) carries the security label ``AIAST``
(v3-ObservationValue), as the HL7 AI Transparency IG marks it. No extension is defined, so
there is no StructureDefinition to ship; dxassist's own codes are one CodeSystem
(``code_system``) for a site to load. References to Patient, ServiceRequest and ImagingStudy
are whatever ``References`` the sink resolved: literal when the server holds them, by
identifier otherwise (``SiteIdentity.fhir_references``). Ids derive from study, model and
finding, so a retry or a re-screen with the same models rewrites the same resources.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fhir.resources.R4B.codeableconcept import CodeableConcept
from fhir.resources.R4B.codesystem import CodeSystem, CodeSystemConcept
from fhir.resources.R4B.coding import Coding
from fhir.resources.R4B.device import Device, DeviceDeviceName, DeviceVersion
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.meta import Meta
from fhir.resources.R4B.observation import Observation, ObservationComponent, ObservationReferenceRange
from fhir.resources.R4B.quantity import Quantity
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource
from fhir.resources.R4B.task import Task

from models.errors import ReasonCode
from models.manifest import Code, CodingSchemeValues
from models.results import Finding, ScreeningResult
from serving.emr.hl7_messages import ABSENT, PRESENT, reason_text
from serving.emr.priority import NOTE, triage_reason
from serving.settings import SiteIdentity

AI_ASSERTED = Coding(
    system="http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
    code="AIAST",
    display="Artificial Intelligence asserted",
)
DICOM_UID_SYSTEM = "urn:dicom:uid"
UCUM = "http://unitsofmeasure.org"
#: dxassist's local codes: (code, display, definition)
LOCAL_CODES: tuple[tuple[str, str, str], ...] = (
    ("PROB", "AI probability", "Probability (0..1) the model assigns to the finding."),
    ("REGION", "Image region", "Where the model located the finding: x, y, width, height as image fractions."),
    ("FRAME", "Frame number", "The frame (0-based) of a multi-frame image the finding was scored on."),
    *(
        (reason.value, reason.value.replace("_", " ").capitalize(), f"Not screened by AI: {reason.value}.")
        for reason in ReasonCode
    ),
)


@dataclass(frozen=True)
class References:
    """How the resources point at things the EMR owns (resolved by the sink, or identifiers)."""

    patient: Reference | None
    order: Reference | None
    study: Reference


def resource_id(*parts: str) -> str:
    """A FHIR id (<= 64 chars, [A-Za-z0-9-.]) stable for the same inputs."""
    return "dxa-" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:40]


def report_id(result: ScreeningResult) -> str:
    return resource_id("report", result.study_instance_uid, *result.models)


def patient_identifier(result: ScreeningResult, identity: SiteIdentity) -> Identifier | None:
    if not result.patient_id:
        return None
    return Identifier(system=identity.patient_id_system, value=result.patient_id)


def order_identifier(result: ScreeningResult, identity: SiteIdentity) -> Identifier | None:
    if not result.accession_number:
        return None
    return Identifier(system=identity.accession_system, value=result.accession_number)


def study_identifier(result: ScreeningResult) -> Identifier:
    return Identifier(system=DICOM_UID_SYSTEM, value=f"urn:oid:{result.study_instance_uid}")


def identifier_references(result: ScreeningResult, identity: SiteIdentity) -> References:
    """References by identifier only (logical references), for ``fhir_references: identifier``
    and for what a ``resolve`` search did not find."""
    patient = patient_identifier(result, identity)
    order = order_identifier(result, identity)
    return References(
        patient=Reference(type="Patient", identifier=patient) if patient else None,
        order=Reference(type="ServiceRequest", identifier=order) if order else None,
        study=Reference(type="ImagingStudy", identifier=study_identifier(result)),
    )


def fhir_datetime(moment: datetime | None, identity: SiteIdentity) -> datetime | None:
    """An aware datetime (FHIR needs an offset with a time); naive means the site's zone."""
    if moment is None:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=identity.zone)


def _coding(code: Code, identity: SiteIdentity) -> Coding:
    return Coding(system=identity.fhir_coding_systems[code.scheme], code=code.value, display=code.meaning)


def _local(code: str, identity: SiteIdentity) -> CodeableConcept:
    display = next(d for c, d, _ in LOCAL_CODES if c == code)
    return CodeableConcept(coding=[Coding(system=identity.local_code_system_uri, code=code, display=display)])


def _meta() -> Meta:
    return Meta(security=[AI_ASSERTED])


def _device(finding: Finding) -> Device:
    return Device(
        id=resource_id("device", finding.model_id, finding.model_version),
        deviceName=[DeviceDeviceName(name=finding.model_id, type="model-name")],
        version=[DeviceVersion(value=finding.model_version)],
        manufacturer="dxassist",
        note=[
            {"text": f"AI model {finding.model_id}@{finding.model_version}, manifest sha256 {finding.manifest_sha256}"}
        ],
    )


def _observation(
    result: ScreeningResult, finding: Finding, refs: References, identity: SiteIdentity, issued: datetime
) -> Observation:
    sct = identity.fhir_coding_systems[CodingSchemeValues.SCT]
    value, meaning = PRESENT if finding.positive else ABSENT
    components = [
        ObservationComponent(
            code=_local("PROB", identity),
            valueQuantity=Quantity(value=finding.score, unit="1", system=UCUM, code="1"),
            referenceRange=[
                ObservationReferenceRange(
                    high=Quantity(value=finding.threshold, unit="1", system=UCUM, code="1"),
                    text="below the model's operating point: finding absent",
                )
            ],
        )
    ]
    if finding.positive and finding.region is not None:  # where an absent finding "is" is noise
        r = finding.region
        components.append(
            ObservationComponent(
                code=_local("REGION", identity), valueString=f"{r.x:.3f},{r.y:.3f},{r.width:.3f},{r.height:.3f}"
            )
        )
    if finding.frame_index is not None:
        components.append(ObservationComponent(code=_local("FRAME", identity), valueInteger=finding.frame_index))
    return Observation(
        id=resource_id("obs", result.study_instance_uid, finding.model_id, finding.model_version, finding.key),
        meta=_meta(),
        status="preliminary",
        category=[
            CodeableConcept(
                coding=[Coding(system="http://terminology.hl7.org/CodeSystem/observation-category", code="imaging")]
            )
        ],
        code=CodeableConcept(coding=[_coding(finding.code, identity)], text=finding.display),
        subject=refs.patient,
        basedOn=[refs.order] if refs.order else None,
        partOf=[refs.study],
        effectiveDateTime=fhir_datetime(result.study_datetime, identity),
        issued=issued,
        device=Reference(reference=f"Device/{resource_id('device', finding.model_id, finding.model_version)}"),
        bodySite=CodeableConcept(coding=[_coding(finding.body_site, identity)]),
        valueCodeableConcept=CodeableConcept(coding=[Coding(system=sct, code=value, display=meaning)]),
        interpretation=[
            CodeableConcept(
                coding=[
                    Coding(
                        system="http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        code="POS" if finding.positive else "NEG",
                        display="Positive" if finding.positive else "Negative",
                    )
                ]
            )
        ],
        component=components,
    )


def fhir_resources(result: ScreeningResult, identity: SiteIdentity, refs: References | None = None) -> list[Resource]:
    """Device(s), one Observation per finding, and the DiagnosticReport, in write order."""
    refs = refs or identifier_references(result, identity)
    issued = datetime.now(UTC).replace(microsecond=0)
    devices: dict[str, Device] = {}
    observations = []
    for finding in result.findings:
        device = _device(finding)
        devices.setdefault(str(device.id), device)
        observations.append(_observation(result, finding, refs, identity, issued))
    kind = identity.report_kind([f.model_id for f in result.findings])
    code = CodeableConcept(
        coding=[Coding(system=kind.code.fhir_system, code=kind.code.code, display=kind.code.display)],
        text="AI screening",
    )
    category = None
    if kind.diagnostic_service:
        category = [
            CodeableConcept(
                coding=[Coding(system="http://terminology.hl7.org/CodeSystem/v2-0074", code=kind.diagnostic_service)]
            )
        ]
    if result.findings:
        positive = ", ".join(f.display for f in result.positive_findings) or "none"
        conclusion = f"AI triage priority {result.priority}; positive: {positive}. {NOTE}"
        conclusion_code = None
    else:
        conclusion = f"{reason_text(result)}. {result.reason_detail or ''}".strip()
        reason = result.reason.value if result.reason else ReasonCode.NO_USABLE_IMAGE.value
        conclusion_code = [
            CodeableConcept(
                coding=[
                    Coding(
                        system="http://terminology.hl7.org/CodeSystem/data-absent-reason",
                        code="not-performed",
                        display="Not Performed",
                    ),
                    Coding(system=identity.local_code_system_uri, code=reason),
                ],
                text=reason_text(result),
            )
        ]
    identifier = Identifier(system=identity.report_id_system, value=report_id(result))
    report = DiagnosticReport(
        id=report_id(result),
        meta=_meta(),
        identifier=[identifier],
        basedOn=[refs.order] if refs.order else None,
        status="preliminary",
        category=category,
        code=code,
        subject=refs.patient,
        effectiveDateTime=fhir_datetime(result.study_datetime, identity),
        issued=issued,
        imagingStudy=[refs.study],
        result=[Reference(reference=f"Observation/{o.id}") for o in observations] or None,
        conclusion=conclusion,
        conclusionCode=conclusion_code,
    )
    return [*devices.values(), *observations, report]


def fhir_triage_task(result: ScreeningResult, identity: SiteIdentity, refs: References | None = None) -> Task:
    """A Task proposing ASAP reading for the study's order, with the reason. One per study
    (stable id): a re-screen rewrites it, never adds a second proposal."""
    refs = refs or identifier_references(result, identity)
    return Task(
        id=resource_id("triage", result.study_instance_uid),
        meta=_meta(),
        status="requested",
        intent="proposal",
        priority="asap",
        code=CodeableConcept(text="Raise reading priority (AI worklist triage)"),
        businessStatus=CodeableConcept(text=f"AI triage {result.priority}"),
        focus=refs.order or refs.study,
        for_fhir=refs.patient,
        authoredOn=datetime.now(UTC).replace(microsecond=0),
        reasonCode=CodeableConcept(text=triage_reason(result)),
        reasonReference=Reference(reference=f"DiagnosticReport/{report_id(result)}"),
    )


def code_system(identity: SiteIdentity) -> CodeSystem:
    """dxassist's CodeSystem (every local code the resources use), for a site to load."""
    return CodeSystem(
        id="dxassist",
        url=identity.local_code_system_uri,
        name="DxassistCodes",
        title="dxassist local codes",
        status="active",
        content="complete",
        caseSensitive=True,
        concept=[CodeSystemConcept(code=c, display=d, definition=text) for c, d, text in LOCAL_CODES],
    )


def as_json(resource: Resource) -> dict[str, Any]:
    """The resource as FHIR JSON (no nulls)."""
    data: dict[str, Any] = json.loads(resource.model_dump_json(exclude_none=True))
    return data
