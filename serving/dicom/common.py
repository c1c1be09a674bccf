"""What the DICOM result objects (SR, GSPS, SC, SEG) share: deterministic UIDs, the coded
concepts they use, the Coding Scheme Identification of those concepts, and where a finding is on
its source image in pixel coordinates.

Every object's UIDs derive from the result and the object's purpose, so a retried delivery
stores the same instances again instead of adding new ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

from models.manifest import Code as ModelCode
from models.results import Finding, ScreeningResult

ROOT: Final = "1.2.826.0.1.3680043.8.498."
MANUFACTURER: Final = "dxassist"
#: what every result object says about itself (banner, GSPS text, Derivation Description)
PRELIMINARY: Final = "AI, preliminary"
NOT_FOR_DIAGNOSIS: Final = "AI OUTPUT - PRELIMINARY - NOT FOR DIAGNOSIS"

#: Coding schemes the objects use, for the Coding Scheme Identification Sequence (0008,0110)
_SCHEMES: Final[dict[str, tuple[str, str, str]]] = {
    # designator: (registry UID, name, responsible organization)
    "DCM": ("1.2.840.10008.2.16.4", "DICOM Controlled Terminology", "DICOM Standards Committee"),
    "SCT": ("2.16.840.1.113883.6.96", "SNOMED CT", "SNOMED International"),
    "UCUM": ("2.16.840.1.113883.6.8", "Unified Code for Units of Measure", "Regenstrief Institute"),
    "RADLEX": ("2.16.840.1.113883.6.256", "RadLex", "Radiological Society of North America"),
    "LN": ("2.16.840.1.113883.6.1", "LOINC", "Regenstrief Institute"),
    "UMLS": ("2.16.840.1.113883.6.86", "Unified Medical Language System", "National Library of Medicine"),
}

PRESENT: Final = hd.sr.CodedConcept(value="52101004", scheme_designator="SCT", meaning="Present")
ABSENT: Final = hd.sr.CodedConcept(value="2667000", scheme_designator="SCT", meaning="Absent")
PERCENT: Final = hd.sr.CodedConcept(value="%", scheme_designator="UCUM", meaning="percent")
THRESHOLD: Final = hd.sr.CodedConcept(value="122411", scheme_designator="DCM", meaning="Threshold Value")
PROBABILITY: Final = hd.sr.CodedConcept(value="122157", scheme_designator="DCM", meaning="Probability")


def concept(code: ModelCode) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme.value, meaning=code.meaning)


def result_uid(result: ScreeningResult, purpose: str) -> UID:
    """Deterministic UID for this result and purpose (same result -> same UIDs -> no duplicate)."""
    digest = hashlib.sha256(
        "|".join(
            [purpose, result.study_instance_uid, *result.models, *(f"{f.key}={f.score}" for f in result.findings)]
        ).encode()
    ).hexdigest()
    return generate_uid(prefix=ROOT, entropy_srcs=[digest])


def declare_schemes(ds: Dataset, designators: Iterable[str]) -> None:
    """Fill the Coding Scheme Identification Sequence for every scheme the object uses.

    A designator outside the known list (a site's private ``99...`` scheme) is declared by its
    designator alone, which is what the standard asks for private schemes."""
    items = []
    for designator in sorted(set(designators)):
        item = Dataset()
        item.CodingSchemeDesignator = designator
        if designator in _SCHEMES:
            uid, name, org = _SCHEMES[designator]
            item.CodingSchemeRegistry = "HL7"
            item.CodingSchemeUID = uid
            item.CodingSchemeName = name
            item.CodingSchemeResponsibleOrganization = org
        else:
            item.CodingSchemeName = f"{designator} (private to this site)"
            item.CodingSchemeResponsibleOrganization = MANUFACTURER
        items.append(item)
    ds.CodingSchemeIdentificationSequence = items


def schemes_in(ds: Dataset) -> set[str]:
    """Every Coding Scheme Designator used anywhere in ``ds``."""
    found: set[str] = set()

    def walk(d: Dataset) -> None:
        for element in d:
            if element.keyword == "CodingSchemeIdentificationSequence":
                continue
            if element.VR == "SQ":
                for item in element.value:
                    walk(item)
            elif element.keyword == "CodingSchemeDesignator" and element.value:
                found.add(str(element.value))

    walk(ds)
    return found


def copy_laterality(source: Dataset, target: Dataset) -> None:
    """General Series Laterality (Type 2C) of a derived object: the source's, with its Body Part
    Examined so validators can tell an unpaired part (chest) from a paired one."""
    if source.get("BodyPartExamined"):
        target.BodyPartExamined = source.BodyPartExamined
    laterality = source.get("Laterality") or source.get("ImageLaterality")
    if laterality in ("L", "R"):
        target.Laterality = laterality
    elif "Laterality" in target and not target.Laterality:
        del target.Laterality


def with_plain_names(ds: Dataset) -> Dataset:
    """A shallow copy whose one-component person names end with ``^`` (the same name in DICOM's
    PN rules): highdicom otherwise warns about them, and its warning quotes the name (PHI)."""
    copy = Dataset()
    copy.update({element.tag: element for element in ds})  # new element map, same (unchanged) elements
    if hasattr(ds, "file_meta"):
        copy.file_meta = ds.file_meta
    for keyword in ("PatientName", "ReferringPhysicianName"):
        value = str(ds.get(keyword, "") or "")
        if value and "^" not in value and "=" not in value:
            delattr(copy, keyword)  # drop the shared element: the source keeps its own
            setattr(copy, keyword, value + "^")
    return copy


def is_grayscale(ds: Dataset) -> bool:
    return str(ds.get("PhotometricInterpretation", "")) in ("MONOCHROME1", "MONOCHROME2")


@dataclass(frozen=True)
class PlacedFinding:
    """A positive finding with a region, on the source image it came from.

    ``box`` is ``(x0, y0, x1, y1)`` in DICOM image-relative pixel coordinates (the top-left corner
    of the top-left pixel is 0,0; the bottom-right corner of the image is Columns,Rows);
    ``frame_number`` is 1-based, set for multi-frame images only."""

    finding: Finding
    image: Dataset
    box: tuple[float, float, float, float]
    frame_number: int | None

    def polyline(self) -> list[tuple[float, float]]:
        """The box as a closed polyline (first point repeated)."""
        x0, y0, x1, y1 = self.box
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]

    @property
    def caption(self) -> str:
        return f"{PRELIMINARY}: {self.finding.display} {self.finding.score:.2f}"


def source_image(finding: Finding, images: Sequence[Dataset]) -> Dataset | None:
    """The evidence image a finding was scored on (the first image when the finding does not say)."""
    uid = finding.sop_instance_uid
    if uid:
        for image in images:
            if str(image.get("SOPInstanceUID", "")) == uid:
                return image
    return images[0] if images else None


def place(finding: Finding, images: Sequence[Dataset]) -> PlacedFinding | None:
    """Where a positive finding is on its source image; None without a region or an image."""
    if not finding.positive or finding.region is None:
        return None
    image = source_image(finding, images)
    if image is None or "Rows" not in image or "Columns" not in image:
        return None
    rows, cols = int(image.Rows), int(image.Columns)
    r = finding.region
    x0, y0 = r.x * cols, r.y * rows
    x1, y1 = min((r.x + r.width) * cols, cols), min((r.y + r.height) * rows, rows)
    if x1 - x0 < 1 or y1 - y0 < 1:
        return None
    frames = int(image.get("NumberOfFrames", 1) or 1)
    frame = (finding.frame_index or 0) + 1 if frames > 1 else None
    return PlacedFinding(finding, image, (round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)), frame)


def placed_findings(result: ScreeningResult, images: Sequence[Dataset]) -> list[PlacedFinding]:
    """Every positive finding of ``result`` that has a region, strongest first."""
    placed = [place(f, images) for f in sorted(result.positive_findings, key=lambda f: -f.score)]
    return [p for p in placed if p is not None]
