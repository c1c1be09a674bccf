"""Result vocabulary: ``ModelOutput`` (raw scores) -> ``Finding`` -> ``ImageResult`` -> ``ScreeningResult``."""

from __future__ import annotations

import hashlib
import json
import re
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import Any
from uuid import uuid4

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.errors import ReasonCode
from models.manifest import Code, LoadedManifest


def new_result_id() -> str:
    """A random id for a new screening result (``ScreeningResult.result_id``)."""
    return uuid4().hex


class OutcomeValues(StrEnum):
    SCREENED = "SCREENED"
    NOT_SCREENED = "NOT_SCREENED"


class TriagePriorityValues(StrEnum):
    """AI triage suggestion for the worklist. The AI may raise a priority, never lower it."""

    URGENT = "URGENT"  # a critical finding is positive
    ABNORMAL = "ABNORMAL"  # a non-critical finding is positive
    ROUTINE = "ROUTINE"  # screened, nothing positive


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Region(_Frozen):
    """Where a finding is, as fractions of the image width/height (0..1), from heatmap or mask."""

    x: float = Field(ge=0, le=1)
    y: float = Field(ge=0, le=1)
    width: float = Field(ge=0, le=1)
    height: float = Field(ge=0, le=1)


class Finding(_Frozen):
    """One label of one model on one study: score, the threshold used, and the verdict."""

    key: str
    display: str
    code: Code
    body_site: Code
    score: float
    threshold: float
    positive: bool
    critical: bool
    model_id: str
    model_version: str
    manifest_sha256: str
    region: Region | None = None
    frame_index: int | None = None
    #: the image the score (and region) came from: result objects reference it (SR SCOORD, GSPS)
    sop_instance_uid: str | None = None


class ImageResult(_Frozen):
    """What happened to one instance (and which of its frames were used)."""

    sop_instance_uid: str
    label: str = ""
    outcome: OutcomeValues
    reason: ReasonCode | None = None
    reason_detail: str | None = None
    model_ref: str | None = None
    frames_screened: int = 0
    #: the model's out-of-distribution distance for this image (largest over the frames it
    #: screened; the smallest when every frame was refused); None when no gate ran
    ood_distance: float | None = None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _clean(value: Any, limit: int) -> str:
    """A header value as text fit for a message: control characters (CR would end an HL7
    segment) become spaces, and the length is capped (the file may exceed its VR's maximum)."""
    return _CONTROL.sub(" ", str(value if value is not None else "")).strip()[:limit]


def _study_datetime(date: str, time: str, offset: str) -> datetime | None:
    """StudyDate (DA) + StudyTime (TM) [+ TimezoneOffsetFromUTC]; None when absent or malformed."""
    if not re.fullmatch(r"\d{8}", date):
        return None
    digits = re.match(r"(\d{2})(\d{2})?(\d{2})?", time.replace(":", ""))
    hh, mm, ss = digits.groups() if digits else ("00", None, None)
    try:
        moment = datetime.strptime(f"{date}{hh}{mm or '00'}{ss or '00'}", "%Y%m%d%H%M%S")
    except ValueError:
        return None
    zone = re.fullmatch(r"([+-])(\d{2})(\d{2})", offset)
    if zone:
        sign = 1 if zone.group(1) == "+" else -1
        delta = timedelta(hours=int(zone.group(2)), minutes=int(zone.group(3)))
        if delta < timedelta(hours=15):
            moment = moment.replace(tzinfo=timezone(sign * delta))
    return moment


class StudyIdentity(_Frozen):
    """Who and what a study is, for the EMR (PHI: delivered and stored, never logged)."""

    patient_id: str = ""
    #: DICOM PN, alphabetic group: family^given^middle^prefix^suffix
    patient_name: str = ""
    accession_number: str = ""
    #: when the study was made; naive when the header has no TimezoneOffsetFromUTC
    study_datetime: datetime | None = None
    placer_order_number: str = ""
    #: the visit/admission (AdmissionID), for PV1 when known
    visit_number: str = ""

    @classmethod
    def from_header(cls, ds: Any) -> StudyIdentity:
        """Read from a DICOM header (any object with ``get``); hostile values are cleaned."""

        def text(keyword: str, limit: int = 64) -> str:
            return _clean(ds.get(keyword, ""), limit)

        return cls(
            patient_id=text("PatientID"),
            patient_name=text("PatientName", 324).split("=")[0],
            accession_number=text("AccessionNumber"),
            study_datetime=_study_datetime(text("StudyDate"), text("StudyTime"), text("TimezoneOffsetFromUTC")),
            placer_order_number=text("PlacerOrderNumberImagingServiceRequest"),
            visit_number=text("AdmissionID"),
        )


