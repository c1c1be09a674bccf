"""The one DICOM pixel pipeline, shared by training and serving.

``read_dataset`` -> ``header_of`` -> ``decode_frames`` turns a DICOM file into display-ready
``PixelFrame`` objects:

* every transfer syntax pydicom + pylibjpeg decode (uncompressed, deflate, RLE, JPEG
  baseline/extended/lossless, JPEG-LS, JPEG 2000, HTJ2K);
* Modality LUT / rescale, then VOI LUT or window centre/width (percentile window when the
  header has neither), MONOCHROME1 inverted so that bright always means dense;
* YBR decoded to RGB, PALETTE COLOR expanded, multi-frame by index;
* JPEG 2000 decoded at a reduced resolution level when the caller needs far fewer pixels
  than the image holds (the wavelet's low-pass band *is* a downsampled image);

and rejects, never repairs: anything unusable raises an ``InputRejected`` subclass with a
``ReasonCode``. ``PixelFrame`` carries only technical attributes, no patient data.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

import cv2
import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from models.errors import InputRejected, InvalidDicom, InvalidPixelData, ReasonCode
from models.limits import (
    DEFAULT_LIMITS,
    MIB,
    DecodeLimits,
    check_decode_budget,
    decode_estimate,
    inflated_size,
    parse_guard,
)

logger = logging.getLogger(__name__)
#: Smallest image side that any model can use.
MIN_SIDE: Final = 32

_JPEG2000: Final = frozenset(
    {
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
        "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
        "1.2.840.10008.1.2.4.203",  # HTJ2K
    }
)
_SUPPORTED_PHOTOMETRIC: Final = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "RGB",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_RCT",
        "YBR_ICT",
        "PALETTE COLOR",
    }
)
_GRAYSCALE: Final = frozenset({"MONOCHROME1", "MONOCHROME2"})
#: DICOM defined terms (PS3.3 C.7.6.3.1.2): the only photometric values an error message names.
_KNOWN_PHOTOMETRIC: Final = _SUPPORTED_PHOTOMETRIC | {
    "HSV",
    "ARGB",
    "CMYK",
    "YBR_PARTIAL_422",
    "YBR_PARTIAL_420",
    "XYB",
}


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """Technical attributes of one DICOM image, read without its pixels. No patient data.

    String attributes are upper-cased and stripped; missing ones are ``""``.
    """

    sop_class_uid: str
    modality: str
    body_part_examined: str
    view_position: str
    photometric_interpretation: str
    rows: int
    columns: int
    number_of_frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    transfer_syntax_uid: str
    has_pixel_data: bool

    @property
    def is_grayscale(self) -> bool:
        return self.photometric_interpretation in _GRAYSCALE


@dataclass(frozen=True, slots=True)
class PixelFrame:
    """One decoded frame, display-ready.

    ``pixels`` is float32 in [0, 1]: ``(H, W)`` for grayscale with bright = dense (MONOCHROME1
    already inverted), ``(H, W, 3)`` RGB for colour. ``reduction`` is the JPEG 2000 resolution
    level that was skipped (0: full resolution; ``r``: each side divided by ``2**r``).
    """

    pixels: NDArray[np.float32]
    header: ImageHeader
    frame_index: int
    reduction: int = 0


def f32(values: Any) -> NDArray[np.float32]:
    """``values`` as a float32 array (no copy when it already is one)."""
    return np.asarray(values, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Reading

_DEFLATED: Final = "1.2.840.10008.1.2.1.99"
_PIXEL_KEYWORDS: Final = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _is_fatal(exc: BaseException) -> bool:
    """Exceptions that must propagate: interpreter shutdown and user interrupts. Everything else
    a parser or codec raises (including Rust ``PanicException``, a ``BaseException``) is a fault
    of the input."""
    return isinstance(exc, KeyboardInterrupt | SystemExit | GeneratorExit)


def read_source(source: str | os.PathLike[str] | bytes | BinaryIO, limits: DecodeLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of a file, buffer or stream, reading at most ``limits.max_file_bytes``.

    Raises:
        InvalidDicom: ``IMAGE_TOO_LARGE`` above the limit, ``CORRUPT_FILE`` when unreadable.
    """
    too_large = InvalidDicom(ReasonCode.IMAGE_TOO_LARGE, f"file larger than {limits.max_file_bytes // MIB} MiB")
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) > limits.max_file_bytes:
            raise too_large
        return bytes(source)
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            if path.stat().st_size > limits.max_file_bytes:
                raise too_large
            return path.read_bytes()
        except OSError as exc:
            raise InvalidDicom(ReasonCode.CORRUPT_FILE, f"file cannot be read ({type(exc).__name__})") from exc
    try:
        data = source.read(limits.max_file_bytes + 1)
    except OSError as exc:
        raise InvalidDicom(ReasonCode.CORRUPT_FILE, f"stream cannot be read ({type(exc).__name__})") from exc
    if len(data) > limits.max_file_bytes:
        raise too_large
    return bytes(data)


