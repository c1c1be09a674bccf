"""Write synthetic images as valid DICOM Part 10 files in a chosen transfer syntax.

Identifiers are synthetic and deterministic (``SYNTH^…`` names, UIDs derived from the seed and
index), so the same seed gives the same study UIDs. No real patient data is ever written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import cv2
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

CR_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.1"
DX_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.1.1"
VL_ENDOSCOPIC_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.77.1.1"
VIDEO_ENDOSCOPIC_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.77.1.1.1"
SC_IMAGE_STORAGE: Final = "1.2.840.10008.5.1.4.1.1.7"

#: name -> transfer syntax for ``write_image(encoding=...)``.
ENCODINGS: Final[dict[str, UID]] = {
    "explicit": ExplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "rle": RLELossless,
    "j2k": JPEG2000Lossless,
    "j2k-lossy": JPEG2000,
    "jpeg": JPEGBaseline8Bit,
}
_ROOT: Final = "1.2.826.0.1.3680043.8.498."  # pydicom's UID root, used for synthetic data


def synthetic_uid(*parts: object) -> UID:
    """A deterministic UID for synthetic data."""
    return generate_uid(prefix=_ROOT, entropy_srcs=[str(p) for p in parts])


@dataclass(frozen=True)
class DicomSpec:
    """Header choices for one synthetic image."""

    modality: str
    body_part: str
    view_position: str
    photometric: str
    bits_stored: int
    rescale: bool
    window: bool
    patient_index: int
    seed: int
    series_description: str
    sop_class_uid: str = ""
    study_key: str = ""  # images sharing a study_key share a study


def base_dataset(spec: DicomSpec, sop_class_uid: str, instance: int = 1) -> Dataset:
    study_key = spec.study_key or f"{spec.seed}-{spec.patient_index}"
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = synthetic_uid("sop", study_key, spec.modality, instance)
    ds.StudyInstanceUID = synthetic_uid("study", study_key)
    ds.SeriesInstanceUID = synthetic_uid("series", study_key, spec.modality)
    ds.PatientName = f"SYNTH^{spec.modality}{spec.seed}X{spec.patient_index:06d}"
    ds.PatientID = f"SYN{spec.seed}-{spec.patient_index:06d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.AccessionNumber = f"ACC{spec.seed}{spec.patient_index:06d}"[:16]
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.StudyID = f"{spec.patient_index}"
    ds.ReferringPhysicianName = ""
    ds.Modality = spec.modality
    ds.Manufacturer = "dxassist synthetic phantom"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.SeriesDescription = spec.series_description
    ds.BurnedInAnnotation = "NO"
    if spec.body_part:
        ds.BodyPartExamined = spec.body_part
    if spec.view_position:
        ds.ViewPosition = spec.view_position
    return ds


def _finish(ds: Dataset, path: Path, transfer_syntax: UID) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _encode(ds: Dataset, arr: NDArray[Any], encoding: str) -> UID:
    """Store ``arr`` as Pixel Data in ``encoding``; returns the transfer syntax used."""
    ts = ENCODINGS[encoding]
    if encoding in ("explicit", "deflate"):
        ds.PixelData = np.ascontiguousarray(arr).tobytes()
        return ts
    if encoding == "jpeg":
        if arr.dtype != np.uint8:
            raise ValueError("jpeg encoding needs 8-bit data")
        frames = arr if arr.ndim == 4 or (arr.ndim == 3 and ds.SamplesPerPixel == 1) else arr[np.newaxis]
        encoded = []
        for frame in frames:
            bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR) if frame.ndim == 3 else frame
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 92])
            if not ok:
                raise ValueError("JPEG encoding failed")
            encoded.append(buf.tobytes())
        ds.PixelData = encapsulate(encoded)
        if ds.SamplesPerPixel == 3:
            ds.PhotometricInterpretation = "YBR_FULL_422"
        ds["PixelData"].VR = "OB"
        ds.LossyImageCompression = "01"
        return ts
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    if encoding == "j2k-lossy":
        ds.LossyImageCompression = "01"
        ds.compress(ts, arr=arr, j2k_psnr=[80.0])
    else:
        ds.compress(ts, arr=arr)
    return ts


def write_image(
    path: Path,
    image: NDArray[np.float32],
    spec: DicomSpec,
    rng: np.random.Generator,
    *,
    encoding: str = "explicit",
) -> Dataset:
    """Write a grayscale radiograph: ``image`` in [0, 1], bright = dense.

    Applies exposure gain/offset and quantum noise, stores in ``spec.bits_stored`` bits as
    MONOCHROME1 or MONOCHROME2, with optional rescale and window attributes consistent with
    the stored range.
    """
    sop_class = spec.sop_class_uid or (DX_IMAGE_STORAGE if spec.modality == "DX" else CR_IMAGE_STORAGE)
    ds = base_dataset(spec, sop_class)
    max_value = 2**spec.bits_stored - 1
    gain = rng.uniform(0.75, 0.95)
    offset = rng.uniform(0.02, 0.08)
    signal = offset + gain * image
    signal = signal + rng.normal(0.0, 0.006, size=image.shape) * np.sqrt(np.clip(signal, 0.05, None))
    signal = np.clip(signal, 0.0, 1.0)
    if spec.photometric == "MONOCHROME1":
        signal = 1.0 - signal
    stored = np.round(signal * max_value).astype(np.uint16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = spec.photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.ImagerPixelSpacing = [0.35, 0.35]
    slope, intercept = (0.5, 100.0) if spec.rescale else (1.0, 0.0)
    if spec.rescale:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "US"
    if spec.window:
        low = (np.percentile(stored, 0.5) * slope) + intercept
        high = (np.percentile(stored, 99.5) * slope) + intercept
        ds.WindowCenter = round(float((low + high) / 2), 1)
        ds.WindowWidth = round(float(max(high - low, 2.0)), 1)
    ts = _encode(ds, stored, encoding)
    _finish(ds, path, ts)
    return ds
