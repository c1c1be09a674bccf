"""DICOM SR (TID 1500 Measurement Report, Comprehensive 3D SR) of a screening result, with highdicom,
in the form viewers render (IHE AI Results style).

* Image Library (TID 1600): every screened image of the study.
* Imaging Measurements: one TID 1410 planar-ROI group per positive finding with a region, each
  with a SCOORD (closed polyline box in the source image's pixel coordinates) referencing that
  image (and frame), the finding as the coded Finding (121071), the probability as a NUM whose
  concept is the finding itself (so OHIF, which labels a region with its first NUM, shows
  "Pneumothorax: 98.70 %"), the model's threshold as Threshold Value (DCM 122411), the finding
  Present (SCT), the finding site and the algorithm identification (TID 4019).
* Qualitative Evaluations (UMLS C0034375): every other finding (negatives, positives without a
  region) as finding = Present/Absent with probability and threshold, the processing summary
  (CID 6047) and a comment per image that was not screened, with its reason.
* A screened study with no region to draw gets one group outlining the whole examined image
  ("No abnormality detected", each finding's probability as a NUM).

Every group has a SCOORD on purpose: OHIF 3.13 crashes on an SR with no measurement group, on a
group without SCOORD once the image is shown, and on a mix. A NOT_SCREENED study gets no SR.

The SR is preliminary and unverified (AI output, not a signed report). Its UIDs derive from the
result, so re-sending the same result never creates a second SR. Every coding scheme it uses is
declared in the Coding Scheme Identification Sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from models.results import Finding, OutcomeValues, ScreeningResult
from serving.dicom.common import (
    ABSENT,
    MANUFACTURER,
    PERCENT,
    PRESENT,
    PROBABILITY,
    ROOT,
    THRESHOLD,
    PlacedFinding,
    concept,
    declare_schemes,
    placed_findings,
    result_uid,
    schemes_in,
)

__all__ = ["build_sr", "result_uid"]

_IMAGING = hd.sr.CodedConcept(value="363679005", scheme_designator="SCT", meaning="Imaging")
_PROCEDURES = {
    "CR": hd.sr.CodedConcept(value="168731009", scheme_designator="SCT", meaning="Chest X-ray"),
    "DX": hd.sr.CodedConcept(value="168731009", scheme_designator="SCT", meaning="Chest X-ray"),
    "ES": hd.sr.CodedConcept(value="73761001", scheme_designator="SCT", meaning="Colonoscopy"),
}
_QUALITATIVE = hd.sr.CodedConcept(value="C0034375", scheme_designator="UMLS", meaning="Qualitative Evaluations")
_SUMMARY = hd.sr.CodedConcept(value="111017", scheme_designator="DCM", meaning="CAD Processing and Findings Summary")
_NO_ABNORMALITY = hd.sr.CodedConcept(value="281900007", scheme_designator="SCT", meaning="No abnormality detected")
_COMMENT = hd.sr.CodedConcept(value="121106", scheme_designator="DCM", meaning="Comment")
_OUTCOMES = {
    (True, True): ("111242", "All algorithms succeeded; with findings"),
    (True, False): ("111241", "All algorithms succeeded; without findings"),
    (False, True): ("111244", "Not all algorithms succeeded; with findings"),
    (False, False): ("111243", "Not all algorithms succeeded; without findings"),
}
_NONE_SUCCEEDED = ("111245", "No algorithms succeeded; without findings")


class _EntryDescriptors(hd.sr.ImageLibraryEntryDescriptors):
    """TID 1602 descriptors that tolerate a radiograph without Patient Orientation or Imager
    Pixel Spacing (real files often lack them): those descriptors are left out, not invented."""

    def _generate_projection_radiography_descriptors(self, dataset: Dataset) -> list[hd.sr.ContentItem]:
        items: list[hd.sr.ContentItem] = []
        orientation = list(dataset.get("PatientOrientation") or [])
        if len(orientation) == 2 and all(orientation):
            for name, value in zip(
                (codes.DCM.PatientOrientationRow, codes.DCM.PatientOrientationColumn), orientation, strict=True
            ):
                items.append(
                    hd.sr.TextContentItem(
                        name=name, value=str(value), relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
                    )
                )
        spacing = [float(v) for v in (dataset.get("ImagerPixelSpacing") or [])]
        if len(spacing) == 2 and all(v > 0 for v in spacing):
            for name, value in (
                (codes.DCM.HorizontalPixelSpacing, spacing[1]),
                (codes.DCM.VerticalPixelSpacing, spacing[0]),
            ):
                items.append(
                    hd.sr.NumContentItem(
                        name=name,
                        value=value,
                        unit=codes.UCUM.Millimeter,
                        relationship_type=hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT,
                    )
                )
        return items


def _image_library(images: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: one group with every screened image of the study."""
    entries = []
    for image in images:
        item = hd.sr.ImageContentItem(
            name=hd.sr.CodedConcept(value="260753009", scheme_designator="SCT", meaning="Source"),
            referenced_sop_class_uid=str(image.SOPClassUID),
            referenced_sop_instance_uid=str(image.SOPInstanceUID),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
        item.ContentSequence = hd.sr.ContentSequence(
            cast(Sequence[hd.sr.ContentItem], _EntryDescriptors(image)), is_root=False, is_sr=True
        )
        entries.append(item)
    group = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibraryGroup, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence(entries, is_root=False, is_sr=True)
    library = hd.sr.ContainerContentItem(
        name=codes.DCM.ImageLibrary, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group], is_root=False, is_sr=True)
    return library


