"""DICOM SR (TID 1500 Measurement Report, Comprehensive 3D SR) of a screening result, with highdicom.

One measurement group per finding: finding type and site, qualitative evaluation present/absent
at the model's operating point, the model score, and the algorithm identification (TID 4019:
model id, version, threshold). The SR is preliminary and unverified (AI output, not a signed
report). Its UIDs derive from the result, so re-sending the same result never creates a second SR.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, generate_uid

from models.manifest import Code as ModelCode
from models.results import Finding, OutcomeValues, ScreeningResult

_ROOT = "1.2.826.0.1.3680043.8.498."
_SCORE = hd.sr.CodedConcept(value="SCORE", scheme_designator="99DXASSIST", meaning="AI model score")
_PRESENT = hd.sr.CodedConcept(value="52101004", scheme_designator="SCT", meaning="Present")
_ABSENT = hd.sr.CodedConcept(value="2667000", scheme_designator="SCT", meaning="Absent")
_NO_UNITS = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
_IMAGING = hd.sr.CodedConcept(value="363679005", scheme_designator="SCT", meaning="Imaging")
_PROCEDURES = {
    "CR": hd.sr.CodedConcept(value="168731009", scheme_designator="SCT", meaning="Chest X-ray"),
    "DX": hd.sr.CodedConcept(value="168731009", scheme_designator="SCT", meaning="Chest X-ray"),
    "ES": hd.sr.CodedConcept(value="73761001", scheme_designator="SCT", meaning="Colonoscopy"),
}


def _concept(code: ModelCode) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme.value, meaning=code.meaning)


def result_uid(result: ScreeningResult, purpose: str) -> UID:
    """Deterministic UID for this result (same result -> same SR UIDs -> no duplicate on retry)."""
    digest = hashlib.sha256(
        "|".join(
            [purpose, result.study_instance_uid, *result.models, *(f"{f.key}={f.score}" for f in result.findings)]
        ).encode()
    ).hexdigest()
    return generate_uid(prefix=_ROOT, entropy_srcs=[digest])


def _group(finding: Finding, evidence: Sequence[Dataset]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    algorithm = hd.sr.AlgorithmIdentification(
        name=finding.model_id, version=finding.model_version, parameters=[f"threshold={finding.threshold}"]
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(
                prefix=_ROOT, entropy_srcs=[finding.model_id, finding.key, *(str(e.SOPInstanceUID) for e in evidence)]
            ),
            identifier=f"{finding.model_id}:{finding.key}",
        ),
        finding_type=_concept(finding.code),
        finding_sites=[hd.sr.FindingSite(anatomic_location=_concept(finding.body_site))],
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=_concept(finding.code), value=_PRESENT if finding.positive else _ABSENT)
        ],
        measurements=[hd.sr.Measurement(name=_SCORE, value=finding.score, unit=_NO_UNITS, algorithm_id=algorithm)],
    )


def build_sr(result: ScreeningResult, evidence: Sequence[Dataset]) -> Dataset:
    """The SR for a SCREENED result; ``evidence`` are the screened images' headers (no pixels needed).

    Raises:
        ValueError: the result was not screened, or no evidence of that study is given.
    """
    if result.outcome != OutcomeValues.SCREENED or not result.findings:
        raise ValueError("result: only SCREENED results with findings become an SR")
    evidence = [e for e in evidence if str(e.StudyInstanceUID) == result.study_instance_uid]
    if not evidence:
        raise ValueError("evidence: no image of the screened study")
    models = sorted({(f.model_id, f.model_version) for f in result.findings})
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(prefix=_ROOT, entropy_srcs=[f"{m}@{v}" for m, v in models]),
            name="dxassist",
            manufacturer_name="dxassist",
            model_name=", ".join(f"{m}@{v}" for m, v in models),
        ),
    )
    modality = str(evidence[0].get("Modality", ""))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_PROCEDURES.get(modality, _IMAGING),
        imaging_measurements=[_group(f, evidence) for f in result.findings],
        title=codes.DCM.ImagingMeasurementReport,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(evidence),
        content=report,
        series_instance_uid=result_uid(result, "series"),
        series_number=990,
        sop_instance_uid=result_uid(result, "sop"),
        instance_number=1,
        manufacturer="dxassist",
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="dxassist AI findings (preliminary)",
    )
    return sr
