"""De-identification of DICOM instances for export (PS3.15 Annex E, Basic Application Level
Confidentiality Profile), with ``dicognito`` for the pseudonyms (ADR 0018).

Two passes over each instance:

1. ``dicognito.Anonymizer`` replaces every person name, identifier, UID, address and equipment
   identity it knows with a pseudonym that is consistent within one export (one patient, one
   study, one series keep one pseudonym each, so a patient's studies stay linked and UIDs stay
   consistent between instances), and shifts every date and time by one offset per export.
2. An allow-list: only the attributes below survive (the image and its geometry, what the
   models' QA reads, the pseudonymous identifiers and, with the options, dates and patient
   characteristics). Everything else goes, whatever it is called: descriptions, comments,
   private tags, overlays, curves, sequences, anything a site or a modality added. The profile's
   removal lists are a deny-list; an allow-list cannot miss an attribute nobody listed.

Options (``export.*``): retain longitudinal dates (shifted) or remove them; retain patient
characteristics (sex, age, size, weight); clean pixel data (blank configured regions, for text
burned in by modalities); images flagged BurnedInAnnotation YES are refused unless regions
are configured. The result carries PatientIdentityRemoved YES and a DeidentificationMethod
(Code)Sequence naming the profile and its options (CID 7050).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from dicognito.anonymizer import Anonymizer
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from models.errors import InputRejected, ReasonCode
from serving.settings import ExportSettings, PixelRegion

#: attributes an exported instance keeps (after dicognito replaced the identifying ones)
KEEP_ALWAYS = frozenset(
    {
        # identity: pseudonyms only (names and free text never survive)
        "PatientID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "FrameOfReferenceUID",
        "InstanceNumber",
        "SeriesNumber",
        # what the image is (the models' QA and routing read these)
        "Modality",
        "BodyPartExamined",
        "ViewPosition",
        "Laterality",
        "ImageLaterality",
        "PatientOrientation",
        "ImageType",
        "PresentationIntentType",
        # the image pixel module and its geometry
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PlanarConfiguration",
        "Rows",
        "Columns",
        "NumberOfFrames",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
        "PixelSpacing",
        "ImagerPixelSpacing",
        "PixelAspectRatio",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
        "BurnedInAnnotation",
        "SpecificCharacterSet",
    }
)
DATES = frozenset(
    {
        "StudyDate",
        "SeriesDate",
        "AcquisitionDate",
        "ContentDate",
        "StudyTime",
        "SeriesTime",
        "AcquisitionTime",
        "ContentTime",
    }
)
PATIENT_CHARACTERISTICS = frozenset({"PatientSex", "PatientAge", "PatientSize", "PatientWeight"})


@dataclass
class Deidentifier:
    """One export's de-identifier: one seed, so pseudonyms and the date offset are consistent
    across its instances. ``mapping`` collects (kind, original, pseudonym) for the private table."""

    settings: ExportSettings
    seed: str = field(default_factory=lambda: secrets.token_hex(16))
    mapping: list[tuple[str, str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.settings.seed is not None:
            self.seed = self.settings.seed.get_secret_value()
        self._anonymizer = Anonymizer(seed=self.seed)
        self._seen: set[tuple[str, str]] = set()

    def __call__(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds`` (uncompressed pixels, explicit VR little endian);
        ``InputRejected`` for an image with burned-in text and no regions to clean."""
        burned = str(ds.get("BurnedInAnnotation", "")).upper() == "YES"
        if burned and not self.settings.clean_pixels:
            raise InputRejected(
                ReasonCode.UNSUPPORTED_MODALITY, "burned-in annotation and no export.clean_pixels regions"
            )
        originals = {k: str(ds.get(k, "")) for k in ("PatientID", "StudyInstanceUID")}
        if "PixelData" in ds:
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()  # explicit VR little endian, photometric updated by pydicom
            if self.settings.clean_pixels:
                _blank(ds, self.settings.clean_pixels)
        self._anonymizer.anonymize(ds)
        out = Dataset()
        keep = set(KEEP_ALWAYS)
        if self.settings.retain_longitudinal_dates:
            keep |= DATES
        if self.settings.retain_patient_characteristics:
            keep |= PATIENT_CHARACTERISTICS
        for element in ds:
            if element.tag.is_private or element.keyword not in keep:
                continue
            if element.VR == "SQ":
                continue  # no sequence is kept: items can hold anything
            out.add(element)
        out.PatientName = ""  # type 2 in most IODs: present and empty
        out.PatientIdentityRemoved = "YES"
        methods = _method_codes(self.settings)
        out.DeidentificationMethod = [meaning for _, meaning in methods]  # LO, one value per option
        out.DeidentificationMethodCodeSequence = [_code(c, m) for c, m in methods]
        if self.settings.clean_pixels and burned:
            out.BurnedInAnnotation = "NO"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = out.SOPClassUID
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        out.file_meta = meta
        for kind, original in originals.items():
            pseudonym = str(out.get(kind, ""))
            if original and (kind, original) not in self._seen:
                self._seen.add((kind, original))
                self.mapping.append((kind, original, pseudonym))
        return out


def _method_codes(settings: ExportSettings) -> Sequence[tuple[str, str]]:
    codes = [("113100", "Basic Application Confidentiality Profile")]
    if settings.retain_longitudinal_dates:
        codes.append(("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
    if settings.retain_patient_characteristics:
        codes.append(("113108", "Retain Patient Characteristics Option"))
    if settings.clean_pixels:
        codes.append(("113101", "Clean Pixel Data Option"))
    return codes


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "DCM"
    item.CodeMeaning = meaning
    return item


def _blank(ds: Dataset, regions: Sequence[PixelRegion]) -> None:
    """Set each region of every frame to the frame's darkest value (text burned in is gone,
    not merely hidden by a presentation state)."""
    pixels = np.array(ds.pixel_array)  # (H, W[, 3]) or (F, H, W[, 3]); a writable copy
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    view = pixels if frames > 1 else pixels[np.newaxis]
    height, width = view.shape[1], view.shape[2]
    for region in regions:
        y0, y1 = int(region.y0 * height), max(int(region.y0 * height) + 1, int(np.ceil(region.y1 * height)))
        x0, x1 = int(region.x0 * width), max(int(region.x0 * width) + 1, int(np.ceil(region.x1 * width)))
        for frame in view:
            frame[y0:y1, x0:x1] = frame.min()
    ds.PixelData = pixels.tobytes()