def _check_deflated(data: bytes, limits: DecodeLimits) -> None:
    """Bound a Deflated transfer syntax before pydicom inflates it in one call."""
    if _DEFLATED.encode() not in data[:4096]:
        return
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
        ts = str(meta.get("TransferSyntaxUID", ""))
    except Exception:
        return  # pydicom itself will refuse this file meta below
    if ts == _DEFLATED:
        inflated_size(memoryview(data)[fp.tell() :], limits.max_inflated_bytes)


def read_dataset(
    source: str | os.PathLike[str] | bytes | BinaryIO,
    *,
    header_only: bool = False,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> Dataset:
    """Parse a DICOM Part 10 file within ``limits``. Never uses ``force=True``: a file without a
    preamble is refused. A Deflated dataset is measured (streaming) before it is inflated, and
    sequences are parsed under ``parse_guard``. Elements pydicom defers are converted later, on
    access: ``models.decode.prepare_instance`` converts them all inside its boundary.

    Raises:
        InvalidDicom: ``NOT_DICOM`` for non-DICOM content, ``CORRUPT_FILE`` for a file that
            starts as DICOM but cannot be parsed (or passes a parser limit), ``IMAGE_TOO_LARGE``
            above ``limits.max_file_bytes`` or a deflate bomb.
    """
    data = read_source(source, limits)
    _check_deflated(data, limits)
    try:
        with parse_guard(limits):
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=header_only)
        if "TransferSyntaxUID" not in ds.file_meta:
            raise InvalidDicom(ReasonCode.CORRUPT_FILE, "file meta has no Transfer Syntax UID")
    except InputRejected:
        raise
    except InvalidDicomError as exc:
        raise InvalidDicom(ReasonCode.NOT_DICOM, "no DICOM preamble/prefix; not a DICOM Part 10 file") from exc
    except MemoryError as exc:
        raise InvalidDicom(ReasonCode.IMAGE_TOO_LARGE, "DICOM parse ran out of its memory budget") from exc
    except RecursionError as exc:
        raise InvalidDicom(ReasonCode.CORRUPT_FILE, "DICOM structure nested too deeply") from exc
    except BaseException as exc:  # pydicom raises many types on corrupt input
        if _is_fatal(exc):
            raise
        raise InvalidDicom(ReasonCode.CORRUPT_FILE, f"DICOM parse failed ({type(exc).__name__})") from exc
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = "\\".join(str(v) for v in value)
    return str(value).strip().upper()


def _int(ds: Dataset, keyword: str, default: int, low: int = 0, high: int = 0xFFFF) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidDicom(ReasonCode.CORRUPT_FILE, f"{keyword} is not an integer") from exc
    if not low <= number <= high:
        raise InvalidDicom(ReasonCode.CORRUPT_FILE, f"{keyword} outside {low}..{high}")
    return number


def header_of(ds: Dataset) -> ImageHeader:
    """Read and validate, once, the technical attributes that input QA and decoding need.

    Every value is converted here (none stays a deferred pydicom element): integers must be
    integers in their DICOM range (``US`` attributes 0..65535), strings are upper-cased.

    Raises:
        InvalidDicom: ``CORRUPT_FILE`` when an attribute is malformed or out of range.
    """
    try:
        has_pixels = any(k in ds for k in _PIXEL_KEYWORDS)
        bits_allocated = _int(ds, "BitsAllocated", 0)
        return ImageHeader(
            sop_class_uid=str(ds.get("SOPClassUID", "") or "").strip(),
            modality=_text(ds, "Modality"),
            body_part_examined=_text(ds, "BodyPartExamined"),
            view_position=_text(ds, "ViewPosition"),
            photometric_interpretation=_text(ds, "PhotometricInterpretation"),
            rows=_int(ds, "Rows", 0),
            columns=_int(ds, "Columns", 0),
            number_of_frames=max(1, _int(ds, "NumberOfFrames", 1, low=-(2**31), high=2**31 - 1)),
            samples_per_pixel=_int(ds, "SamplesPerPixel", 1),
            bits_allocated=bits_allocated,
            bits_stored=_int(ds, "BitsStored", bits_allocated),
            pixel_representation=_int(ds, "PixelRepresentation", 0),
            transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "") or "").strip(),
            has_pixel_data=has_pixels,
        )
    except InputRejected:
        raise
    except BaseException as exc:  # a deferred element that cannot be converted
        if _is_fatal(exc):
            raise
        raise InvalidDicom(ReasonCode.CORRUPT_FILE, f"header attribute unreadable ({type(exc).__name__})") from exc


