"""Hand-made hostile DICOM files: the findings of issue 12 and the bad-input list of
docs RELIABILITY (b). Each builder returns the file's bytes; ``crafted_cases`` lists them all.

Files are assembled element by element (explicit VR little endian) so that a case can say
exactly what a real encoder would never write: wrong lengths, undefined lengths on non-SQ
elements, a million sequence items, a codestream that disagrees with Rows/Columns.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from functools import lru_cache
from typing import Final

import numpy as np
import pydicom
from numpy.typing import NDArray
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

CR: Final = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT: Final = "1.2.840.10008.1.2.1"
IMPLICIT: Final = "1.2.840.10008.1.2"
DEFLATED: Final = "1.2.840.10008.1.2.1.99"
RLE: Final = "1.2.840.10008.1.2.5"
JPEG_BASELINE: Final = "1.2.840.10008.1.2.4.50"
J2K_LOSSLESS: Final = "1.2.840.10008.1.2.4.90"
H264: Final = "1.2.840.10008.1.2.4.102"

_LONG_VRS: Final = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UT", "UN", "UC", "UR", "SV", "UV"})
_ITEM: Final = b"\xfe\xff\x00\xe0"
_ITEM_END: Final = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQ_END: Final = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
UNDEFINED: Final = 0xFFFFFFFF


def pad(value: bytes, fill: bytes = b" ") -> bytes:
    return value + fill if len(value) % 2 else value


def elem(tag: int, vr: str, value: bytes, length: int | None = None) -> bytes:
    """One explicit-VR little-endian element; ``length`` overrides the true value length."""
    n = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode("latin-1")[:2]
    if vr in _LONG_VRS or len(vr) != 2:
        return head + struct.pack("<HI", 0, n) + value
    return head + struct.pack("<H", n & 0xFFFF) + value


def text(tag: int, vr: str, value: str) -> bytes:
    return elem(tag, vr, pad(value.encode("latin-1"), b"\0" if vr == "UI" else b" "))


def us(tag: int, value: int) -> bytes:
    return elem(tag, "US", struct.pack("<H", value & 0xFFFF))


def file_meta(ts: str, *, group_length: int | None = None) -> bytes:
    body = (
        elem(0x00020001, "OB", b"\x00\x01")
        + text(0x00020002, "UI", CR)
        + text(0x00020003, "UI", "1.2.826.0.1.3680043.8.498.1")
        + (text(0x00020010, "UI", ts) if ts else b"")
        + text(0x00020012, "UI", "1.2.826.0.1.3680043.8.498.2")
    )
    length = len(body) if group_length is None else group_length
    return b"\x00" * 128 + b"DICM" + elem(0x00020000, "UL", struct.pack("<I", length)) + body


def chest_elements(rows: int = 256, cols: int = 256, bits: int = 8) -> dict[int, bytes]:
    """A minimal CR chest PA header (synthetic identifiers) without pixel data."""
    return {
        0x00080016: text(0x00080016, "UI", CR),
        0x00080018: text(0x00080018, "UI", "1.2.826.0.1.3680043.8.498.1"),
        0x00080060: text(0x00080060, "CS", "CR"),
        0x00100010: text(0x00100010, "PN", "FUZZ^CANARY"),
        0x00100020: text(0x00100020, "LO", "FUZZ-0001"),
        0x00180015: text(0x00180015, "CS", "CHEST"),
        0x00185101: text(0x00185101, "CS", "PA"),
        0x0020000D: text(0x0020000D, "UI", "1.2.826.0.1.3680043.8.498.3"),
        0x0020000E: text(0x0020000E, "UI", "1.2.826.0.1.3680043.8.498.4"),
        0x00280002: us(0x00280002, 1),
        0x00280004: text(0x00280004, "CS", "MONOCHROME2"),
        0x00280010: us(0x00280010, rows),
        0x00280011: us(0x00280011, cols),
        0x00280100: us(0x00280100, bits),
        0x00280101: us(0x00280101, bits),
        0x00280102: us(0x00280102, bits - 1),
        0x00280103: us(0x00280103, 0),
    }


def assemble(ts: str, elements: dict[int, bytes], tail: bytes = b"") -> bytes:
    """File meta + elements in tag order + ``tail`` (raw bytes, e.g. pixel data)."""
    return file_meta(ts) + b"".join(elements[t] for t in sorted(elements)) + tail


def gradient(rows: int, cols: int) -> NDArray[np.uint8]:
    yy, xx = np.mgrid[0:rows, 0:cols]
    out: NDArray[np.uint8] = ((xx * 7 + yy * 3) % 251).astype(np.uint8)
    return out


def native_chest(rows: int = 256, cols: int = 256, extra: dict[int, bytes] | None = None) -> bytes:
    """A valid 8-bit native chest image (screenable), with ``extra`` elements merged in."""
    elements = chest_elements(rows, cols)
    elements.update(extra or {})
    return assemble(EXPLICIT, elements, elem(0x7FE00010, "OB", pad(gradient(rows, cols).tobytes(), b"\0")))


def encapsulated(fragments: list[bytes]) -> bytes:
    body = _ITEM + struct.pack("<I", 0)  # empty basic offset table
    for frag in fragments:
        frag = pad(frag, b"\0")
        body += _ITEM + struct.pack("<I", len(frag)) + frag
    return elem(0x7FE00010, "OB", body + _SEQ_END, length=UNDEFINED)


# --------------------------------------------------------------------------------------------
# The findings of issue 12


def million_empty_items(*, defined_length: bool = False, private: bool = True, items: int = 1_000_000) -> bytes:
    """A sequence of a million empty items (15 hangs in the issue's fuzz run)."""
    tag = 0x00091001 if private else 0x00081140
    body = (_ITEM + b"\x00\x00\x00\x00") * items
    sq = elem(tag, "SQ", body, length=len(body)) if defined_length else elem(tag, "SQ", body + _SEQ_END, UNDEFINED)
    extra = {tag: sq}
    if private:
        extra[0x00090010] = text(0x00090010, "LO", "FUZZ")
    return native_chest(extra=extra)


def deep_sequence(depth: int) -> bytes:
    """Sequences nested ``depth`` deep (undefined lengths)."""
    head = (elem(0x00081140, "SQ", b"", UNDEFINED) + _ITEM + b"\xff\xff\xff\xff") * depth
    tail = (_ITEM_END + _SEQ_END) * depth
    return native_chest(extra={0x00081140: head + tail})


def rle_bomb(side: int = 16384) -> bytes:
    """~4 MB of RLE that inflates to ``side`` x ``side`` 8-bit samples (5.5-7.6 GB in the issue)."""
    runs = (side * side) // 128
    segment = b"\x81\x00" * runs  # replicate run: 128 zero bytes
    header = struct.pack("<16I", 1, 64, *([0] * 14))
    return assemble(RLE, chest_elements(side, side), encapsulated([header + segment]))


@lru_cache(maxsize=4)
def deflate_bomb(side: int = 16384) -> bytes:
    """A Deflated-transfer-syntax file whose dataset inflates to ``side`` x ``side`` bytes."""
    elements = chest_elements(side, side)
    dataset = b"".join(elements[t] for t in sorted(elements))
    squeezer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [squeezer.compress(dataset + elem(0x7FE00010, "OB", b"", length=side * side))]
    zeros = bytes(1 << 24)
    for _ in range(side * side // len(zeros)):
        out.append(squeezer.compress(zeros))
    out.append(squeezer.flush())
    return file_meta(DEFLATED) + b"".join(out)


def jpeg_bomb(declared: int = 65000, rows: int = 512, scan_bytes: int = 10 * 1024 * 1024) -> bytes:
    """A JPEG baseline frame whose SOF declares ``declared`` x ``declared`` while the DICOM
    header says ``rows`` x ``rows``; 10 MB of scan data (3 GB left resident in the issue)."""
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, declared, declared, 1) + b"\x01\x11\x00"
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes([1] * 64)
    dht = (
        b"\xff\xc4" + struct.pack(">H", 31) + b"\x00" + bytes([0, 1, 5, 1, 1, 1, 1, 1, 1] + [0] * 7) + bytes(range(12))
    )
    sos = b"\xff\xda" + struct.pack(">HB", 8, 1) + b"\x01\x00\x00\x3f\x00"
    scan = np.random.default_rng(7).integers(0, 255, scan_bytes, dtype=np.uint8).tobytes()
    stream = b"\xff\xd8" + dqt + sof + dht + sos + scan + b"\xff\xd9"
    return assemble(JPEG_BASELINE, chest_elements(rows, rows), encapsulated([stream]))


def _with_raw(base: bytes, raws: dict[int, tuple[str, bytes]], delete: tuple[str, ...] = ()) -> bytes:
    """``base`` re-saved with elements replaced by raw (unvalidated) bytes."""
    ds = pydicom.dcmread(io.BytesIO(base))
    for keyword in delete:
        if keyword in ds:
            delattr(ds, keyword)
    for tag, (vr, value) in raws.items():
        t = Tag(tag)
        ds._dict[t] = RawDataElement(t, vr, len(value), value, 0, False, True)
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _lut_item(descriptor: bytes, data: bytes, data_vr: str = "OW") -> bytes:
    body = elem(0x00283002, "US", descriptor) + elem(0x00283006, data_vr, data)
    return _ITEM + struct.pack("<I", len(body)) + body


def bad_voi_lut(kind: str) -> bytes:
    """VOI LUT Sequence with a malformed descriptor or data."""
    items = {
        "short-data": _lut_item(struct.pack("<HHH", 256, 0, 16), bytes(20)),
        "depth-7": _lut_item(struct.pack("<HHH", 256, 0, 7), bytes(512)),
        "two-values": _lut_item(struct.pack("<HH", 256, 0), bytes(512)),
        "no-data": _ITEM + struct.pack("<I", 14) + elem(0x00283002, "US", struct.pack("<HHH", 256, 0, 16)),
    }
    body = items[kind]
    return native_chest(extra={0x00283010: elem(0x00283010, "SQ", body)})


def bad_modality_lut(kind: str) -> bytes:
    items = {
        "depth-12": _lut_item(struct.pack("<HHH", 256, 0, 12), bytes(512)),
        "short-data": _lut_item(struct.pack("<HHH", 4096, 0, 16), bytes(8)),
        "zero-entries-short": _lut_item(struct.pack("<HHH", 0, 0, 16), bytes(64)),
    }
    return native_chest(extra={0x00283000: elem(0x00283000, "SQ", items[kind])})


def bad_rescale(slope: bytes, intercept: bytes = b"0 ") -> bytes:
    return native_chest(
        extra={0x00281052: elem(0x00281052, "DS", intercept), 0x00281053: elem(0x00281053, "DS", slope)}
    )


def bad_window(center: bytes, width: bytes, function: bytes = b"") -> bytes:
    extra = {0x00281050: elem(0x00281050, "DS", center), 0x00281051: elem(0x00281051, "DS", width)}
    if function:
        extra[0x00281056] = elem(0x00281056, "CS", function)
    return native_chest(extra=extra)


def deferred_sequence_error() -> bytes:
    """A public defined-length sequence whose content cannot be parsed: pydicom defers it,
    so it raised wherever it was first touched (``header_of``, ``prepare``, ``assemble``)."""
    return native_chest(extra={0x00081140: elem(0x00081140, "SQ", b"\x01\x02\x03\x04")})


def deferred_rows_error() -> bytes:
    """Rows (US) with 3 bytes: the conversion raises on first access, in ``header_of``."""
    return native_chest(extra={0x00280010: elem(0x00280010, "US", b"\x00\x01\x00")})


def _codestream_mismatch_j2k() -> bytes:
    ds = pydicom.Dataset()
    arr = gradient(64, 64)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored = 64, 64, 1, 8, 8
    ds.HighBit, ds.PixelRepresentation, ds.PhotometricInterpretation = 7, 0, "MONOCHROME2"
    ds.PixelData = arr.tobytes()
    ds.compress(J2K_LOSSLESS, arr=arr)
    from pydicom.encaps import generate_fragments

    stream = bytearray(next(generate_fragments(ds.PixelData)))
    siz = stream.find(b"\xff\x51")
    stream[siz + 6 : siz + 14] = struct.pack(">II", 60000, 60000)
    return assemble(J2K_LOSSLESS, chest_elements(64, 64), encapsulated([bytes(stream)]))


# --------------------------------------------------------------------------------------------
# RELIABILITY (b): bad inputs


def _element_length_cases() -> dict[str, bytes]:
    base = native_chest()
    name_at = base.find(b"\x10\x00\x10\x00PN")
    ob = elem(0x00091002, "OB", b"\x00" * 8, length=UNDEFINED)
    creator = text(0x00090010, "LO", "FUZZ")
    cases = {
        "ob-undefined-length": native_chest(extra={0x00090010: creator, 0x00091002: ob}),
        "length-past-end": base[:name_at] + elem(0x00100010, "PN", b"A", length=0x7FFF) + base[name_at + 12 :],
        "length-2^31": native_chest(extra={0x00090010: creator, 0x00091003: elem(0x00091003, "OB", b"", 2**31)}),
        "odd-length": native_chest(extra={0x00080070: elem(0x00080070, "LO", b"ABC")}),
        "pixel-length-overflow": assemble(
            EXPLICIT, chest_elements(), elem(0x7FE00010, "OB", gradient(256, 256).tobytes(), length=0xFFFFFFF0)
        ),
        "rows-as-ul": native_chest(extra={0x00280010: elem(0x00280010, "UL", struct.pack("<I", 70000))}),
        "vr-not-ascii": native_chest(extra={0x00080070: elem(0x00080070, "\xff\x00", b"AB")}),
    }
    return cases


def _header_value_cases() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for bits in (1, 7, 12, 32, 64):
        out[f"bits-allocated-{bits}"] = native_chest(extra={0x00280100: us(0x00280100, bits)})
    out["bits-stored-gt-allocated"] = native_chest(extra={0x00280101: us(0x00280101, 16)})
    out["pixel-representation-2"] = native_chest(extra={0x00280103: us(0x00280103, 2)})
    out["spp3-monochrome"] = native_chest(extra={0x00280002: us(0x00280002, 3)})
    out["planar-2"] = native_chest(extra={0x00280006: us(0x00280006, 2)})
    for value in (b"0 ", b"-1", b"abc ", b"2147483647", b"99999999999 "):
        out[f"frames-{value.strip().decode()}"] = native_chest(extra={0x00280008: elem(0x00280008, "IS", value)})
    for side in (0, 1, 65535):
        out[f"rows-{side}"] = native_chest(extra={0x00280010: us(0x00280010, side)})
    out["no-pixel-data"] = assemble(EXPLICIT, chest_elements())
    out["pixel-data-short"] = assemble(EXPLICIT, chest_elements(), elem(0x7FE00010, "OB", bytes(1000)))
    out["pixel-data-long"] = assemble(EXPLICIT, chest_elements(), elem(0x7FE00010, "OB", bytes(256 * 256 * 3)))
    out["float-pixel-data"] = assemble(
        EXPLICIT, chest_elements(bits=32), elem(0x7FE00008, "OF", np.ones(256 * 256, np.float32).tobytes())
    )
    out["photometric-unknown"] = native_chest(extra={0x00280004: text(0x00280004, "CS", "FUZZ^CANARY")})
    out["palette-bad-lut"] = native_chest(
        extra={
            0x00280004: text(0x00280004, "CS", "PALETTE COLOR"),
            0x00281101: elem(0x00281101, "US", struct.pack("<HHH", 0, 70, 16)),
            0x00281102: elem(0x00281102, "US", struct.pack("<HHH", 256, 0, 16)),
            0x00281103: elem(0x00281103, "US", struct.pack("<HHH", 256, 0, 8)),
            0x00281201: elem(0x00281201, "OW", bytes(10)),
            0x00281202: elem(0x00281202, "OW", bytes(512)),
        }
    )
    out["charset-unknown"] = native_chest(extra={0x00080005: text(0x00080005, "CS", "ISO_IR 999")})
    out["charset-iso2022"] = native_chest(
        extra={
            0x00080005: text(0x00080005, "CS", "ISO 2022 IR 87"),
            0x00100010: elem(0x00100010, "PN", b"\x1b$B\xff\xfe\x1b(B "),
        }
    )
    out["invalid-utf8"] = native_chest(
        extra={0x00080005: text(0x00080005, "CS", "ISO_IR 192"), 0x00100010: elem(0x00100010, "PN", b"\xc3\x28\xff ")}
    )
    out["long-string-64k"] = native_chest(extra={0x00081030: elem(0x00081030, "LO", b"A" * 65534)})
    return out


def _transfer_syntax_cases() -> dict[str, bytes]:
    elements = chest_elements()
    pixels = elem(0x7FE00010, "OB", gradient(256, 256).tobytes())
    body = b"".join(elements[t] for t in sorted(elements)) + pixels
    return {
        "ts-missing": file_meta("") + body,
        "ts-unknown": file_meta("1.2.3.4.5.6") + body,
        "ts-implicit-mismatch": file_meta(IMPLICIT) + body,
        "ts-big-endian-mismatch": file_meta("1.2.840.10008.1.2.2") + body,
        "ts-h264": file_meta(H264) + body,
        "ts-deflated-not-deflate": file_meta(DEFLATED) + body,
        "meta-group-length-wrong": file_meta(EXPLICIT, group_length=3) + body,
        "meta-group-length-huge": file_meta(EXPLICIT, group_length=0x7FFFFFFF) + body,
        "no-preamble": body,
        "rle-offsets-out-of-range": assemble(
            RLE, chest_elements(), encapsulated([struct.pack("<16I", 1, 9999, *([0] * 14)) + b"\x00" * 100])
        ),
        "jpeg-corrupt": assemble(JPEG_BASELINE, chest_elements(), encapsulated([b"\xff\xd8" + bytes(500)])),
    }


def _not_dicom() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    return {
        "zero-bytes": b"",
        "random": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "png": b"\x89PNG\r\n\x1a\n" + bytes(200),
        "zip": b"PK\x03\x04" + bytes(200),
        "pdf": b"%PDF-1.7\n" + bytes(200),
        "preamble-only": bytes(128) + b"DICM",
    }


def crafted_cases() -> dict[str, Callable[[], bytes]]:
    """Every hand-made case, by name (built lazily: some are megabytes)."""
    cases: dict[str, Callable[[], bytes]] = {
        "million-empty-items-private-undefined": lambda: million_empty_items(),
        "million-empty-items-private-defined": lambda: million_empty_items(defined_length=True),
        "million-empty-items-public-defined": lambda: million_empty_items(defined_length=True, private=False),
        "deep-sequence-10": lambda: deep_sequence(10),
        "deep-sequence-100": lambda: deep_sequence(100),
        "deep-sequence-10000": lambda: deep_sequence(10000),
        "rle-bomb-16384": lambda: rle_bomb(16384),
        "deflate-bomb-16384": lambda: deflate_bomb(16384),
        "deflate-bomb-8192": lambda: deflate_bomb(8192),
        "jpeg-bomb-sof": lambda: jpeg_bomb(),
        "jpeg-bomb-header": lambda: jpeg_bomb(declared=65000, rows=65000, scan_bytes=1 << 20),
        "j2k-siz-mismatch": _codestream_mismatch_j2k,
        "deferred-sequence-error": deferred_sequence_error,
        "deferred-rows-error": deferred_rows_error,
    }
    for kind in ("short-data", "depth-7", "two-values", "no-data"):
        cases[f"voi-lut-{kind}"] = lambda kind=kind: bad_voi_lut(kind)  # type: ignore[misc]
    for kind in ("depth-12", "short-data", "zero-entries-short"):
        cases[f"modality-lut-{kind}"] = lambda kind=kind: bad_modality_lut(kind)  # type: ignore[misc]
    for slope in (b"abc ", b"", b"NaN ", b"inf ", b"1e38", b"0 ", b"1\\2 "):
        cases[f"rescale-slope-{slope.strip().decode() or 'empty'}"] = lambda s=slope: bad_rescale(s)  # type: ignore[misc]
    for center, width, fn in (
        (b"40", b"0 ", b""),
        (b"40", b"-5", b""),
        (b"NaN ", b"400 ", b""),
        (b"40", b"1e38", b""),
        (b"x ", b"400 ", b""),
        (b"40", b"0.5 ", b"LINEAR"),
        (b"1e38", b"1 ", b"SIGMOID "),
        (b"40", b"1e-30 ", b"LINEAR_EXACT"),
    ):
        name = f"window-{center.strip().decode()}-{width.strip().decode()}-{fn.strip().decode()}"
        cases[name] = lambda c=center, w=width, f=fn: bad_window(c, w, f)  # type: ignore[misc]
    for group in (_element_length_cases, _header_value_cases, _transfer_syntax_cases, _not_dicom):
        for name, data in group().items():
            cases[name] = lambda data=data: data  # type: ignore[misc]
    return cases


def with_raw(base: bytes, raws: dict[int, tuple[str, bytes]], delete: tuple[str, ...] = ()) -> bytes:
    """Public wrapper of ``_with_raw`` for the mutators."""
    return _with_raw(base, raws, delete)
