"""Mutators: deterministic, seeded changes to a seed file's bytes.

Case ``i`` of a run with seed ``s`` uses ``random.Random(f"{s}:{i}")`` only, so any case can be
rebuilt alone (``python -m tests.fuzz.run --seed s --only i``). Mutations: byte and bit flips
(biased to the header), truncation, insertion, deletion, duplication, element length fields set
to hostile values, VRs replaced, header values replaced by hostile raw bytes, and splices of
one seed's header with another's pixel data.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Final

from tests.fuzz.crafted import with_raw

_LONG_VRS: Final = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UT", b"UN", b"UC", b"UR", b"SV", b"UV"}
_VRS: Final = [b"US", b"UL", b"SS", b"SL", b"OB", b"OW", b"SQ", b"UN", b"DS", b"IS", b"CS", b"UI", b"LO", b"FD", b"AT"]
_LENGTHS: Final = [0, 1, 2, 3, 0xFF, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF]

#: Header attributes and hostile raw values (VR, bytes) for ``value`` mutations.
_US_VALUES: Final = [0, 1, 7, 12, 31, 32, 64, 255, 4096, 16384, 32768, 65535]
_VALUE_TARGETS: Final[dict[int, str]] = {
    0x00280010: "US",  # Rows
    0x00280011: "US",  # Columns
    0x00280002: "US",  # SamplesPerPixel
    0x00280100: "US",  # BitsAllocated
    0x00280101: "US",  # BitsStored
    0x00280102: "US",  # HighBit
    0x00280103: "US",  # PixelRepresentation
    0x00280006: "US",  # PlanarConfiguration
    0x00280008: "IS",  # NumberOfFrames
    0x00280004: "CS",  # PhotometricInterpretation
    0x00281050: "DS",  # WindowCenter
    0x00281051: "DS",  # WindowWidth
    0x00281052: "DS",  # RescaleIntercept
    0x00281053: "DS",  # RescaleSlope
    0x00281056: "CS",  # VOILUTFunction
    0x00080060: "CS",  # Modality
    0x00180015: "CS",  # BodyPartExamined
}
_STRINGS: Final = [
    b"",
    b"0 ",
    b"-1",
    b"1e38",
    b"-1e38 ",
    b"NaN ",
    b"inf ",
    b"abc ",
    b"1\\2 ",
    b"99999999999999999999",
    b"2147483648",
    b"MONOCHROME1 ",
    b"PALETTE COLOR ",
    b"YBR_FULL_422",
    b"RGB ",
    b"SIGMOID ",
    b"LINEAR_EXACT",
    b"\xff\xfe\x00\x01",
    b"A" * 200,
]


@dataclass(frozen=True, slots=True)
class Element:
    offset: int
    vr: bytes
    length_offset: int
    length_size: int
    value_offset: int
    length: int


def walk(data: bytes, limit: int = 400) -> list[Element]:
    """Top-level explicit-VR little-endian elements after the preamble (best effort)."""
    out: list[Element] = []
    pos = 132 if data[128:132] == b"DICM" else 0
    while pos + 8 <= len(data) and len(out) < limit:
        vr = data[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(data):
                break
            length = struct.unpack_from("<I", data, pos + 8)[0]
            element = Element(pos, vr, pos + 8, 4, pos + 12, length)
        elif vr.isalpha() and vr.isupper():
            length = struct.unpack_from("<H", data, pos + 6)[0]
            element = Element(pos, vr, pos + 6, 2, pos + 8, length)
        else:
            break
        out.append(element)
        if length == 0xFFFFFFFF:
            break
        pos = element.value_offset + length
    return out


def _flip(rng: random.Random, data: bytearray) -> str:
    head = min(len(data), 4096)
    for _ in range(rng.randint(1, 8)):
        pos = rng.randrange(head) if rng.random() < 0.6 or len(data) <= head else rng.randrange(len(data))
        data[pos] = rng.randrange(256)
    return "flip"


def _bitflip(rng: random.Random, data: bytearray) -> str:
    pos = rng.randrange(len(data))
    data[pos] ^= 1 << rng.randrange(8)
    return "bit"


def _truncate(rng: random.Random, data: bytearray) -> str:
    del data[rng.randrange(len(data)) :]
    return "truncate"


def _insert(rng: random.Random, data: bytearray) -> str:
    pos = rng.randrange(len(data) + 1)
    data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return "insert"


def _delete(rng: random.Random, data: bytearray) -> str:
    pos = rng.randrange(len(data))
    del data[pos : pos + rng.randint(1, 256)]
    return "delete"


def _duplicate(rng: random.Random, data: bytearray) -> str:
    start = rng.randrange(len(data))
    chunk = bytes(data[start : start + rng.randint(1, 512)])
    pos = rng.randrange(len(data) + 1)
    data[pos:pos] = chunk
    return "dup"


def _length(rng: random.Random, data: bytearray) -> str:
    elements = walk(bytes(data))
    if not elements:
        return _flip(rng, data)
    e = rng.choice(elements)
    value = rng.choice([*_LENGTHS, e.length + 1, max(0, e.length - 1), e.length * 2, rng.randrange(1 << 16)])
    if e.length_size == 2:
        struct.pack_into("<H", data, e.length_offset, value & 0xFFFF)
    else:
        struct.pack_into("<I", data, e.length_offset, value & 0xFFFFFFFF)
    return "length"


def _vr(rng: random.Random, data: bytearray) -> str:
    elements = walk(bytes(data))
    if not elements:
        return _flip(rng, data)
    e = rng.choice(elements)
    new = rng.choice(_VRS) if rng.random() < 0.8 else bytes([rng.randrange(256), rng.randrange(256)])
    data[e.offset + 4 : e.offset + 6] = new
    return "vr"


def _value(rng: random.Random, data: bytearray) -> str:
    tag = rng.choice(list(_VALUE_TARGETS))
    vr = _VALUE_TARGETS[tag]
    if vr == "US" and rng.random() < 0.8:
        raw = struct.pack("<H", rng.choice(_US_VALUES))
    else:
        raw = rng.choice(_STRINGS)
        if len(raw) % 2:
            raw += b" "
    try:
        data[:] = with_raw(bytes(data), {tag: (vr, raw)})
    except Exception:
        return _flip(rng, data)
    return "value"


MUTATORS: Final[list[tuple[Callable[[random.Random, bytearray], str], float]]] = [
    (_flip, 3.0),
    (_bitflip, 1.0),
    (_truncate, 1.0),
    (_insert, 0.5),
    (_delete, 0.5),
    (_duplicate, 0.5),
    (_length, 1.5),
    (_vr, 1.0),
    (_value, 3.0),
]


def mutate(data: bytes, rng: random.Random, other: bytes | None = None) -> tuple[bytes, str]:
    """Apply one to three mutations (or a splice with ``other``); returns the bytes and a label."""
    if other is not None and rng.random() < 0.05:
        cut_a = rng.randrange(len(data) // 2 + 1)
        cut_b = rng.randrange(len(other) // 2 + 1, len(other) + 1)
        return data[:cut_a] + other[cut_b:], "splice"
    out = bytearray(data)
    ops = []
    funcs = [f for f, _ in MUTATORS]
    weights = [w for _, w in MUTATORS]
    for _ in range(rng.choice((1, 1, 2, 3))):
        if not out:
            break
        ops.append(rng.choices(funcs, weights)[0](rng, out))
    return bytes(out), "+".join(ops)


def mutated_cases(
    seeds: tuple[tuple[str, bytes], ...], count: int, seed: int, start: int = 0
) -> Iterator[tuple[str, Callable[[], bytes]]]:
    """``count`` cases, each built lazily from its own RNG."""
    for index in range(start, start + count):

        def build(index: int = index) -> bytes:
            rng = random.Random(f"{seed}:{index}")
            _name, data = seeds[rng.randrange(len(seeds))]
            other = seeds[rng.randrange(len(seeds))][1]
            mutated, _ = mutate(data, rng, other)
            return mutated

        yield f"{seed}:{index}", build
