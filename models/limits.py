"""Resource limits of the decode boundary: bytes, frames, sequence items, nesting depth, time.

Every number that bounds what one untrusted DICOM file may cost lives here, so that the ADR
(docs/adr/0013-decode-boundary.md) and the code cannot disagree. Three kinds of limit:

* **size before work**: the file size, the inflated size of a Deflated transfer syntax, and a
  memory *estimate* computed from the header before any pixel is decoded
  (``decode_estimate``): refused with ``IMAGE_TOO_LARGE`` above ``max_decode_bytes``;
* **parser limits**: sequence items, sequence nesting depth and parse time, enforced while
  pydicom parses (``parse_guard``), refused with ``CORRUPT_FILE``;
* **process limits** (``models.decode_pool``): an address-space cap and a wall-clock timeout
  per file for the worker process that decodes, which catch whatever the estimates miss.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Final

from models.errors import InvalidDicom, InvalidPixelData, ReasonCode

MIB: Final = 1024 * 1024
GIB: Final = 1024 * MIB


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """What one file may cost. The defaults are the documented service budget (ADR 0013)."""

    #: Largest file read at all.
    max_file_bytes: int = 256 * MIB
    #: Largest dataset after inflating a Deflated Explicit VR Little Endian file.
    max_inflated_bytes: int = 256 * MIB
    #: Largest memory estimate (file, decoder output and float32 working copies) for one file.
    max_decode_bytes: int = 1 * GIB
    #: Largest NumberOfFrames a header may declare.
    max_frames: int = 4096
    #: Sequence items parsed in one file, over all sequences and all levels.
    max_sequence_items: int = 20_000
    #: Deepest sequence nesting (real headers rarely pass 6).
    max_sequence_depth: int = 24
    #: Wall-clock seconds the parser may spend on one file's header.
    max_parse_seconds: float = 5.0
    #: Address space a decode worker may add to what it holds after start-up (RLIMIT_AS).
    worker_memory_bytes: int = 1280 * MIB
    #: CPU seconds one file may use in a decode worker before the worker is killed (CPU, not
    #: wall clock: a worker starved by a loaded machine is not a hang).
    file_timeout_s: float = 30.0
    #: Wall-clock seconds for one file whatever its CPU use (a worker blocked or starved).
    file_wall_timeout_s: float = 120.0
    #: A worker whose resident set exceeds this after a file is replaced (allocator high-water).
    worker_recycle_rss_bytes: int = 768 * MIB


DEFAULT_LIMITS: Final = DecodeLimits()

#: Bytes per stored sample the decoders hand back, and float32 working copies per sample:
#: the decoder's own intermediate (OpenJPEG and colour conversion work in 32-bit), the
#: modality/VOI output and the display array. Used by ``decode_estimate``.
DECODER_BYTES_PER_SAMPLE: Final = 8
WORKING_BYTES_PER_SAMPLE: Final = 8


def decode_estimate(
    *, rows: int, columns: int, samples_per_pixel: int, bits_allocated: int, frames_decoded: int, file_bytes: int
) -> int:
    """Upper estimate of the memory one file needs: the file twice (bytes and parsed element
    values), then per decoded frame its stored samples, the decoder's intermediate and the
    float32 working copies. Frames are decoded one at a time and dropped after preprocessing,
    so one frame's working set counts once; the stored frames count for each frame decoded.
    """
    samples = max(0, rows) * max(0, columns) * max(1, samples_per_pixel)
    stored = samples * max(1, -(-max(0, bits_allocated) // 8))
    per_frame = samples * (DECODER_BYTES_PER_SAMPLE + WORKING_BYTES_PER_SAMPLE)
    return 2 * max(0, file_bytes) + stored * max(1, min(frames_decoded, 2)) + per_frame


def check_decode_budget(estimate: int, limits: DecodeLimits) -> None:
    """Raise ``IMAGE_TOO_LARGE`` when ``estimate`` exceeds ``limits.max_decode_bytes``."""
    if estimate > limits.max_decode_bytes:
        raise InvalidPixelData(
            ReasonCode.IMAGE_TOO_LARGE,
            f"decoding needs about {estimate // MIB} MiB, above the {limits.max_decode_bytes // MIB} MiB budget",
        )


def inflated_size(data: bytes | memoryview, limit: int) -> int:
    """Size of a raw-deflate stream once inflated, streaming and stopping past ``limit``.

    Raises:
        InvalidDicom: ``IMAGE_TOO_LARGE`` past ``limit`` (a deflate bomb), ``CORRUPT_FILE`` when
            the stream is not valid raw deflate.
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    view = memoryview(data)
    step = 1 * MIB  # input and output chunk: the measurement holds at most this much
    try:
        for start in range(0, len(view), step):
            pending: bytes | memoryview = view[start : start + step]
            while pending and total <= limit and not inflater.eof:  # after eof zlib keeps the tail
                before = len(pending)
                total += len(inflater.decompress(pending, step))
                pending = inflater.unconsumed_tail
                if len(pending) == before and not inflater.eof:
                    break  # no progress: zlib wants more input than this chunk
            if total > limit or inflater.eof:
                break
        while total <= limit and not inflater.eof:
            chunk = inflater.decompress(b"", step)
            if not chunk:
                break
            total += len(chunk)
    except zlib.error as exc:
        raise InvalidDicom(ReasonCode.CORRUPT_FILE, "deflated dataset is not a valid deflate stream") from exc
    if total > limit:
        raise InvalidDicom(ReasonCode.IMAGE_TOO_LARGE, f"deflated dataset inflates past {limit // MIB} MiB")
    return total


