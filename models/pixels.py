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
import logging
import math
import os
import struct
import warnings
from collections.abc import Sequence
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
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from models.errors import InvalidDicom, InvalidPixelData, ReasonCode

logger = logging.getLogger(__name__)

#: Largest file read at all, and largest decoded pixel buffer, in bytes.
MAX_FILE_BYTES: Final = 512 * 1024 * 1024
MAX_PIXEL_BYTES: Final = 1024 * 1024 * 1024
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


def read_dataset(source: str | os.PathLike[str] | bytes | BinaryIO, *, header_only: bool = False) -> Dataset:
    """Parse a DICOM Part 10 file. Never uses ``force=True``: a file without a preamble is refused.

    Raises:
        InvalidDicom: ``NOT_DICOM`` for non-DICOM content, ``CORRUPT_FILE`` for a file that
            starts as DICOM but cannot be parsed, ``IMAGE_TOO_LARGE`` above ``MAX_FILE_BYTES``.
    """
    fp: BinaryIO
    if isinstance(source, bytes | bytearray):
        if len(source) > MAX_FILE_BYTES:
            raise InvalidDicom(ReasonCode.IMAGE_TOO_LARGE, f"file larger than {MAX_FILE_BYTES} bytes")
        fp = io.BytesIO(source)
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise InvalidDicom(ReasonCode.CORRUPT_FILE, f"file cannot be read ({type(exc).__name__})") from exc
        if size > MAX_FILE_BYTES:
            raise InvalidDicom(ReasonCode.IMAGE_TOO_LARGE, f"file larger than {MAX_FILE_BYTES} bytes")
        fp = io.BytesIO(path.read_bytes())
    else:
        fp = source
    try:
        # pydicom warnings can quote element values (patient data): record, count, never echo.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(fp, stop_before_pixels=header_only)
        if caught:
            logger.debug("DICOM parser raised %d warnings (contents withheld)", len(caught))
    except InvalidDicomError as exc:
        raise InvalidDicom(ReasonCode.NOT_DICOM, "no DICOM preamble/prefix; not a DICOM Part 10 file") from exc
    except Exception as exc:  # pydicom raises many types on corrupt input
        raise InvalidDicom(ReasonCode.CORRUPT_FILE, f"DICOM parse failed ({type(exc).__name__})") from exc
    if "TransferSyntaxUID" not in ds.file_meta:
        raise InvalidDicom(ReasonCode.CORRUPT_FILE, "file meta has no Transfer Syntax UID")
    return ds


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    return str(value).strip().upper()


def _int(ds: Dataset, keyword: str, default: int) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise InvalidDicom(ReasonCode.CORRUPT_FILE, f"{keyword} is not an integer") from exc


def header_of(ds: Dataset) -> ImageHeader:
    """Read the technical attributes that input QA and decoding need.

    Raises:
        InvalidDicom: ``CORRUPT_FILE`` when a numeric attribute is not a number.
    """
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    return ImageHeader(
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        modality=_text(ds, "Modality"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        view_position=_text(ds, "ViewPosition"),
        photometric_interpretation=_text(ds, "PhotometricInterpretation"),
        rows=_int(ds, "Rows", 0),
        columns=_int(ds, "Columns", 0),
        number_of_frames=max(1, _int(ds, "NumberOfFrames", 1)),
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1),
        bits_allocated=_int(ds, "BitsAllocated", 0),
        bits_stored=_int(ds, "BitsStored", _int(ds, "BitsAllocated", 0)),
        pixel_representation=_int(ds, "PixelRepresentation", 0),
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
        has_pixel_data=has_pixels,
    )


