"""Secondary Captures of the AI result, for viewers that show neither SR nor presentation states.

Drawn on the original image at its own size (Rows x Columns of the source, the source's pixel
spacing kept), so a reader can compare them pixel for pixel with the original:

* one SC per positive critical finding (e.g. pneumothorax), its region outlined and captioned;
* one study summary SC: every positive region outlined, and every finding listed with its score,
  threshold and model.

Each carries a burned-in "not for diagnosis" banner, Burned In Annotation YES, Image Type
DERIVED\\SECONDARY, the Source Image Sequence of the original and a Derivation Description.
UIDs derive from the result (a retried delivery stores the same instances again).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from models.results import ScreeningResult
from serving.dicom.common import (
    MANUFACTURER,
    NOT_FOR_DIAGNOSIS,
    PlacedFinding,
    copy_laterality,
    placed_findings,
    result_uid,
    with_plain_names,
)

SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
BANNER = NOT_FOR_DIAGNOSIS
_CRITICAL = (255, 64, 64)
_OTHER = (255, 200, 0)
_TEXT = (255, 255, 0)


def is_own_object(ds: Dataset) -> bool:
    """A result object dxassist made (SC, SEG), as opposed to the header of a screened image."""
    return str(ds.get("Manufacturer", "")) == MANUFACTURER and str(ds.get("SOPClassUID", "")) in (
        SC_SOP_CLASS,
        SEG_SOP_CLASS,
    )


def _rgb(display: NDArray[np.float32]) -> NDArray[np.uint8]:
    """A display-ready frame ([0, 1], grey or RGB) as an RGB uint8 picture."""
    pixels = np.clip(display, 0.0, 1.0)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray((pixels * 255.0 + 0.5).astype(np.uint8))


def _text(canvas: NDArray[np.uint8], text: str, origin: tuple[int, int], scale: float, colour: tuple[int, ...]) -> None:
    thickness = max(1, round(scale * 2))
    cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thickness + 2, cv2.LINE_AA)
    cv2.putText(canvas, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)


def render(display: NDArray[np.float32], placed: Sequence[PlacedFinding], lines: Sequence[str]) -> NDArray[np.uint8]:
    """The original frame with ``placed`` regions outlined and captioned, the banner on top and
    ``lines`` (the findings list) at the bottom left; same height and width as ``display``."""
    canvas = _rgb(display)
    rows, cols = canvas.shape[:2]
    scale = max(0.4, min(rows, cols) / 900.0)
    line_h = int(32 * scale)
    stroke = max(2, round(min(rows, cols) / 300))
    for p in placed:
        colour = _CRITICAL if p.finding.critical else _OTHER
        x0, y0, x1, y1 = (round(v) for v in p.box)
        cv2.rectangle(canvas, (x0, y0), (max(x0, x1 - 1), max(y0, y1 - 1)), colour, stroke)
        _text(canvas, p.caption, (x0 + stroke * 2, min(rows - 4, y0 + line_h)), scale * 0.8, colour)
    banner_h = int(line_h * 1.4)
    cv2.rectangle(canvas, (0, 0), (cols - 1, banner_h), (0, 0, 0), thickness=-1)
    _text(canvas, BANNER, (stroke * 2, int(banner_h * 0.75)), scale, _TEXT)
    for n, line in enumerate(reversed(lines)):
        _text(canvas, line, (stroke * 2, rows - 8 - n * line_h), scale * 0.7, _TEXT)
    return canvas


def _sc(
    result: ScreeningResult,
    image: Dataset,
    pixels: NDArray[np.uint8],
    purpose: str,
    number: int,
    description: str,
    frame_number: int | None,
) -> Dataset:
    orientation = [str(v) for v in (image.get("PatientOrientation") or [])]
    spacing = [float(v) for v in (image.get("PixelSpacing") or image.get("ImagerPixelSpacing") or [])]
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=with_plain_names(image),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=result_uid(result, "sc-series"),
        series_number=991,
        sop_instance_uid=result_uid(result, f"sc-{purpose}"),
        instance_number=number,
        manufacturer=MANUFACTURER,
        patient_orientation=(orientation[0], orientation[1]) if len(orientation) == 2 else ("L", "F"),
        pixel_spacing=(spacing[0], spacing[1]) if len(spacing) == 2 and all(v > 0 for v in spacing) else None,  # type: ignore[arg-type]  # highdicom annotates ints
        series_description="dxassist AI overlays (preliminary)",
    )
    copy_laterality(image, sc)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = f"{description}; drawn on the original image at its own size; preliminary AI output"[
        :1024
    ]
    source = Dataset()
    source.ReferencedSOPClassUID = image.SOPClassUID
    source.ReferencedSOPInstanceUID = image.SOPInstanceUID
    if frame_number is not None:
        source.ReferencedFrameNumber = frame_number
    sc.SourceImageSequence = [source]
    sc.ImageComments = "AI-generated overlay, preliminary, not for diagnosis"
    return sc


def build_scs(
    result: ScreeningResult, evidence: Sequence[Dataset], frames: dict[tuple[str, int | None], NDArray[np.float32]]
) -> list[Dataset]:
    """One SC per positive critical finding, then the study summary SC.

    ``frames`` maps (SOP Instance UID, 1-based frame number or None) of a source image to its
    display-ready pixels (``models.pixels.decode_frames``); an image missing there gets no SC.
    """
    images = [e for e in evidence if str(e.StudyInstanceUID) == result.study_instance_uid]
    placed = placed_findings(result, images)
    if not result.positive_findings:
        return []
    out: list[Dataset] = []
    number = 1
    for p in placed:
        if not p.finding.critical:
            continue
        pixels = frames.get((str(p.image.SOPInstanceUID), p.frame_number))
        if pixels is None:
            continue
        drawn = render(pixels, [p], [f"{p.finding.model_id}@{p.finding.model_version}"])
        description = f"AI region of {p.finding.display} ({p.finding.model_id}@{p.finding.model_version})"
        out.append(
            _sc(result, p.image, drawn, f"{p.finding.model_id}-{p.finding.key}", number, description, p.frame_number)
        )
        number += 1
    summary_image = placed[0].image if placed else images[0] if images else None
    frame_number = placed[0].frame_number if placed else None
    if summary_image is not None:
        pixels = frames.get((str(summary_image.SOPInstanceUID), frame_number))
        if pixels is not None:
            on_image = [p for p in placed if p.image is summary_image and p.frame_number == frame_number]
            lines = [
                f"{'+' if f.positive else '-'} {f.display} {f.score:.2f} (threshold {f.threshold:.2f})"
                for f in sorted(result.findings, key=lambda f: (not f.positive, -f.score))
            ]
            lines.append(f"priority {result.priority.value if result.priority else '-'}; {', '.join(result.models)}")
            drawn = render(pixels, on_image, lines)
            out.append(_sc(result, summary_image, drawn, "summary", number, "AI study summary", frame_number))
    return out
