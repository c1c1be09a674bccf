"""Secondary Capture with the AI heatmap, for viewers that cannot show SR.

The overlay is drawn on the model's own input (what the model saw: letterboxed 224 px radiograph,
or the 256 px endoscopy frame) with the class-activation map or the polyp mask of the highest
positive finding, and a burned-in banner that says it is AI output, not for diagnosis. It lives
in the same study (highdicom ``SCImage.from_ref_dataset``), with UIDs derived from the result.
"""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from models.errors import InferenceFailed
from models.manifest import LoadedManifest
from models.results import ScreeningResult
from serving.core.screening import ModelOutputs, PreparedImage
from serving.dicom.sr import result_uid

BANNER = "AI OVERLAY - PRELIMINARY - NOT FOR DIAGNOSIS"


def render_overlay(image: NDArray[np.float32], heat: NDArray[np.float32] | None, caption: str) -> NDArray[np.uint8]:
    """``image``: the model input ``(1|3, H, W)`` in [0, 1]; ``heat``: a map in [any range] or None.

    Returns an RGB ``(H', W', 3)`` uint8 picture (at least 512 px) with the heat in red/yellow."""
    rgb = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
    base = np.ascontiguousarray((np.clip(rgb.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8))
    size = max(512, base.shape[0])
    base = np.asarray(cv2.resize(base, (size, size), interpolation=cv2.INTER_LINEAR), dtype=np.uint8)
    if heat is not None and heat.size and float(heat.max() - heat.min()) > 1e-6:
        h = (heat - heat.min()) / (heat.max() - heat.min())
        h = cv2.resize(h.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
        colour = cv2.applyColorMap((h * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
        alpha = (0.45 * (h >= 0.5))[..., None]
        base = (base * (1 - alpha) + colour * alpha).astype(np.uint8)
    cv2.rectangle(base, (0, 0), (size, 24), (0, 0, 0), thickness=-1)
    cv2.putText(base, BANNER, (6, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1, cv2.LINE_AA)
    cv2.putText(base, caption[:60], (6, size - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 0), 1, cv2.LINE_AA)
    return base


def build_sc(result: ScreeningResult, evidence: Dataset, overlay: NDArray[np.uint8]) -> Dataset:
    """A Secondary Capture of ``overlay`` in the study of ``evidence`` (the screened image's header)."""
    orientation = [str(v) for v in (evidence.get("PatientOrientation") or [])]
    if len(orientation) != 2:
        orientation = ["L", "F"]  # the source has none: the frontal-radiograph convention
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=evidence,
        patient_orientation=(orientation[0], orientation[1]),
        pixel_array=overlay,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=result_uid(result, "sc-series"),
        series_number=991,
        sop_instance_uid=result_uid(result, "sc-sop"),
        instance_number=1,
        manufacturer="dxassist",
        series_description="dxassist AI overlay (preliminary)",
    )
    sc.Laterality = evidence.get("Laterality", "")  # Type 2C in General Series: present, may be empty
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = "AI-generated overlay, preliminary, not for diagnosis"
    return sc


SC_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"


def is_own_overlay(ds: Dataset) -> bool:
    return str(ds.get("SOPClassUID", "")) == SC_SOP_CLASS and str(ds.get("Manufacturer", "")) == "dxassist"


def overlay_for(
    result: ScreeningResult,
    paired: list[tuple[PreparedImage, ModelOutputs | InferenceFailed]],
    loaded: dict[str, LoadedManifest],
) -> Dataset | None:
    """The SC of the strongest positive finding (None when nothing is positive or no map exists)."""
    positives = [f for f in result.findings if f.positive]
    if not positives:
        return None
    top = max(positives, key=lambda f: f.score)
    keys = [label.key for label in loaded[top.model_id].manifest.labels]
    li = keys.index(top.key)
    best: tuple[float, PreparedImage, ModelOutputs, int] | None = None
    for image, out in paired:
        if (
            not isinstance(out, ModelOutputs)
            or out.maps is None
            or image.header is None
            or image.model_id != top.model_id
        ):
            continue
        fi = int(out.scores[:, li].argmax())
        if best is None or out.scores[fi, li] > best[0]:
            best = (float(out.scores[fi, li]), image, out, fi)
    if best is None or len(best[1].tensors) <= best[3]:
        return None
    _, image, out, fi = best
    assert out.maps is not None and image.header is not None
    heat = out.maps[fi, li] if out.maps.ndim == 4 else out.maps[fi]
    caption = f"{top.display} {top.score:.2f} ({top.model_id}@{top.model_version})"
    return build_sc(result, image.header, render_overlay(image.tensors[fi], heat, caption))