def check_decodable(header: ImageHeader, limits: DecodeLimits = DEFAULT_LIMITS, *, file_bytes: int = 0) -> None:
    """Refuse, before decoding, what cannot or must not be decoded.

    Raises:
        InvalidPixelData: no pixel data, unknown transfer syntax or photometric interpretation,
            impossible bit depths, more frames than ``limits.max_frames``, or a memory estimate
            (``models.limits.decode_estimate`` for a file of ``file_bytes``) above
            ``limits.max_decode_bytes``.
    """
    if not header.has_pixel_data:
        raise InvalidPixelData(ReasonCode.NO_PIXEL_DATA, "dataset has no Pixel Data element")
    if header.rows <= 0 or header.columns <= 0:
        raise InvalidPixelData(ReasonCode.NO_PIXEL_DATA, "Rows/Columns missing or zero")
    try:
        decoder_ok = get_decoder(UID(header.transfer_syntax_uid)).is_available
    except (NotImplementedError, ValueError):
        decoder_ok = False
    if not decoder_ok:
        raise InvalidPixelData(ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX, "no pixel decoder for this transfer syntax")
    if header.photometric_interpretation not in _SUPPORTED_PHOTOMETRIC:
        shown = header.photometric_interpretation if header.photometric_interpretation in _KNOWN_PHOTOMETRIC else ""
        raise InvalidPixelData(
            ReasonCode.UNSUPPORTED_PHOTOMETRIC,
            f"photometric interpretation {shown or '(missing or unknown)'!r} unsupported",
        )
    if header.bits_allocated not in (1, 8, 16, 32) or not 0 < header.bits_stored <= header.bits_allocated:
        raise InvalidPixelData(
            ReasonCode.DECODE_FAILED,
            f"inconsistent BitsAllocated={header.bits_allocated} BitsStored={header.bits_stored}",
        )
    if header.pixel_representation not in (0, 1):
        raise InvalidPixelData(ReasonCode.DECODE_FAILED, "PixelRepresentation not 0 or 1")
    if header.samples_per_pixel not in (1, 3):
        raise InvalidPixelData(ReasonCode.DECODE_FAILED, f"SamplesPerPixel={header.samples_per_pixel}")
    if header.is_grayscale != (header.samples_per_pixel == 1) and header.photometric_interpretation != (
        "PALETTE COLOR"
    ):
        raise InvalidPixelData(
            ReasonCode.DECODE_FAILED, "SamplesPerPixel disagrees with the photometric interpretation"
        )
    if header.photometric_interpretation == "PALETTE COLOR" and header.samples_per_pixel != 1:
        raise InvalidPixelData(ReasonCode.DECODE_FAILED, "PALETTE COLOR needs SamplesPerPixel=1")
    if header.number_of_frames > limits.max_frames:
        raise InvalidPixelData(ReasonCode.IMAGE_TOO_LARGE, f"more than {limits.max_frames} frames")
    estimate = decode_estimate(
        rows=header.rows,
        columns=header.columns,
        samples_per_pixel=header.samples_per_pixel,
        bits_allocated=header.bits_allocated,
        frames_decoded=1,
        file_bytes=file_bytes,
    )
    check_decode_budget(estimate, limits)
    if min(header.rows, header.columns) < MIN_SIDE:
        raise InvalidPixelData(ReasonCode.IMAGE_TOO_SMALL, f"image side below {MIN_SIDE} pixels")


# --------------------------------------------------------------------------------------------
# JPEG 2000 at a reduced resolution level