def _algorithm(finding: Finding) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=finding.model_id, version=finding.model_version, parameters=[f"threshold={finding.threshold}"]
    )


def _percent(value: float) -> float:
    return round(100.0 * value, 2)


def _roi_group(placed: PlacedFinding) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    finding, image = placed.finding, placed.image
    algorithm = _algorithm(finding)
    source = hd.sr.SourceImageForRegion(
        referenced_sop_class_uid=str(image.SOPClassUID),
        referenced_sop_instance_uid=str(image.SOPInstanceUID),
        referenced_frame_numbers=[placed.frame_number] if placed.frame_number else None,
    )
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array(placed.polyline(), dtype=np.float64),
        source_image=source,
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(prefix=ROOT, entropy_srcs=[finding.model_id, finding.key, str(image.SOPInstanceUID)]),
            identifier=f"{finding.display} ({finding.model_id})",
        ),
        referenced_region=region,
        finding_type=concept(finding.code),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(anatomic_location=concept(finding.body_site))],
        measurements=[
            hd.sr.Measurement(
                name=concept(finding.code), value=_percent(finding.score), unit=PERCENT, algorithm_id=algorithm
            ),
            hd.sr.Measurement(name=THRESHOLD, value=_percent(finding.threshold), unit=PERCENT, algorithm_id=algorithm),
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=concept(finding.code), value=PRESENT)],
    )


def _evaluation(finding: Finding) -> hd.sr.CodeContentItem:
    """finding = Present/Absent, with the probability and the threshold as its properties."""
    item = hd.sr.CodeContentItem(
        name=concept(finding.code),
        value=PRESENT if finding.positive else ABSENT,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    item.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.NumContentItem(
                name=PROBABILITY,
                value=_percent(finding.score),
                unit=PERCENT,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
            ),
            hd.sr.NumContentItem(
                name=THRESHOLD,
                value=_percent(finding.threshold),
                unit=PERCENT,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
            ),
            hd.sr.TextContentItem(
                name=codes.DCM.AlgorithmName,
                value=f"{finding.model_id}@{finding.model_version}",
                relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES,
            ),
        ],
        is_root=False,
        is_sr=True,
    )
    return item