# --------------------------------------------------------------------------------------------
# Parser limits


class ParseLimitExceeded(InvalidDicom):
    """The header needs more sequence items, nesting or time than the limits allow."""

    def __init__(self, detail: str) -> None:
        super().__init__(ReasonCode.CORRUPT_FILE, detail)


@dataclass
class _ParseBudget:
    limits: DecodeLimits
    deadline: float
    items: int = 0
    depth: int = 0


_state = threading.local()
_install_lock = threading.Lock()
_installed = False


def _budget() -> _ParseBudget | None:
    return getattr(_state, "budget", None)


def _guarded(original: Callable[..., Any]) -> Callable[..., Any]:
    def read_sequence_item(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        if budget is None:
            return original(*args, **kwargs)
        budget.items += 1
        if budget.items > budget.limits.max_sequence_items:
            raise ParseLimitExceeded(f"more than {budget.limits.max_sequence_items} sequence items")
        if budget.depth >= budget.limits.max_sequence_depth:
            raise ParseLimitExceeded(f"sequences nested deeper than {budget.limits.max_sequence_depth}")
        if time.monotonic() > budget.deadline:
            raise ParseLimitExceeded(f"header parse took longer than {budget.limits.max_parse_seconds:g} s")
        budget.depth += 1
        try:
            return original(*args, **kwargs)
        finally:
            budget.depth -= 1

    read_sequence_item.__wrapped__ = original  # type: ignore[attr-defined]
    return read_sequence_item


def _install() -> None:
    """Wrap pydicom's sequence-item reader once per process.

    Every sequence item pydicom parses, at read time (undefined-length sequences) or on first
    access (defined-length ones), goes through ``pydicom.filereader.read_sequence_item``; the
    wrapper only counts when a ``parse_guard`` is active on the calling thread.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        import pydicom.filereader as filereader

        filereader.read_sequence_item = _guarded(filereader.read_sequence_item)
        _installed = True


@contextmanager
def parse_guard(limits: DecodeLimits = DEFAULT_LIMITS) -> Iterator[_ParseBudget]:
    """Count sequence items, depth and time of every parse on this thread inside the block.

    Raises (from inside the block):
        ParseLimitExceeded: a limit was passed.
    """
    _install()
    outer = _budget()
    if outer is not None:  # nested guard: the outer budget keeps counting
        yield outer
        return
    budget = _ParseBudget(limits, time.monotonic() + limits.max_parse_seconds)
    _state.budget = budget
    try:
        yield budget
    finally:
        _state.budget = None