@dataclass(frozen=True, slots=True)
class J2kInfo:
    """What the SIZ and COD markers of a JPEG 2000 codestream say."""

    width: int
    height: int
    x_offset: int
    y_offset: int
    components: int
    precision: int
    signed: bool
    levels: int


def parse_j2k_codestream(codestream: bytes) -> J2kInfo:
    """Read image size, precision and decomposition levels from the main header.

    Raises:
        ValueError: not a JPEG 2000 codestream, or no SIZ/COD marker before the first tile.
    """
    if codestream[:4] != b"\xff\x4f\xff\x51":
        raise ValueError("not a JPEG 2000 codestream (no SOC+SIZ)")
    pos = 2
    siz: tuple[int, int, int, int, int, int] | None = None
    levels: int | None = None
    while pos + 4 <= len(codestream):
        marker, length = struct.unpack(">HH", codestream[pos : pos + 4])
        body = codestream[pos + 4 : pos + 2 + length]
        if marker == 0xFF51:  # SIZ
            xsiz, ysiz, xo, yo = struct.unpack(">IIII", body[2:18])
            csiz = struct.unpack(">H", body[34:36])[0]
            siz = (xsiz, ysiz, xo, yo, csiz, body[36])
        elif marker == 0xFF52:  # COD
            levels = body[5]
        elif marker == 0xFF90:  # first tile-part: main header over
            break
        pos += 2 + length
    if siz is None or levels is None:
        raise ValueError("JPEG 2000 main header lacks SIZ or COD")
    xsiz, ysiz, xo, yo, csiz, ssiz = siz
    return J2kInfo(
        width=xsiz - xo,
        height=ysiz - yo,
        x_offset=xo,
        y_offset=yo,
        components=csiz,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
        levels=levels,
    )


def choose_reduction(info: J2kInfo, target_size: int) -> int:
    """Largest resolution level to skip that still leaves the long side >= ``target_size``."""
    long_side = max(info.width, info.height)
    level = 0
    while level < info.levels and math.ceil(long_side / 2 ** (level + 1)) >= target_size:
        level += 1
    return level


def decode_j2k_reduced(codestream: bytes, info: J2kInfo, level: int) -> NDArray[Any]:
    """Decode a single-component, unsigned JPEG 2000 codestream skipping ``level`` levels.

    Uses OpenJPEG through Pillow. Pillow (13.0) computes the reduced size as
    ``int((n + 2**(r-1)) / 2**r)`` where OpenJPEG produces ``ceil(n / 2**r)``; the two differ
    for many sizes and Pillow then reports a broken stream. The tile is therefore set here with
    OpenJPEG's rounding. Samples come back at the codestream's precision.

    Raises:
        ValueError: multi-component or signed data (callers fall back to a full decode).
        OSError: OpenJPEG refused the stream.
    """
    from PIL import Image, ImageFile

    if info.components != 1 or info.signed:
        raise ValueError("reduced decode supports unsigned single-component codestreams only")
    img = Image.open(io.BytesIO(codestream))
    power = 1 << level
    width = -(-(info.x_offset + info.width) // power) - -(-info.x_offset // power)
    height = -(-(info.y_offset + info.height) // power) - -(-info.y_offset // power)
    if level:
        tile = img.tile[0]
        args = tile[3]
        if not isinstance(args, tuple):
            raise ValueError("unexpected Pillow JPEG 2000 tile arguments")
        img._reduce = 0  # type: ignore[attr-defined]  # keep Pillow from re-rounding the size
        img._size = (width, height)
        img.tile = [ImageFile._Tile(tile[0], (0, 0, width, height), tile[2], (args[0], level, *args[2:]))]
    img.load()
    arr = np.asarray(img)
    if arr.shape != (height, width):
        raise ValueError(f"reduced decode produced {arr.shape}, expected {(height, width)}")
    if arr.dtype == np.uint8:
        return arr
    # Pillow scales samples of precision p < 16 up to 16 bits; undo it.
    shift = 16 - info.precision
    out = arr.astype(np.uint16, copy=False)
    return (out >> shift) if shift > 0 else out


# --------------------------------------------------------------------------------------------
# Decoding and display normalisation

_JPEG_FAMILY: Final = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # baseline
        "1.2.840.10008.1.2.4.51",  # extended
        "1.2.840.10008.1.2.4.57",  # lossless
        "1.2.840.10008.1.2.4.70",  # lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    }
)
_RLE: Final = "1.2.840.10008.1.2.5"
_JPEG_SOF: Final = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})