def _qualitative(result: ScreeningResult, placed: Sequence[PlacedFinding]) -> hd.sr.ContainerContentItem:
    shown = {(p.finding.model_id, p.finding.key) for p in placed}
    not_screened = [i for i in result.images if i.outcome != OutcomeValues.SCREENED]
    summary = _summary(result)
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=_SUMMARY,
            value=hd.sr.CodedConcept(value=summary[0], scheme_designator="DCM", meaning=summary[1]),
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    items += [_evaluation(f) for f in result.findings if (f.model_id, f.key) not in shown]
    if result.outcome != OutcomeValues.SCREENED and result.reason is not None:
        items.append(
            hd.sr.TextContentItem(
                name=_COMMENT,
                value=f"Study not screened: {result.reason.value}",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    for n, image in enumerate(not_screened, start=1):
        reason = image.reason.value if image.reason else "UNKNOWN"
        items.append(
            hd.sr.TextContentItem(
                name=_COMMENT,
                value=f"Image {n} of {len(not_screened)} not screened: {reason}",
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    container = hd.sr.ContainerContentItem(name=_QUALITATIVE, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(items, is_root=False, is_sr=True)
    return container


def _summary(result: ScreeningResult) -> tuple[str, str]:
    screened = [i for i in result.images if i.outcome == OutcomeValues.SCREENED]
    not_screened = [i for i in result.images if i.outcome != OutcomeValues.SCREENED]
    if not screened:
        return _NONE_SUCCEEDED
    return _OUTCOMES[(not not_screened, bool(result.positive_findings))]


def _whole_image_group(result: ScreeningResult, image: Dataset) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """A screened study with no region to draw: one group whose SCOORD outlines the whole image
    the AI examined, "No abnormality detected" as the finding, and each finding's probability as
    a NUM named by the finding (highest first, so OHIF's label reads e.g. "Cardiomegaly: 1.27 %").

    OHIF 3.13 needs this shape: it crashes on an SR with no measurement group, and on any group
    without a SCOORD once the image is displayed."""
    rows, cols = float(image.Rows), float(image.Columns)
    frames = int(image.get("NumberOfFrames", 1) or 1)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.array([(0.0, 0.0), (cols, 0.0), (cols, rows), (0.0, rows), (0.0, 0.0)], dtype=np.float64),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=str(image.SOPClassUID),
            referenced_sop_instance_uid=str(image.SOPInstanceUID),
            referenced_frame_numbers=[1] if frames > 1 else None,
        ),
    )
    ranked = sorted(result.findings, key=lambda f: -f.score)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=generate_uid(prefix=ROOT, entropy_srcs=[result.result_id, "whole-image", str(image.SOPInstanceUID)]),
            identifier="AI: no finding above threshold",
        ),
        referenced_region=region,
        finding_type=_NO_ABNORMALITY,
        algorithm_id=_algorithm(ranked[0]) if ranked else None,
        measurements=[
            hd.sr.Measurement(name=concept(f.code), value=_percent(f.score), unit=PERCENT, algorithm_id=_algorithm(f))
            for f in ranked
        ],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=concept(f.code), value=PRESENT if f.positive else ABSENT) for f in ranked
        ],
    )


def build_sr(result: ScreeningResult, evidence: Sequence[Dataset]) -> Dataset:
    """The SR for a result; ``evidence`` are the study's image headers (no pixels needed).

    Raises:
        ValueError: the result was not screened (OHIF 3.13 crashes on an SR without a SCOORD
            measurement, and there is nothing to outline: the reason goes to the EMR and the
            worklist), or no evidence image of the result's study is given.
    """
    if result.outcome != OutcomeValues.SCREENED:
        raise ValueError("result: only a SCREENED result becomes an SR")
    images = [e for e in evidence if str(e.StudyInstanceUID) == result.study_instance_uid]
    if not images:
        raise ValueError("evidence: no image of the screened study")
    placed = placed_findings(result, images)
    models = sorted({(f.model_id, f.model_version) for f in result.findings}) or [("dxassist", "")]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(prefix=ROOT, entropy_srcs=[f"{m}@{v}" for m, v in models]),
            name=MANUFACTURER,
            manufacturer_name=MANUFACTURER,
            model_name=", ".join(f"{m}@{v}" for m, v in models)[:64],
        ),
    )
    modality = str(images[0].get("Modality", ""))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_PROCEDURES.get(modality, _IMAGING),
        imaging_measurements=[_roi_group(p) for p in placed] or [_whole_image_group(result, images[0])],
        title=codes.DCM.ImagingMeasurementReport,
    )
    content = report[0].ContentSequence
    at = next(
        (i for i, item in enumerate(content) if item.ConceptNameCodeSequence[0].CodeValue == "126010"), len(content)
    )
    content.insert(at, _image_library(images))  # TID 1500 row 8: before Imaging Measurements
    content.append(_qualitative(result, placed))
    sr = hd.sr.Comprehensive3DSR(
        evidence=images,
        content=report,
        series_instance_uid=result_uid(result, "series"),
        series_number=990,
        sop_instance_uid=result_uid(result, "sop"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description="dxassist AI findings (preliminary)",
    )
    declare_schemes(sr, schemes_in(sr))
    return sr
