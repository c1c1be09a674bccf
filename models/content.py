"""Content check: does the decoded image look like what its header claims?

Header QA (models/qa.py) trusts the labels; this check does not. It runs after decoding and
before any model, on cheap facts: the header's own technical attributes (SOP class, bit depth)
and statistics of the decoded frame (grey levels, blank background, contrast, colour). An
image that disagrees is ``CONTENT_MISMATCH``: a segmentation mask, an MR/CT/ultrasound slice or
a colour picture relabelled ``CR``/``CHEST``/``PA`` never reaches the chest model. Whatever
passes still meets the model's out-of-distribution gate (models/ood.py), which catches what
looks like nothing the model was trained on.

The limits are deliberately loose (a radiograph from any site must pass); the gate is the fine
filter. Details name the measured value and the limit in plain words, and the SOP class only by
its DICOM name; never a header string.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final

import numpy as np
from numpy.typing import NDArray

from models.errors import ReasonCode, UnsupportedStudy
from models.manifest import ModelManifest
from models.pixels import ImageHeader, PixelFrame
from models.preprocessing import Pipeline
from models.qa import normalise, route

_PREFIX: Final = "1.2.840.10008.5.1.4.1.1."
#: SOP classes whose content is, by definition, of one kind (family, words for a radiologist)
_SOP_FAMILY: Final[dict[str, tuple[str, str]]] = {
    "1": ("XR", "a computed radiography image"),
    "1.1": ("XR", "a digital X-ray image"),
    "1.1.1": ("XR", "a digital X-ray image"),
    "1.1.2": ("MG", "a mammogram"),
    "1.1.2.1": ("MG", "a mammogram"),
    "1.1.3": ("IO", "an intra-oral X-ray image"),
    "1.1.3.1": ("IO", "an intra-oral X-ray image"),
    "2": ("CT", "a CT image"),
    "2.1": ("CT", "an enhanced CT image"),
    "2.2": ("CT", "a legacy converted CT image"),
    "3.1": ("US", "an ultrasound image"),
    "4": ("MR", "an MR image"),
    "4.1": ("MR", "an enhanced MR image"),
    "4.3": ("MR", "an enhanced MR colour image"),
    "4.4": ("MR", "a legacy converted MR image"),
    "6.1": ("US", "an ultrasound image"),
    "6.2": ("US", "an enhanced ultrasound volume"),
    "12.1": ("XA", "an X-ray angiography image"),
    "12.1.1": ("XA", "an enhanced X-ray angiography image"),
    "12.2": ("RF", "an X-ray fluoroscopy image"),
    "12.2.1": ("RF", "an enhanced fluoroscopy image"),
    "13.1.3": ("MG", "a breast tomosynthesis image"),
    "20": ("NM", "a nuclear medicine image"),
    "66.4": ("SEG", "a segmentation (mask)"),
    "77.1.1": ("ES", "an endoscopy image"),
    "77.1.1.1": ("ES", "an endoscopy video"),
    "77.1.2": ("SM", "a microscopy image"),
    "77.1.4": ("XC", "a photograph"),
    "77.1.5.1": ("OP", "an ophthalmic photograph"),
    "128": ("PT", "a PET image"),
    "130": ("PT", "an enhanced PET image"),
    "481.1": ("RT", "a radiotherapy image"),
    "481.2": ("RT", "a radiotherapy dose grid"),
}
#: modality defined terms a model may accept -> the SOP-class family that fits them
_MODALITY_FAMILY: Final[dict[str, str]] = {"CR": "XR", "DX": "XR", "ES": "ES", "XC": "XC", "MG": "MG"}

#: radiograph limits (greyscale models)
MIN_GREY_LEVELS: Final = 32
MAX_BLANK_FRACTION: Final = 0.6
MIN_CONTRAST: Final = 0.05
#: colour limits (endoscopy and other colour models)
MIN_CHROMA: Final = 0.02
#: side of the subsampled grid the statistics are measured on
_GRID: Final = 256


@dataclass(frozen=True, slots=True)
class ContentStats:
    """Cheap statistics of one decoded frame (display values in [0, 1])."""

    grey_levels: int
    blank_fraction: float  # share of pixels at pure black or pure white
    contrast: float  # 1st-99th percentile spread of luminance
    chroma: float  # mean distance of a pixel's channels from their mean (0 for greyscale)


def measure(frame: PixelFrame) -> ContentStats:
    """Statistics on a <= 256 x 256 subsample of the frame (a fraction of a millisecond: ADR 0015)."""
    px = frame.pixels
    step = max(1, max(px.shape[:2]) // _GRID)
    sub = px[::step, ::step]
    if sub.ndim == 3:
        luma: NDArray[np.float32] = (sub @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.float32)
        chroma = float(np.abs(sub - sub.mean(axis=2, keepdims=True)).mean())
    else:
        luma, chroma = sub, 0.0
    # one histogram of 4096 bins gives levels, blank share and percentiles without sorting
    quantised = np.clip(luma * 4095.0 + 0.5, 0, 4095).astype(np.int32)
    hist = np.bincount(quantised.ravel(), minlength=4096)
    cdf = np.cumsum(hist)
    total = int(cdf[-1])
    low = int(np.searchsorted(cdf, 0.01 * total)) / 4095.0
    high = int(np.searchsorted(cdf, 0.99 * total)) / 4095.0
    blank = int(hist[: int(0.005 * 4095) + 1].sum() + hist[int(np.ceil(0.995 * 4095)) :].sum())
    return ContentStats(
        grey_levels=int(np.count_nonzero(hist)),
        blank_fraction=blank / max(total, 1),
        contrast=float(high - low),
        chroma=chroma,
    )


def _refuse(detail: str) -> UnsupportedStudy:
    return UnsupportedStudy(ReasonCode.CONTENT_MISMATCH, detail)


def check_header_facts(manifest: ModelManifest, header: ImageHeader) -> None:
    """Refuse when the header's own technical facts contradict its labels.

    The SOP class says what kind of object the file is; a CT image relabelled ``CR`` is still a
    CT image. A colour image is not a radiograph (nor a greyscale one an endoscopy frame). A
    1-bit image is a mask or a drawing, never a radiograph or a video frame.
    """
    ref = manifest.ref
    family = None
    if header.sop_class_uid.startswith(_PREFIX):
        family = _SOP_FAMILY.get(header.sop_class_uid[len(_PREFIX) :])
    wanted = {_MODALITY_FAMILY.get(m.upper(), m.upper()) for m in manifest.accepts.modality}
    if family is not None and family[0] not in wanted:
        raise _refuse(
            f"the file is stored as {family[1]} (its SOP class), not the kind of image "
            f"{ref} reads ({', '.join(manifest.accepts.modality)})"
        )
    colour = header.samples_per_pixel == 3 or normalise(header.photometric_interpretation) == "PALETTE COLOR"
    if colour and manifest.accepts.samples_per_pixel == 1:
        raise _refuse(f"the image is in colour, and {ref} reads greyscale radiographs")
    if not colour and manifest.accepts.samples_per_pixel == 3:
        raise _refuse(f"the image is greyscale, and {ref} reads colour frames")
    if header.bits_stored == 1 or header.bits_allocated == 1:
        raise _refuse(f"the image has 1 bit per pixel: a mask or a drawing, not an image {ref} can read")


def check_pixels(manifest: ModelManifest, frames: Sequence[PixelFrame]) -> list[ContentStats]:
    """Refuse when the decoded pixels do not look like the model's kind of image.

    Checked on every frame given (the frames that would be scored); returns their statistics.
    """
    ref = manifest.ref
    colour_model = manifest.accepts.samples_per_pixel == 3
    out = []
    for frame in frames:
        stats = measure(frame)
        where = f" (frame {frame.frame_index + 1})" if frame.header.number_of_frames > 1 else ""
        if stats.grey_levels < MIN_GREY_LEVELS:
            raise _refuse(
                f"the image has only {stats.grey_levels} distinct grey levels{where} (a mask, drawing or "
                f"test pattern; at least {MIN_GREY_LEVELS} expected for {ref})"
            )
        if stats.contrast < MIN_CONTRAST:
            raise _refuse(
                f"the image has almost no contrast{where}: 1st-99th percentile spread {stats.contrast:.3f} "
                f"< limit {MIN_CONTRAST} for {ref}"
            )
        if colour_model:
            if stats.chroma < MIN_CHROMA:
                raise _refuse(
                    f"the image has no colour{where}: chroma {stats.chroma:.3f} < limit {MIN_CHROMA} "
                    f"(an endoscopy frame is in colour) for {ref}"
                )
        elif stats.blank_fraction > MAX_BLANK_FRACTION:
            raise _refuse(
                f"{stats.blank_fraction:.0%} of the image is blank black or white background{where}, "
                f"more than a radiograph has (limit {MAX_BLANK_FRACTION:.0%}) for {ref}: an MR, CT or "
                "ultrasound slice, or a heavily collimated view"
            )
        out.append(stats)
    return out


def _checked_preprocess(
    manifest: ModelManifest, fn: Callable[[PixelFrame], NDArray[np.float32]], frame: PixelFrame
) -> NDArray[np.float32]:
    check_pixels(manifest, [frame])
    return fn(frame)


def content_checked(manifest: ModelManifest, pipeline: Pipeline) -> Pipeline:
    """``pipeline`` with ``check_pixels`` run on each frame before its preprocessing: the
    decode path applies it frame by frame, before any model sees the tensor."""
    return Pipeline(pipeline.name, pipeline.size, partial(_checked_preprocess, manifest, pipeline.fn))


def route_checked(
    header: ImageHeader, manifests: Sequence[ModelManifest], body_part_aliases: Mapping[str, str] | None = None
) -> ModelManifest:
    """Input QA (``models.qa.route``) then ``check_header_facts`` for the chosen model.

    When no model accepts the image but a model reads the modality its header claims, that
    model's header-fact check runs first: an ultrasound file relabelled ``CR`` is reported as
    "stored as an ultrasound image", not as an unsupported colour encoding.
    """
    try:
        manifest = route(header, manifests, body_part_aliases=body_part_aliases)
    except UnsupportedStudy:
        claimed = normalise(header.modality)
        for candidate in manifests:
            if claimed in {normalise(m) for m in candidate.accepts.modality}:
                check_header_facts(candidate, header)
        raise
    check_header_facts(manifest, header)
    return manifest
