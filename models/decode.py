"""The decode boundary: one untrusted DICOM instance in, model inputs or a typed rejection out.

``prepare_instance`` is the only place where bytes from outside meet pydicom, the codecs,
numpy and the preprocessing pipelines. Inside it:

1. the file is read within ``models.limits`` (size, bounded inflate, sequence items, depth,
   parse time);
2. every header element is converted at once (pydicom defers conversion to first access; a
   malformed element would otherwise raise later, anywhere) and the evidence header kept for
   the SR/SC is a plain copy without pixel data, bulk or private elements, or deferred readers;
3. ``header_of`` validates the technical attributes once; the planner routes (input QA) and
   picks frames; the memory estimate is checked before any pixel is decoded;
4. frames are decoded one at a time and preprocessed straight away, so only the model-sized
   tensors leave (the full-size frame never crosses a process boundary).

Every failure, whatever its type (pydicom, numpy, Pillow, the pylibjpeg codecs, a Rust
``PanicException``, ``MemoryError``, ``RecursionError``), becomes a ``DecodeRejection`` with a
``ReasonCode``. ``models.decode_pool`` runs this function in replaceable worker processes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Final

import numpy as np
from numpy.typing import NDArray
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence

from models.content import content_checked, route_checked
from models.errors import InputRejected, InvalidDicom, ReasonCode
from models.limits import DEFAULT_LIMITS, DecodeLimits, ParseLimitExceeded, parse_guard
from models.manifest import ModelManifest
from models.pixels import ImageHeader, header_of, iter_frames, read_dataset
from models.preprocessing import Pipeline, get_pipeline
from models.results import StudyIdentity

Source = str | os.PathLike[str] | bytes | BinaryIO

#: Value representations of bulk data: kept out of the evidence header above ``_BULK_BYTES``.
_BULK_VRS: Final = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_BULK_BYTES: Final = 4096
_PIXEL_TAGS: Final = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})

#: ``DecodeRejection.fault`` values: failures the limits should have refused earlier. The
#: fuzz suite requires zero of each; the service reports them like any rejection.
FAULT_MEMORY: Final = "memory"
FAULT_RECURSION: Final = "recursion"
FAULT_UNEXPECTED: Final = "unexpected"
FAULT_TIMEOUT: Final = "timeout"
FAULT_WORKER_DIED: Final = "worker-died"


@dataclass(frozen=True, slots=True)
class FramePlan:
    """Which model looks at an image, with which preprocessing, and which frames."""

    model_id: str
    pipeline: Pipeline
    frame_indices: list[int]


Planner = Callable[[ImageHeader], FramePlan]


def sample_frames(n: int, limit: int) -> list[int]:
    """At most ``limit`` frame indices spread evenly over ``n`` frames (first and last kept)."""
    if n <= limit:
        return list(range(n))
    return sorted({round(i * (n - 1) / (limit - 1)) for i in range(limit)})


@dataclass(frozen=True, slots=True)
class RoutePlanner:
    """Input QA (``models.qa.route``), the content check (``models.content``) then the routed
    model's preprocessing. Picklable: it travels to decode workers with each job."""

    manifests: tuple[ModelManifest, ...]
    max_frames: int = 32
    #: a site's local BodyPartExamined spellings, (spelling, defined term) pairs
    body_part_aliases: tuple[tuple[str, str], ...] = ()

    def __call__(self, header: ImageHeader) -> FramePlan:
        # input QA and the header-fact content check now, each frame's pixels below
        manifest = route_checked(header, self.manifests, dict(self.body_part_aliases))
        pipeline = content_checked(manifest, get_pipeline(manifest.input.preprocessing))
        return FramePlan(manifest.id, pipeline, sample_frames(header.number_of_frames, self.max_frames))


@dataclass(slots=True)
class DecodedInstance:
    """An instance that passed QA and decoded: model inputs and what maps results back."""

    study_instance_uid: str
    sop_instance_uid: str
    model_id: str
    tensors: NDArray[np.float32]  # (frames, C, H, W)
    frame_indices: list[int]
    image_shape: tuple[int, int]  # rows, columns of the decoded frame
    header: ImageHeader
    evidence: Dataset  # eager header copy, no pixels, bulk, private elements or deferred reads
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class DecodeRejection:
    """An instance that is not screened. ``fault`` is empty for an ordinary rejection and names
    the kind (``FAULT_*``) when a limit or the process isolation had to step in."""

    study_instance_uid: str
    sop_instance_uid: str
    reason: ReasonCode
    detail: str
    fault: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    #: who the study is, when the header was readable (a NOT_SCREENED result still goes to the EMR)
    identity: StudyIdentity | None = None


DecodeOutcome = DecodedInstance | DecodeRejection


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return "" if value is None else str(value).strip()


def _clean_copy(ds: Dataset, depth: int, limits: DecodeLimits) -> Dataset:
    """A plain copy of ``ds`` with every element converted now (deferred conversions happen
    here, inside the boundary) minus pixel data, bulk and private elements."""
    if depth > limits.max_sequence_depth:
        raise ParseLimitExceeded(f"sequences nested deeper than {limits.max_sequence_depth}")
    out = Dataset()
    for tag in list(ds.keys()):
        if tag.is_private or int(tag) in _PIXEL_TAGS:
            continue
        elem = ds[tag]  # converts a raw element: raises here on a malformed value
        if elem.VR in _BULK_VRS and elem.value is not None and len(elem.value) > _BULK_BYTES:
            continue
        if elem.VR == "SQ":
            items = DicomSequence([_clean_copy(item, depth + 1, limits) for item in elem.value or []])
            out.add(DataElement(tag, "SQ", items))
        else:
            out.add(DataElement(tag, elem.VR, elem.value))
    return out


