"""Result vocabulary: ``ModelOutput`` (raw scores) -> ``Finding`` -> ``ImageResult`` -> ``ScreeningResult``."""

from __future__ import annotations

from enum import StrEnum

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from models.errors import ReasonCode
from models.manifest import Code, LoadedManifest


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


class ImageResult(_Frozen):
    """What happened to one instance (and which of its frames were used)."""

    sop_instance_uid: str
    label: str = ""
    outcome: OutcomeValues
    reason: ReasonCode | None = None
    reason_detail: str | None = None
    model_ref: str | None = None
    frames_screened: int = 0


class ScreeningResult(_Frozen):
    """The result of screening one study: SCREENED with findings, or NOT_SCREENED with a reason."""

    study_instance_uid: str
    study_ref: str
    outcome: OutcomeValues
    #: identifiers for the EMR (PHI: delivered and stored, never logged)
    patient_id: str = ""
    accession_number: str = ""
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
