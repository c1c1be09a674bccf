"""Grayscale Softcopy Presentation State (GSPS) with the AI regions, for PACS viewers that show
presentation states but not SR.

On each screened grayscale image with a positive finding: the finding's region as a closed
polyline and a short text next to it ("AI, preliminary: Pneumothorax 0.99"), in one graphic
layer named ``AI``, plus a corner text saying that the content is preliminary AI output. The
image's own window (when it has one) is carried as the presentation's VOI so the image looks as
it does without the PR. UIDs derive from the result (a retry stores the same instance).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from models.results import ScreeningResult
from serving.dicom.common import (
    MANUFACTURER,
    NOT_FOR_DIAGNOSIS,
    PlacedFinding,
    copy_laterality,
    declare_schemes,
    is_grayscale,
    placed_findings,
    result_uid,
    schemes_in,
)

_LAYER = hd.pr.GraphicLayer(layer_name="AI", order=1, description="dxassist AI regions (preliminary)")
_PIXEL = hd.pr.AnnotationUnitsValues.PIXEL


def _first(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str | bytes) or not hasattr(value, "__len__"):
        return float(value)
    seq = list(value)
    return float(seq[0]) if seq else None


def _presentation_lut(image: Dataset) -> hd.PresentationLUTTransformation:
    """INVERSE for a MONOCHROME1 image (PS3.3 C.11.6: its lowest values are white): with IDENTITY a
    viewer that applies the presentation state shows the radiograph inverted."""
    inverse = str(image.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1"
    return hd.PresentationLUTTransformation(
        presentation_lut_shape=hd.PresentationLUTShapeValues.INVERSE
        if inverse
        else hd.PresentationLUTShapeValues.IDENTITY
    )


def _voi(image: Dataset) -> list[hd.pr.SoftcopyVOILUTTransformation] | None:
    center, width = _first(image.get("WindowCenter")), _first(image.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    return [hd.pr.SoftcopyVOILUTTransformation(window_center=center, window_width=width)]


def _caption_box(p: PlacedFinding, rows: int, cols: int) -> tuple[float, float, float, float]:
    """Where a region's caption goes: a text line just above the region's top edge (inside it
    when the region touches the top of the image), from its left edge.

    A bounding box as well as the anchor point: both are valid (PS3.3 C.10.5), but viewers that
    place text by its box only (Larvitar's GSPS tool draws an anchor-only text at the image origin)
    would otherwise stack every caption in the top-left corner."""
    height = max(12.0, 0.03 * rows)
    left = min(max(p.box[0], 1.0), cols - 2.0)
    right = min(cols - 1.0, left + max(height, 0.55 * height * len(p.caption)))
    top = p.box[1] - height if p.box[1] - height >= 1.0 else max(p.box[1], 1.0)
    bottom = min(rows - 1.0, top + height)
    return (left, top, right, bottom)


def _annotation(
    result: ScreeningResult, image: Dataset, placed: Sequence[PlacedFinding]
) -> list[hd.pr.GraphicAnnotation]:
    rows, cols = int(image.Rows), int(image.Columns)
    by_frame: dict[int | None, list[PlacedFinding]] = {}
    for p in placed:
        by_frame.setdefault(p.frame_number, []).append(p)
    annotations = []
    for frame, items in by_frame.items():
        graphics = [
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=np.array(p.polyline(), dtype=np.float64),
                units=_PIXEL,
                tracking_id=f"{p.finding.model_id}:{p.finding.key}",
                tracking_uid=result_uid(result, f"gsps-{p.finding.model_id}-{p.finding.key}"),
            )
            for p in items
        ]
        texts = [
            hd.pr.TextObject(
                text_value=p.caption,
                units=_PIXEL,
                bounding_box=_caption_box(p, rows, cols),
                anchor_point=(max(p.box[0], 1.0), max(p.box[1], 1.0)),
                anchor_point_visible=False,
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
            for p in items
        ]
        texts.append(
            hd.pr.TextObject(
                text_value=NOT_FOR_DIAGNOSIS,
                units=_PIXEL,
                bounding_box=(1.0, 1.0, min(cols - 1.0, 0.6 * cols), min(rows - 1.0, 0.05 * rows)),
                text_justification=hd.pr.TextJustificationValues.LEFT,
            )
        )
        annotations.append(
            hd.pr.GraphicAnnotation(
                referenced_images=[image],
                graphic_layer=_LAYER,
                referenced_frame_number=frame,
                graphic_objects=graphics,
                text_objects=texts,
            )
        )
    return annotations


def build_gsps(result: ScreeningResult, evidence: Sequence[Dataset]) -> Dataset | None:
    """The GSPS of the result's regions; None when no grayscale image has a positive region.

    One presentation state per study: it references the one image with the most positive
    regions (a GSPS applies one VOI/presentation to the images it references)."""
    images = [e for e in evidence if str(e.StudyInstanceUID) == result.study_instance_uid and is_grayscale(e)]
    placed = placed_findings(result, images)
    if not placed:
        return None
    by_image: dict[str, list[PlacedFinding]] = {}
    for p in placed:
        by_image.setdefault(str(p.image.SOPInstanceUID), []).append(p)
    chosen = max(by_image.values(), key=len)
    image = chosen[0].image
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=[image],
        series_instance_uid=result_uid(result, "gsps-series"),
        series_number=992,
        sop_instance_uid=result_uid(result, "gsps-sop"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=", ".join(result.models)[:64] or MANUFACTURER,
        software_versions=", ".join(result.models)[:64] or "unknown",
        device_serial_number="0",
        content_label="DXASSIST_AI",
        content_description="AI regions, preliminary, not for diagnosis",
        graphic_annotations=_annotation(result, image, chosen),
        graphic_layers=[_LAYER],
        voi_lut_transformations=_voi(image),
        presentation_lut_transformation=_presentation_lut(image),
    )
    gsps.SeriesDescription = "dxassist AI regions (preliminary)"
    copy_laterality(image, gsps)
    declare_schemes(gsps, schemes_in(gsps))
    return gsps