def evidence_of(ds: Dataset, limits: DecodeLimits = DEFAULT_LIMITS) -> Dataset:
    """The header kept as SR/SC evidence: an eager copy (see ``_clean_copy``) with its file meta."""
    evidence = _clean_copy(ds, 0, limits)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        evidence.file_meta = FileMetaDataset(_clean_copy(meta, 0, limits))
        evidence.preamble = b"\x00" * 128  # stored and read back as a DICOM file (results database)
    implicit, little = ds.original_encoding
    evidence.set_original_encoding(implicit, little, ds.original_character_set)
    return evidence


def _pixel_data_bytes(ds: Dataset) -> int:
    """Length of the Pixel Data value without converting the element (a hostile VR would raise
    on conversion; the decode step converts it under its own handling)."""
    if 0x7FE00010 not in ds:
        return 0
    value = getattr(ds.get_item(0x7FE00010, keep_deferred=True), "value", None)
    return len(value) if isinstance(value, bytes | bytearray) else 0


def _is_fatal(exc: BaseException) -> bool:
    return isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit)


def _fault_of(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(exc, MemoryError) or isinstance(cause, MemoryError):
        return FAULT_MEMORY
    if isinstance(exc, RecursionError) or isinstance(cause, RecursionError):
        return FAULT_RECURSION
    return ""


def prepare_instance(
    source: Source, planner: Planner, limits: DecodeLimits = DEFAULT_LIMITS
) -> DecodedInstance | DecodeRejection:
    """Read, check, decode and preprocess one instance. Never raises for bad input.

    Args:
        source: a file path, the file's bytes, or a binary stream.
        planner: header -> model, preprocessing and frames (``RoutePlanner`` in the service);
            raises ``InputRejected`` (``UnsupportedStudy``) when no model accepts the image.
        limits: the resource limits (``models.limits``).
    """
    study = sop = ""
    identity: StudyIdentity | None = None
    try:
        with parse_guard(limits):
            ds = read_dataset(source, limits=limits)
            try:
                evidence = evidence_of(ds, limits)
                study, sop = _uid(evidence, "StudyInstanceUID"), _uid(evidence, "SOPInstanceUID")
            except InputRejected:
                raise
            except RecursionError as exc:
                raise InvalidDicom(ReasonCode.CORRUPT_FILE, "sequences nested too deeply") from exc
            except Exception as exc:  # a deferred element that cannot be converted
                raise InvalidDicom(
                    ReasonCode.CORRUPT_FILE, f"header element unreadable ({type(exc).__name__})"
                ) from exc
        identity = StudyIdentity.from_header(evidence)
        header = header_of(ds)
        plan = planner(header)
        file_bytes = _pixel_data_bytes(ds)
        tensors: list[NDArray[np.float32]] = []
        shape: tuple[int, int] = (0, 0)
        for frame in iter_frames(
            ds,
            frame_indices=plan.frame_indices,
            target_size=plan.pipeline.decode_size,
            limits=limits,
            header=header,
            file_bytes=file_bytes,
        ):
            shape = (int(frame.pixels.shape[0]), int(frame.pixels.shape[1]))
            tensors.append(np.asarray(plan.pipeline(frame), dtype=np.float32))
            del frame
        del ds
        if not tensors:
            return DecodeRejection(study, sop, ReasonCode.NO_USABLE_IMAGE, "no frame selected", identity=identity)
        return DecodedInstance(
            study_instance_uid=study,
            sop_instance_uid=sop,
            model_id=plan.model_id,
            tensors=np.ascontiguousarray(np.stack(tensors), dtype=np.float32),
            frame_indices=list(plan.frame_indices),
            image_shape=shape,
            header=header,
            evidence=evidence,
        )
    except InputRejected as exc:
        return DecodeRejection(study, sop, exc.reason, exc.detail, fault=_fault_of(exc), identity=identity)
    except MemoryError:
        return DecodeRejection(
            study, sop, ReasonCode.IMAGE_TOO_LARGE, "decoding ran out of its memory budget", fault=FAULT_MEMORY
        )
    except RecursionError:
        return DecodeRejection(
            study, sop, ReasonCode.CORRUPT_FILE, "DICOM structure nested too deeply", fault=FAULT_RECURSION
        )
    except BaseException as exc:  # the boundary: nothing an input does escapes as an exception
        if _is_fatal(exc):
            raise
        return DecodeRejection(
            study,
            sop,
            ReasonCode.DECODE_FAILED,
            f"image could not be prepared ({type(exc).__name__})",
            fault=FAULT_UNEXPECTED,
        )


def study_uid_of(source: Source, limits: DecodeLimits = DEFAULT_LIMITS) -> str:
    """The Study Instance UID from a file's header (no pixels read), or ``""`` when the file
    cannot be read within ``limits``. Never raises for bad input: planners that group files by
    study call it on every file of a folder before any screening starts."""
    try:
        with parse_guard(limits):
            ds = read_dataset(source, header_only=True, limits=limits)
            return _uid(ds, "StudyInstanceUID")
    except BaseException as exc:  # InputRejected, or a deferred element that cannot be converted
        if _is_fatal(exc):
            raise
        return ""