def check_decodable(header: ImageHeader) -> None:
    """Refuse, before decoding, what cannot or must not be decoded.

    Raises:
        InvalidPixelData: no pixel data, unknown transfer syntax or photometric interpretation,
            impossible bit depths, or a pixel buffer above ``MAX_PIXEL_BYTES``.
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
        raise InvalidPixelData(
            ReasonCode.UNSUPPORTED_PHOTOMETRIC,
            f"photometric interpretation {header.photometric_interpretation or '(missing)'!r} unsupported",
        )
    if header.bits_allocated not in (1, 8, 16, 32) or not 0 < header.bits_stored <= header.bits_allocated:
        raise InvalidPixelData(
            ReasonCode.DECODE_FAILED,
            f"inconsistent BitsAllocated={header.bits_allocated} BitsStored={header.bits_stored}",
        )
    if header.samples_per_pixel not in (1, 3):
        raise InvalidPixelData(ReasonCode.DECODE_FAILED, f"SamplesPerPixel={header.samples_per_pixel}")
    if header.is_grayscale != (header.samples_per_pixel == 1) and header.photometric_interpretation != (
        "PALETTE COLOR"
    ):
        raise InvalidPixelData(
            ReasonCode.DECODE_FAILED, "SamplesPerPixel disagrees with the photometric interpretation"
        )
    nbytes = (
        header.rows
        * header.columns
        * header.samples_per_pixel
        * header.number_of_frames
        * max(1, header.bits_allocated // 8)
    )
    if nbytes > MAX_PIXEL_BYTES:
        raise InvalidPixelData(ReasonCode.IMAGE_TOO_LARGE, f"decoded size {nbytes} bytes above the limit")
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


def _encapsulated_frame(ds: Dataset, header: ImageHeader, index: int) -> bytes:
    from pydicom.encaps import get_frame

    return bytes(get_frame(ds.PixelData, index, number_of_frames=header.number_of_frames))


def _raw_frame(ds: Dataset, header: ImageHeader, index: int, target_size: int | None) -> tuple[NDArray[Any], int]:
    """Stored values of one frame (colour converted to RGB), and the J2K level skipped."""
    if target_size and header.transfer_syntax_uid in _JPEG2000 and header.samples_per_pixel == 1:
        try:
            stream = _encapsulated_frame(ds, header, index)
            info = parse_j2k_codestream(stream)
            level = choose_reduction(info, target_size)
            if level > 0 and info.precision == header.bits_stored:
                return decode_j2k_reduced(stream, info, level), level
        except (ValueError, OSError, KeyError) as exc:
            logger.info("reduced JPEG 2000 decode unavailable, decoding in full (%s)", type(exc).__name__)
    index_arg = index if header.number_of_frames > 1 else None
    arr = pixel_array(ds, index=index_arg)
    return arr, 0


def _window(values: NDArray[np.float32], center: float, width: float, function: str) -> NDArray[np.float32]:
    """DICOM PS3.3 C.11.2.1.2 windowing to [0, 1]."""
    if function == "SIGMOID":
        return f32(1.0 / (1.0 + np.exp(-4.0 * (values - center) / width)))
    if function == "LINEAR_EXACT":
        low, high = center - width / 2.0, center + width / 2.0
    else:  # LINEAR
        if width < 1:
            raise InvalidPixelData(ReasonCode.DECODE_FAILED, "WindowWidth < 1 for LINEAR windowing")
        low, high = center - 0.5 - (width - 1) / 2.0, center - 0.5 + (width - 1) / 2.0
    return f32(np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0))


def _first_number(value: object) -> float:  # WindowCenter may be multi-valued
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def to_display(ds: Dataset, header: ImageHeader, stored: NDArray[Any]) -> NDArray[np.float32]:
    """Stored grayscale values -> [0, 1] float32 with bright = dense.

    Order: Modality LUT or rescale, then the first VOI LUT or window in the header, else a
    0.5-99.5 percentile window; MONOCHROME1 inverted last.
    """
    values = apply_modality_lut(stored, ds).astype(np.float32, copy=False)
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        lut_in = np.round(values).astype(np.int64)  # LUT lookups need integer input
        lut_out = apply_voi(lut_in, ds, index=0).astype(np.float32, copy=False)
        lut_data = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=np.float32)
        low, high = float(lut_data.min()), float(lut_data.max())
        display = f32(np.clip((lut_out - low) / max(high - low, 1e-6), 0.0, 1.0))
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            center = _first_number(ds.WindowCenter)
            width = _first_number(ds.WindowWidth)
        except (TypeError, ValueError, IndexError) as exc:
            raise InvalidPixelData(ReasonCode.DECODE_FAILED, "WindowCenter/WindowWidth not numeric") from exc
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
        if not (math.isfinite(center) and math.isfinite(width)) or width <= 0:
            raise InvalidPixelData(ReasonCode.DECODE_FAILED, "WindowCenter/WindowWidth not finite")
        display = _window(values, center, width, function)
    else:
        low, high = np.percentile(values[:: max(1, values.shape[0] // 256)], [0.5, 99.5])
        display = f32(np.clip((values - low) / max(float(high - low), 1e-6), 0.0, 1.0))
    if header.photometric_interpretation == "MONOCHROME1":
        display = f32(1.0 - display)
    return display


def _colour_to_display(ds: Dataset, header: ImageHeader, stored: NDArray[Any]) -> NDArray[np.float32]:
    if header.photometric_interpretation == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)
        scale = float(np.iinfo(rgb.dtype).max) if np.issubdtype(rgb.dtype, np.integer) else 1.0
    else:
        rgb = stored
        scale = float(2**header.bits_stored - 1)
    out: NDArray[np.float32] = np.clip(rgb.astype(np.float32) / scale, 0.0, 1.0)
    return out


def decode_frames(
    ds: Dataset,
    *,
    frame_indices: Sequence[int] | None = None,
    target_size: int | None = None,
) -> list[PixelFrame]:
    """Decode the frames of an image to display-ready ``PixelFrame`` objects.

    Args:
        ds: a dataset from ``read_dataset`` (with pixels).
        frame_indices: 0-based frames to decode; all frames when ``None``.
        target_size: long side in pixels that the consumer will resize to. JPEG 2000 is then
            decoded at the coarsest resolution level whose long side is still >= this.

    Raises:
        InvalidPixelData: see ``check_decodable``; ``DECODE_FAILED`` when the codec fails or the
            result is not finite; ``BLANK_IMAGE`` when a frame has (almost) no contrast.
    """
    header = header_of(ds)
    check_decodable(header)
    indices = list(range(header.number_of_frames)) if frame_indices is None else list(frame_indices)
    frames: list[PixelFrame] = []
    for index in indices:
        if not 0 <= index < header.number_of_frames:
            raise InvalidPixelData(ReasonCode.DECODE_FAILED, f"frame {index} out of range")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                stored, level = _raw_frame(ds, header, index, target_size)
        except InvalidPixelData:
            raise
        except Exception as exc:  # codecs raise a wide range of types on corrupt streams
            raise InvalidPixelData(
                ReasonCode.DECODE_FAILED, f"pixel data could not be decoded ({type(exc).__name__})"
            ) from exc
        if header.is_grayscale or header.photometric_interpretation == "PALETTE COLOR":
            if stored.ndim != 2:
                raise InvalidPixelData(ReasonCode.DECODE_FAILED, f"single-sample frame has shape {stored.shape}")
            if header.is_grayscale:
                pixels = to_display(ds, header, stored)
            else:
                pixels = _colour_to_display(ds, header, stored)
        else:
            if stored.ndim != 3 or stored.shape[-1] != 3:
                raise InvalidPixelData(ReasonCode.DECODE_FAILED, f"colour frame has shape {stored.shape}")
            pixels = _colour_to_display(ds, header, stored)
        spread = float(pixels.std())
        if not np.isfinite(spread):
            raise InvalidPixelData(ReasonCode.DECODE_FAILED, "non-finite values after scaling")
        if spread < 1e-3:
            raise InvalidPixelData(ReasonCode.BLANK_IMAGE, "frame has no contrast")
        frames.append(PixelFrame(pixels=pixels, header=header, frame_index=index, reduction=level))
    return frames


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
