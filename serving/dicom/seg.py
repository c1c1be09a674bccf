"""DICOM Segmentation (binary SEG) of the endoscopy polyp masks, with highdicom.

Built when the study is screened, since the masks exist only then: for each screened image whose
model outputs masks and whose finding is positive, the mask of every screened frame (model input
size, resized back 1:1 to the frame: the endoscopy preprocessing is a plain resize) is
thresholded at 0.5 and stored as one segment per positive label, referencing the source image
and frames. Frames without foreground are left out. UIDs derive from the result.

A multi-frame image without a Frame of Reference (endoscopy video) gets no SEG: highdicom 0.28
segments such a source only when it has one frame. Its regions still reach the SR (a box on the
best frame) and the GSPS/SC do not apply to colour video.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from models.errors import InferenceFailed
from models.manifest import LoadedManifest, OutputRoleValues
from models.results import ScreeningResult
from serving.core.screening import ModelOutputs, PreparedImage
from serving.dicom.common import MANUFACTURER, concept, copy_laterality, declare_schemes, result_uid, schemes_in


def _frame_masks(image: PreparedImage, out: ModelOutputs, label: int, rows: int, cols: int) -> np.ndarray:
    """(source frames, rows, cols) uint8 masks; frames that were not screened stay empty."""
    frames = int(image.header.get("NumberOfFrames", 1) or 1) if image.header is not None else 1
    masks = np.zeros((frames, rows, cols), dtype=np.uint8)
    assert out.maps is not None
    for row, frame_index in enumerate(image.frame_indices):
        prob = out.maps[row, label] if out.maps.ndim == 4 else out.maps[row]
        full = cv2.resize(prob.astype(np.float32), (cols, rows), interpolation=cv2.INTER_LINEAR)
        masks[min(frame_index, frames - 1)] = (full >= 0.5).astype(np.uint8)
    return masks


def build_seg(
    result: ScreeningResult,
    paired: Sequence[tuple[PreparedImage, ModelOutputs | InferenceFailed]],
    loaded: dict[str, LoadedManifest],
) -> list[Dataset]:
    """One SEG per screened image with a positive masked finding (empty list otherwise)."""
    positive = {(f.model_id, f.key) for f in result.positive_findings}
    out: list[Dataset] = []
    for n, (image, outputs) in enumerate(paired, start=1):
        if (
            not isinstance(outputs, ModelOutputs)
            or outputs.maps is None
            or outputs.map_role != OutputRoleValues.MASK
            or image.header is None
        ):
            continue
        manifest = loaded[image.model_id].manifest
        header = image.header
        if int(header.get("NumberOfFrames", 1) or 1) > 1 and "FrameOfReferenceUID" not in header:
            continue
        rows, cols = int(header.Rows), int(header.Columns)
        segments: list[hd.seg.SegmentDescription] = []
        arrays: list[np.ndarray] = []
        for li, label in enumerate(manifest.labels):
            if (manifest.id, label.key) not in positive:
                continue
            masks = _frame_masks(image, outputs, li, rows, cols)
            if not masks.any():
                continue
            arrays.append(masks)
            segments.append(
                hd.seg.SegmentDescription(
                    segment_number=len(segments) + 1,
                    segment_label=label.display[:64],
                    segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                    segmented_property_type=concept(label.code),
                    algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                    algorithm_identification=hd.AlgorithmIdentificationSequence(
                        name=manifest.id, family=codes.cid7162.ArtificialIntelligence, version=manifest.version
                    ),
                    anatomic_regions=[concept(label.body_site)],
                )
            )
        if not segments:
            continue
        pixel_array = np.stack(arrays, axis=-1)  # (frames, rows, cols, segments)
        seg = hd.seg.Segmentation(
            source_images=[header],
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=result_uid(result, "seg-series"),
            series_number=993,
            sop_instance_uid=result_uid(result, f"seg-{n}"),
            instance_number=n,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=f"{manifest.id}@{manifest.version}"[:64],
            software_versions=manifest.version,
            device_serial_number="0",
            content_label="DXASSIST_AI",
            content_description="AI segmentation, preliminary, not for diagnosis",
            series_description="dxassist AI segmentation (preliminary)",
        )
        copy_laterality(header, seg)
        if "PatientOrientation" not in seg:  # Type 2C for images without a patient coordinate system
            seg.PatientOrientation = header.get("PatientOrientation", "")
        declare_schemes(seg, schemes_in(seg))
        out.append(seg)
    return out
