"""Input QA and routing: which model (if any) may look at an image, decided from its header.

Runs before any pixel is decoded and before any model runs. An image that no model accepts
raises ``UnsupportedStudy`` with the reason of the model that came closest (a lower-leg CR is
``UNSUPPORTED_BODY_PART`` for the chest model, not ``UNSUPPORTED_MODALITY`` for the endoscopy
model), so the radiologist sees the most useful explanation.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.errors import ReasonCode, UnsupportedStudy
from models.manifest import ModelManifest
from models.pixels import ImageHeader


def _shown(value: str) -> str:
    return repr(value) if value else "(missing)"


def check_accepts(manifest: ModelManifest, header: ImageHeader) -> None:
    """Raise ``UnsupportedStudy`` unless ``manifest.accepts`` admits this image.

    Checks, in order: SOP class, modality, photometric interpretation and samples per pixel,
    body part, view position, minimum size. Values in messages are DICOM defined terms, not
    patient data.
    """
    acc = manifest.accepts
    ref = manifest.ref
    if acc.sop_class_uid and header.sop_class_uid not in acc.sop_class_uid:
        raise UnsupportedStudy(ReasonCode.UNSUPPORTED_SOP_CLASS, f"SOP class not accepted by {ref}")
    if header.modality not in acc.modality:
        raise UnsupportedStudy(
            ReasonCode.UNSUPPORTED_MODALITY,
            f"modality {_shown(header.modality)} not accepted by {ref} (accepts {', '.join(acc.modality)})",
        )
    if (
        header.photometric_interpretation not in acc.photometric_interpretation
        or header.samples_per_pixel != acc.samples_per_pixel
    ):
        raise UnsupportedStudy(
            ReasonCode.UNSUPPORTED_PHOTOMETRIC,
            f"photometric interpretation {_shown(header.photometric_interpretation)} not accepted by {ref}",
        )
    if acc.body_part_examined and header.body_part_examined not in acc.body_part_examined:
        raise UnsupportedStudy(
            ReasonCode.UNSUPPORTED_BODY_PART,
            f"body part {_shown(header.body_part_examined)} not accepted by {ref} "
            f"(accepts {', '.join(p or '(missing)' for p in acc.body_part_examined)})",
        )
    if acc.view_position and header.view_position not in acc.view_position:
        raise UnsupportedStudy(
            ReasonCode.UNSUPPORTED_VIEW,
            f"view position {_shown(header.view_position)} not accepted by {ref} "
            f"(accepts {', '.join(v or '(missing)' for v in acc.view_position)})",
        )
    if min(header.rows, header.columns) < acc.min_side:
        raise UnsupportedStudy(ReasonCode.IMAGE_TOO_SMALL, f"image side below {acc.min_side} pixels for {ref}")


_DEPTH = {
    ReasonCode.UNSUPPORTED_SOP_CLASS: 0,
    ReasonCode.UNSUPPORTED_MODALITY: 1,
    ReasonCode.UNSUPPORTED_PHOTOMETRIC: 2,
    ReasonCode.UNSUPPORTED_BODY_PART: 3,
    ReasonCode.UNSUPPORTED_VIEW: 4,
    ReasonCode.IMAGE_TOO_SMALL: 5,
}


def route(header: ImageHeader, manifests: Sequence[ModelManifest]) -> ModelManifest:
    """The first model that accepts the image; otherwise the closest model's rejection.

    Raises:
        UnsupportedStudy: no model accepts the image (or no model is configured).
    """
    if not manifests:
        raise UnsupportedStudy(ReasonCode.UNSUPPORTED_MODALITY, "no model is configured")
    closest: UnsupportedStudy | None = None
    for manifest in manifests:
        try:
            check_accepts(manifest, header)
        except UnsupportedStudy as exc:
            if closest is None or _DEPTH.get(exc.reason, 0) > _DEPTH.get(closest.reason, 0):
                closest = exc
            continue
        return manifest
    assert closest is not None
    raise closest
