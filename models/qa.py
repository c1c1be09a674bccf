"""Input QA and routing: which model (if any) may look at an image, decided from its header.

Runs before any pixel is decoded and before any model runs. An image that no model accepts
raises ``UnsupportedStudy`` with the reason of the model that came closest (a lower-leg CR is
``UNSUPPORTED_BODY_PART`` for the chest model, not ``UNSUPPORTED_MODALITY`` for the endoscopy
model), so the radiologist sees the most useful explanation.

Header values are compared case-insensitively with spaces normalised ('cr' is CR), and
``BodyPartExamined`` is tolerant of real-world values: missing is accepted (the content check
and the out-of-distribution gate look at the pixels anyway) and local spellings map to DICOM
defined terms through an alias table a site can extend (``THORAX``, ``TORAX``: ``CHEST``).

Reason details never quote a header value verbatim: a value is named only when it is a known
DICOM defined term; anything else is "an unrecognised value" (a corrupt Modality once carried
a patient's name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Final

from models.errors import ReasonCode, UnsupportedStudy
from models.manifest import ModelManifest
from models.pixels import ImageHeader

#: local spellings -> DICOM defined term (PS3.16 Annex L); a site passes its own additions
DEFAULT_BODY_PART_ALIASES: Final[Mapping[str, str]] = {
    "THORAX": "CHEST",
    "TORAX": "CHEST",
    "TÓRAX": "CHEST",
    "THORACIC": "CHEST",
    "LUNG": "CHEST",
    "LUNGS": "CHEST",
    "CHEST PA": "CHEST",
    "CHEST AP": "CHEST",
    "THORAX PA": "CHEST",
    "THORAX AP": "CHEST",
    "BRUST": "CHEST",
    "BRUSTKORB": "CHEST",
    "POITRINE": "CHEST",
    "PECHO": "CHEST",
    "TORACE": "CHEST",
    "BORST": "CHEST",
    "BRYST": "CHEST",
    "BRÖST": "CHEST",
    "KLATKA PIERSIOWA": "CHEST",
}

#: values that may appear in a reason detail (DICOM defined terms: not patient data)
_MODALITIES: Final = frozenset(
    "AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN "
    "LS MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE "
    "RTPLAN RTRECORD RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XC".split()
)
_BODY_PARTS: Final = frozenset(
    {
        "ABDOMEN", "ANKLE", "ARM", "BREAST", "BRAIN", "CHEST", "CLAVICLE", "COCCYX", "COLON", "CSPINE",
        "ELBOW", "EXTREMITY", "FACE", "FINGER", "FOOT", "FOREARM", "HAND", "HEAD", "HEART", "HEEL", "HIP",
        "HUMERUS", "JAW", "KIDNEY", "KNEE", "LEG", "LIVER", "LSPINE", "LUNG", "NECK", "PELVIS", "RIB",
        "SACRUM", "SHOULDER", "SKULL", "SPINE", "SSPINE", "STOMACH", "THORAX", "THIGH", "TOE", "TSPINE",
        "WHOLEBODY", "WHOLE BODY", "WRIST", "ABDOMENPELVIS", "CHESTABDOMEN", "ESOPHAGUS", "RECTUM", "DUODENUM",
    }
)  # fmt: skip
_VIEWS: Final = frozenset(
    {"AP", "PA", "LL", "RL", "LLD", "RLD", "RLO", "LLO", "LAT", "LATERAL", "OBL", "OBLIQUE", "CC", "MLO", "ML", "LM"}
)
_PHOTOMETRIC: Final = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_RCT",
        "YBR_ICT",
        "PALETTE COLOR",
        "YBR_PARTIAL_420",
    }
)


def normalise(value: str) -> str:
    """Upper-case with runs of spaces/underscores collapsed: how header values are compared."""
    return " ".join(value.replace("_", " ").split()).upper()


def _shown(value: str, known: frozenset[str]) -> str:
    """A header value for a reason detail: only a known defined term is named."""
    norm = normalise(value)
    if not norm:
        return "(missing)"
    candidates = {norm, norm.replace(" ", "_")}
    hit = next((c for c in candidates if c in known), None)
    return repr(hit) if hit else "an unrecognised value"


def _norm_set(values: Iterable[str]) -> set[str]:
    return {normalise(v) for v in values}


def _aliases(extra: Mapping[str, str] | None) -> dict[str, str]:
    table = {normalise(k): normalise(v) for k, v in DEFAULT_BODY_PART_ALIASES.items()}
    if extra:
        table.update({normalise(k): normalise(v) for k, v in extra.items()})
    return table


def canonical_body_part(value: str, aliases: Mapping[str, str] | None = None) -> str:
    """The DICOM defined term a (local) BodyPartExamined spelling stands for."""
    norm = normalise(value)
    return _aliases(aliases).get(norm, norm)


def check_accepts(
    manifest: ModelManifest, header: ImageHeader, *, body_part_aliases: Mapping[str, str] | None = None
) -> None:
    """Raise ``UnsupportedStudy`` unless ``manifest.accepts`` admits this image.

    Checks, in order: SOP class, modality, photometric interpretation and samples per pixel,
    body part (aliases applied; missing accepted), view position, minimum size.
    """
    acc = manifest.accepts
    ref = manifest.ref
    if acc.sop_class_uid and header.sop_class_uid.strip() not in acc.sop_class_uid:
        raise UnsupportedStudy(ReasonCode.UNSUPPORTED_SOP_CLASS, f"SOP class not accepted by {ref}")
    if normalise(header.modality) not in _norm_set(acc.modality):
        raise UnsupportedStudy(
            ReasonCode.UNSUPPORTED_MODALITY,
            f"modality {_shown(header.modality, _MODALITIES)} not accepted by {ref} (accepts {', '.join(acc.modality)})",
        )
    if (
        normalise(header.photometric_interpretation) not in _norm_set(acc.photometric_interpretation)
        or header.samples_per_pixel != acc.samples_per_pixel
    ):
        raise UnsupportedStudy(
            ReasonCode.UNSUPPORTED_PHOTOMETRIC,
            f"photometric interpretation {_shown(header.photometric_interpretation, _PHOTOMETRIC)} with "
            f"{header.samples_per_pixel} sample(s) per pixel not accepted by {ref}",
        )
    if acc.body_part_examined and normalise(header.body_part_examined):
        table = _aliases(body_part_aliases)
        accepted = {table.get(p, p) for p in _norm_set(acc.body_part_examined)}
        if canonical_body_part(header.body_part_examined, body_part_aliases) not in accepted:
            raise UnsupportedStudy(
                ReasonCode.UNSUPPORTED_BODY_PART,
                f"body part {_shown(header.body_part_examined, _BODY_PARTS)} not accepted by {ref} "
                f"(accepts {', '.join(p for p in acc.body_part_examined if p)}, their local spellings, or none)",
            )
    if acc.view_position and normalise(header.view_position) not in _norm_set(acc.view_position):
        raise UnsupportedStudy(
            ReasonCode.UNSUPPORTED_VIEW,
            f"view position {_shown(header.view_position, _VIEWS)} not accepted by {ref} "
            f"(accepts {', '.join(v or '(missing)' for v in acc.view_position)})",
        )
    if min(header.rows, header.columns) < acc.min_side:
        raise UnsupportedStudy(
            ReasonCode.IMAGE_TOO_SMALL,
            f"image is {min(header.rows, header.columns)} pixels on its short side, below {acc.min_side} for {ref}",
        )


_DEPTH = {
    ReasonCode.UNSUPPORTED_SOP_CLASS: 0,
    ReasonCode.UNSUPPORTED_MODALITY: 1,
    ReasonCode.UNSUPPORTED_PHOTOMETRIC: 2,
    ReasonCode.UNSUPPORTED_BODY_PART: 3,
    ReasonCode.UNSUPPORTED_VIEW: 4,
    ReasonCode.IMAGE_TOO_SMALL: 5,
}


def route(
    header: ImageHeader,
    manifests: Sequence[ModelManifest],
    *,
    body_part_aliases: Mapping[str, str] | None = None,
) -> ModelManifest:
    """The first model that accepts the image; otherwise the closest model's rejection.

    ``body_part_aliases`` adds a site's local BodyPartExamined spellings to the defaults
    (``{"BRUSTKORB": "CHEST"}``).

    Raises:
        UnsupportedStudy: no model accepts the image (or no model is configured).
    """
    if not manifests:
        raise UnsupportedStudy(ReasonCode.UNSUPPORTED_MODALITY, "no model is configured")
    closest: UnsupportedStudy | None = None
    for manifest in manifests:
        try:
            check_accepts(manifest, header, body_part_aliases=body_part_aliases)
        except UnsupportedStudy as exc:
            if closest is None or _DEPTH.get(exc.reason, 0) > _DEPTH.get(closest.reason, 0):
                closest = exc
            continue
        return manifest
    assert closest is not None
    raise closest