class ScreeningResult(_Frozen):
    """The result of screening one study: SCREENED with findings, or NOT_SCREENED with a reason."""

    study_instance_uid: str
    study_ref: str
    outcome: OutcomeValues
    #: unique per screening (never per study): messages derive their ids from it (HL7 MSH-10),
    #: so a re-screen or a fresh results database never repeats one. The screening core sets a
    #: random one (``new_result_id``); the online service replaces it with one derived from its
    #: job, so a second screening of one job re-sends the same ids (ADR 0021); a result stored
    #: before this field existed gets one derived from its content, the same on every load (its
    #: pending deliveries keep their ids)
    result_id: str = ""
    #: identifiers for the EMR (PHI: delivered and stored, never logged); see ``StudyIdentity``
    patient_id: str = ""
    patient_name: str = ""
    accession_number: str = ""
    study_datetime: datetime | None = None
    placer_order_number: str = ""
    #: the filler (RIS) order number, from an inbound order matched to the study (ORC-3/OBR-3)
    filler_order_number: str = ""
    visit_number: str = ""
    reason: ReasonCode | None = None
    reason_detail: str | None = None
    priority: TriagePriorityValues | None = None
    #: the priority the study was requested with (stat/routine), when it came through the service:
    #: a priority update to the EMR/RIS is sent only when the AI's raises it
    requested_priority: str | None = None
    findings: list[Finding] = Field(default_factory=list)
    images: list[ImageResult] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list)
    duration_ms: float = 0.0

    @model_validator(mode="before")
    @classmethod
    def _content_id_when_missing(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("result_id"):
            content = json.dumps(data, sort_keys=True, default=str)
            data = {**data, "result_id": hashlib.sha256(content.encode()).hexdigest()[:32]}
        return data

    @property
    def positive_findings(self) -> list[Finding]:
        return [f for f in self.findings if f.positive]


def region_from_map(heatmap: NDArray[np.float32], level: float = 0.5) -> Region | None:
    """Bounding box of the part of a (H, W) map at or above ``level`` of its peak, as fractions."""
    if heatmap.size == 0 or not np.isfinite(heatmap).all():
        return None
    peak = float(heatmap.max())
    low = float(heatmap.min())
    if peak - low <= 1e-6:
        return None
    mask = heatmap >= low + level * (peak - low)
    ys, xs = np.nonzero(mask)
    h, w = heatmap.shape
    return Region(
        x=float(xs.min()) / w,
        y=float(ys.min()) / h,
        width=float(xs.max() - xs.min() + 1) / w,
        height=float(ys.max() - ys.min() + 1) / h,
    )


def findings_from_scores(
    loaded: LoadedManifest,
    probabilities: NDArray[np.float32],
    heatmaps: NDArray[np.float32] | None = None,
    frame_index: int | None = None,
) -> list[Finding]:
    """Apply the manifest's operating points to one image's probabilities (one per label)."""
    manifest = loaded.manifest
    findings = []
    for i, label in enumerate(manifest.labels):
        score = float(probabilities[i])
        region = region_from_map(heatmaps[i]) if heatmaps is not None else None
        findings.append(
            Finding(
                key=label.key,
                display=label.display,
                code=label.code,
                body_site=label.body_site,
                score=round(score, 6),
                threshold=label.threshold,
                positive=score >= label.threshold,
                critical=label.critical,
                model_id=manifest.id,
                model_version=manifest.version,
                manifest_sha256=loaded.manifest_sha256,
                region=region,
                frame_index=frame_index,
            )
        )
    return findings


def triage_priority(findings: list[Finding]) -> TriagePriorityValues:
    if any(f.positive and f.critical for f in findings):
        return TriagePriorityValues.URGENT
    if any(f.positive for f in findings):
        return TriagePriorityValues.ABNORMAL
    return TriagePriorityValues.ROUTINE