def _encapsulated_frame(ds: Dataset, header: ImageHeader, index: int) -> bytes:
    from pydicom.encaps import get_frame

    return bytes(get_frame(ds.PixelData, index, number_of_frames=header.number_of_frames))


def _jpeg_frame_size(stream: bytes) -> tuple[int, int, int]:
    """(rows, columns, components) from the SOF (or JPEG-LS SOF55) marker of a JPEG stream."""
    if stream[:2] != b"\xff\xd8":
        raise ValueError("no JPEG SOI marker")
    pos = 2
    while pos + 4 <= len(stream):
        if stream[pos] != 0xFF:
            raise ValueError("JPEG marker expected")
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD8 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = int.from_bytes(stream[pos + 2 : pos + 4], "big")
        if marker in _JPEG_SOF:
            body = stream[pos + 4 : pos + 2 + length]
            if len(body) < 6:
                raise ValueError("JPEG SOF marker truncated")
            return int.from_bytes(body[1:3], "big"), int.from_bytes(body[3:5], "big"), body[5]
        if marker in (0xDA, 0xD9):  # scan or end before any frame header
            break
        pos += 2 + length
    raise ValueError("no JPEG frame header before the first scan")


def check_codestream(stream: bytes, header: ImageHeader) -> None:
    """Refuse a compressed frame whose own header disagrees with the DICOM header.

    The codec allocates from what the codestream declares (a 10 MB JPEG can declare 65535 x
    65535), while the memory budget was computed from Rows/Columns: the two must agree before
    the codec runs. RLE: segment count and offsets must fit the frame.

    Raises:
        InvalidPixelData: ``DECODE_FAILED`` on a mismatch or an unreadable codestream header.
    """
    ts = header.transfer_syntax_uid
    try:
        if ts in _JPEG_FAMILY:
            rows, cols, comps = _jpeg_frame_size(stream)
            if (rows, cols) != (header.rows, header.columns) or comps != header.samples_per_pixel:
                raise ValueError("JPEG frame header disagrees with Rows/Columns/SamplesPerPixel")
        elif ts in _JPEG2000:
            start = stream.find(b"\xff\x4f\xff\x51", 0, 4096)
            if start < 0:
                raise ValueError("no JPEG 2000 SOC+SIZ marker")
            info = parse_j2k_codestream(stream[start:])
            if (info.height, info.width) != (header.rows, header.columns) or info.components != (
                header.samples_per_pixel
            ):
                raise ValueError("JPEG 2000 SIZ disagrees with Rows/Columns/SamplesPerPixel")
        elif ts == _RLE:
            if len(stream) < 64:
                raise ValueError("RLE header truncated")
            offsets = struct.unpack("<16I", stream[:64])
            segments = offsets[0]
            expected = header.samples_per_pixel * max(1, header.bits_allocated // 8)
            if segments != expected or segments > 15:
                raise ValueError("RLE segment count disagrees with the header")
            used = offsets[1 : 1 + segments]
            if used[0] != 64 or any(b <= a for a, b in itertools.pairwise(used)) or used[-1] >= len(stream):
                raise ValueError("RLE segment offsets out of range")
    except (ValueError, struct.error, IndexError) as exc:
        raise InvalidPixelData(ReasonCode.DECODE_FAILED, f"compressed frame header refused: {exc}") from exc


def _raw_frame(ds: Dataset, header: ImageHeader, index: int, target_size: int | None) -> tuple[NDArray[Any], int]:
    """Stored values of one frame (colour converted to RGB), and the J2K level skipped."""
    if UID(header.transfer_syntax_uid).is_compressed:
        stream = _encapsulated_frame(ds, header, index)
        check_codestream(stream, header)
        if target_size and header.transfer_syntax_uid in _JPEG2000 and header.samples_per_pixel == 1:
            try:
                info = parse_j2k_codestream(stream)
                level = choose_reduction(info, target_size)
                if level > 0 and info.precision == header.bits_stored:
                    return decode_j2k_reduced(stream, info, level), level
            except (ValueError, OSError, KeyError) as exc:
                logger.info("reduced JPEG 2000 decode unavailable, decoding in full (%s)", type(exc).__name__)
        del stream
    index_arg = index if header.number_of_frames > 1 else None
    arr = pixel_array(ds, index=index_arg)
    return arr, 0


@dataclass(frozen=True, slots=True)
class Lut:
    """A Modality or VOI lookup table, read eagerly: entries as float32 and the first input
    value they map (PS3.3 C.11.1.1.1)."""

    entries: NDArray[np.float32]
    first_mapped: int

    def apply(self, values: NDArray[Any]) -> NDArray[np.float32]:
        """Look up ``values`` (inputs below/above the table map to its first/last entry)."""
        n = len(self.entries)
        if np.issubdtype(values.dtype, np.integer):
            wide = np.int64 if values.dtype.itemsize >= 4 else np.int32
            index = values.astype(wide) - self.first_mapped
            np.clip(index, 0, n - 1, out=index)
        else:
            shifted = np.rint(values) - np.float32(self.first_mapped)
            index = np.clip(shifted, 0, n - 1, out=shifted).astype(np.int32)
        out: NDArray[np.float32] = self.entries[index]
        return out


@dataclass(frozen=True, slots=True)
class DisplayParams:
    """What ``to_display`` applies, read and validated from the header before any decode."""

    modality_lut: Lut | None = None
    rescale: tuple[float, float] | None = None  # slope, intercept
    voi_lut: Lut | None = None
    window: tuple[float, float, str] | None = None  # center, width, function


def _first_number(value: object) -> float:  # WindowCenter may be multi-valued
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _lut_of(ds: Dataset, item: Dataset, name: str) -> Lut:
    descriptor = [int(v) for v in item.LUTDescriptor]
    if len(descriptor) != 3:
        raise ValueError(f"{name} LUTDescriptor needs 3 values")
    n = descriptor[0] or 65536
    first, depth = descriptor[1], descriptor[2]
    if not 8 <= depth <= 16 or not -(2**16) < first < 2**16:
        raise ValueError(f"{name} LUTDescriptor out of range")
    data = item["LUTData"]
    if isinstance(data.value, bytes | bytearray):
        little = ds.original_encoding[1] if ds.original_encoding[1] is not None else True
        entries = np.frombuffer(data.value, dtype="<u2" if little else ">u2", count=len(data.value) // 2)
    else:
        value = data.value
        entries = np.asarray(list(value) if isinstance(value, Sequence) else [value], dtype=np.float64)
    if len(entries) < n:
        raise ValueError(f"{name} LUTData shorter than its descriptor")
    out = np.asarray(entries[:n], dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} LUTData not finite")
    return Lut(out, first)


def display_params(ds: Dataset, header: ImageHeader) -> DisplayParams:
    """Read the Modality LUT / rescale and VOI LUT / window of a grayscale image, eagerly.

    Raises:
        InvalidPixelData: ``DECODE_FAILED`` for a malformed LUT, a non-numeric, non-finite or
            out-of-range rescale or window value.
    """
    if not header.is_grayscale:
        return DisplayParams()
    try:
        modality_lut = rescale = voi_lut = window = None
        if ds.get("ModalityLUTSequence"):
            modality_lut = _lut_of(ds, ds.ModalityLUTSequence[0], "Modality")
        elif "RescaleSlope" in ds and "RescaleIntercept" in ds:
            rescale = (_first_number(ds.RescaleSlope), _first_number(ds.RescaleIntercept))
            if not all(math.isfinite(v) and abs(v) < 1e30 for v in rescale):
                raise ValueError("RescaleSlope/RescaleIntercept not finite")
        if ds.get("VOILUTSequence"):
            voi_lut = _lut_of(ds, ds.VOILUTSequence[0], "VOI")
        elif "WindowCenter" in ds and "WindowWidth" in ds:
            center, width = _first_number(ds.WindowCenter), _first_number(ds.WindowWidth)
            function = _text(ds, "VOILUTFunction") or "LINEAR"
            if not (math.isfinite(center) and math.isfinite(width)) or width <= 0 or abs(center) > 1e30:
                raise ValueError("WindowCenter/WindowWidth not finite")
            if width > 1e30:
                raise ValueError("WindowWidth out of range")
            if function not in ("SIGMOID", "LINEAR_EXACT") and width < 1:
                raise ValueError("WindowWidth < 1 for LINEAR windowing")
            window = (center, width, function)
        return DisplayParams(modality_lut, rescale, voi_lut, window)
    except InputRejected:
        raise
    except BaseException as exc:
        if _is_fatal(exc):
            raise
        detail = str(exc) if isinstance(exc, ValueError) and str(exc).endswith(_OWN_MESSAGES) else ""
        raise InvalidPixelData(
            ReasonCode.DECODE_FAILED, detail or f"Modality/VOI attributes unusable ({type(exc).__name__})"
        ) from exc


_OWN_MESSAGES: Final = ("3 values", "out of range", "descriptor", "not finite", "LINEAR windowing")


def _window(values: NDArray[np.float32], center: float, width: float, function: str) -> NDArray[np.float32]:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1], in place on ``values`` (float32 throughout)."""
    if function == "SIGMOID":
        values -= np.float32(center)
        values *= np.float32(-4.0 / width)
        np.exp(values, out=values)
        values += np.float32(1.0)
        np.reciprocal(values, out=values)
        return values
    if function == "LINEAR_EXACT":
        low, high = center - width / 2.0, center + width / 2.0
    else:  # LINEAR
        low, high = center - 0.5 - (width - 1) / 2.0, center - 0.5 + (width - 1) / 2.0
    values -= np.float32(low)
    values /= np.float32(max(high - low, 1e-6))
    return np.clip(values, 0.0, 1.0, out=values)


def to_display(
    ds: Dataset, header: ImageHeader, stored: NDArray[Any], params: DisplayParams | None = None
) -> NDArray[np.float32]:
    """Stored grayscale values -> [0, 1] float32 with bright = dense.

    Order: Modality LUT or rescale, then the first VOI LUT or window in the header, else a
    0.5-99.5 percentile window; MONOCHROME1 inverted last. Works in float32 (never float64)
    and in place where it can, so that working memory stays within the decode estimate.
    """
    p = params if params is not None else display_params(ds, header)
    with np.errstate(all="ignore"):
        if p.modality_lut is not None:
            values = p.modality_lut.apply(stored)
        else:
            values = stored.astype(np.float32)
            if p.rescale is not None:
                values *= np.float32(p.rescale[0])
                values += np.float32(p.rescale[1])
        if p.voi_lut is not None:
            lut_out = p.voi_lut.apply(values)
            low, high = float(p.voi_lut.entries.min()), float(p.voi_lut.entries.max())
            lut_out -= np.float32(low)
            lut_out /= np.float32(max(high - low, 1e-6))
            display = np.clip(lut_out, 0.0, 1.0, out=lut_out)
        elif p.window is not None:
            display = _window(values, *p.window)
        else:
            low, high = np.percentile(values[:: max(1, values.shape[0] // 256)], [0.5, 99.5])
            values -= np.float32(low)
            values /= np.float32(max(float(high - low), 1e-6))
            display = np.clip(values, 0.0, 1.0, out=values)
        if header.photometric_interpretation == "MONOCHROME1":
            np.subtract(np.float32(1.0), display, out=display)
    return f32(display)


def _colour_to_display(ds: Dataset, header: ImageHeader, stored: NDArray[Any]) -> NDArray[np.float32]:
    if header.photometric_interpretation == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)
        scale = float(np.iinfo(rgb.dtype).max) if np.issubdtype(rgb.dtype, np.integer) else 1.0
    else:
        rgb = stored
        scale = float(2**header.bits_stored - 1)
    out = rgb.astype(np.float32)
    out /= np.float32(scale)
    return np.clip(out, 0.0, 1.0, out=out)


def _decode_one(
    ds: Dataset, header: ImageHeader, index: int, target_size: int | None, params: DisplayParams
) -> PixelFrame:
    try:
        stored, level = _raw_frame(ds, header, index, target_size)
    except InputRejected:
        raise
    except MemoryError as exc:
        raise InvalidPixelData(ReasonCode.IMAGE_TOO_LARGE, "decoding ran out of its memory budget") from exc
    except BaseException as exc:  # codecs raise a wide range of types on corrupt streams (Rust panics too)
        if _is_fatal(exc):
            raise
        raise InvalidPixelData(
            ReasonCode.DECODE_FAILED, f"pixel data could not be decoded ({type(exc).__name__})"
        ) from exc
    if header.is_grayscale or header.photometric_interpretation == "PALETTE COLOR":
        if stored.ndim != 2:
            raise InvalidPixelData(ReasonCode.DECODE_FAILED, f"single-sample frame has shape {stored.shape}")
        pixels = (
            to_display(ds, header, stored, params) if header.is_grayscale else _colour_to_display(ds, header, stored)
        )
    else:
        if stored.ndim != 3 or stored.shape[-1] != 3:
            raise InvalidPixelData(ReasonCode.DECODE_FAILED, f"colour frame has shape {stored.shape}")
        pixels = _colour_to_display(ds, header, stored)
    del stored
    spread = float(pixels.std(dtype=np.float32))
    if not np.isfinite(spread):
        raise InvalidPixelData(ReasonCode.DECODE_FAILED, "non-finite values after scaling")
    if spread < 1e-3:
        raise InvalidPixelData(ReasonCode.BLANK_IMAGE, "frame has no contrast")
    return PixelFrame(pixels=pixels, header=header, frame_index=index, reduction=level)


def iter_frames(
    ds: Dataset,
    *,
    frame_indices: Sequence[int] | None = None,
    target_size: int | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
    header: ImageHeader | None = None,
    file_bytes: int = 0,
) -> Iterator[PixelFrame]:
    """Decode frames one at a time (each is dropped by the caller before the next is decoded).

    Raises (while iterating):
        InvalidPixelData: see ``check_decodable`` and ``decode_frames``.
    """
    header = header if header is not None else header_of(ds)
    check_decodable(header, limits, file_bytes=file_bytes)
    params = display_params(ds, header)
    indices = list(range(header.number_of_frames)) if frame_indices is None else list(frame_indices)
    for index in indices:
        if not 0 <= index < header.number_of_frames:
            raise InvalidPixelData(ReasonCode.DECODE_FAILED, f"frame {index} out of range")
        try:
            frame = _decode_one(ds, header, index, target_size, params)
        except InputRejected:
            raise
        except MemoryError as exc:
            raise InvalidPixelData(ReasonCode.IMAGE_TOO_LARGE, "display conversion ran out of memory") from exc
        except BaseException as exc:  # LUT/rescale/colour conversion on hostile values
            if _is_fatal(exc):
                raise
            raise InvalidPixelData(
                ReasonCode.DECODE_FAILED, f"pixel values could not be converted ({type(exc).__name__})"
            ) from exc
        yield frame


def decode_frames(
    ds: Dataset,
    *,
    frame_indices: Sequence[int] | None = None,
    target_size: int | None = None,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> list[PixelFrame]:
    """Decode the frames of an image to display-ready ``PixelFrame`` objects.

    Args:
        ds: a dataset from ``read_dataset`` (with pixels).
        frame_indices: 0-based frames to decode; all frames when ``None``.
        target_size: long side in pixels that the consumer will resize to. JPEG 2000 is then
            decoded at the coarsest resolution level whose long side is still >= this.
        limits: memory and frame limits (``models.limits``).

    Raises:
        InvalidPixelData: see ``check_decodable``; ``DECODE_FAILED`` when the codec fails, a
            compressed frame's own header disagrees with the DICOM header, or the result is not
            finite; ``BLANK_IMAGE`` when a frame has (almost) no contrast.
    """
    return list(iter_frames(ds, frame_indices=frame_indices, target_size=target_size, limits=limits))


def load_frames(
    source: str | os.PathLike[str] | bytes | BinaryIO,
    *,
    frame_indices: Sequence[int] | None = None,
    target_size: int | None = None,
) -> list[PixelFrame]:
    """``read_dataset`` + ``decode_frames`` in one call (what training loaders use)."""
    return decode_frames(read_dataset(source), frame_indices=frame_indices, target_size=target_size)


# --------------------------------------------------------------------------------------------
# Geometry


def resize_area(image: NDArray[np.float32], width: int, height: int) -> NDArray[np.float32]:
    """Fast resize: area averaging when shrinking (anti-aliased), bilinear when enlarging."""
    h, w = image.shape[:2]
    interpolation = cv2.INTER_AREA if width <= w and height <= h else cv2.INTER_LINEAR
    return f32(np.ascontiguousarray(cv2.resize(image, (width, height), interpolation=interpolation)))


def letterbox(image: NDArray[np.float32], size: int) -> NDArray[np.float32]:
    """Fit the long side to ``size`` keeping the aspect ratio; pad the rest with 0, centred."""
    h, w = image.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    resized = resize_area(image, new_w, new_h)
    out = np.zeros((size, size, *image.shape[2:]), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = resized
    return out
