"""Regression tests, one per finding class of issue 12's fuzz run and security review.

Every file goes through ``StudyScreener.prepare`` (the service's entry to the decode boundary)
with a real ``DecodePool``; each test names the finding it guards. Before the boundary, each of
these raised out of ``prepare`` (or later), hung, or decoded gigabytes.
"""

from __future__ import annotations

import io
import os
import time
import tracemalloc
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

from models.decode import FAULT_MEMORY, FAULT_TIMEOUT, FAULT_WORKER_DIED, FramePlan, RoutePlanner
from models.decode_pool import DecodePool
from models.errors import ReasonCode
from models.limits import GIB, DecodeLimits
from models.pixels import ImageHeader, header_of, to_display
from models.registry import resolve
from serving.core.screening import InstanceInput, PreparedImage, RejectedImage, StudyScreener
from tests.conftest import write_synthetic_cxr
from tests.fuzz import crafted

RSS_BUDGET = int(1.5 * GIB)


@pytest.fixture(scope="module")
def pool() -> Iterator[DecodePool]:
    with DecodePool(1, DecodeLimits(file_timeout_s=20.0)) as decode_pool:
        yield decode_pool


@pytest.fixture(scope="module")
def screener(pool: DecodePool) -> StudyScreener:
    return StudyScreener(
        [], manifests=[resolve("cxr-triage"), resolve("endoscopy-polyp")], study_ref_key=b"k", decoder=pool
    )


def _prepare(screener: StudyScreener, data: bytes) -> PreparedImage | RejectedImage:
    return screener.prepare(InstanceInput(data, "case"))


def _rejected(screener: StudyScreener, data: bytes, reason: ReasonCode) -> RejectedImage:
    outcome = _prepare(screener, data)
    assert isinstance(outcome, RejectedImage), "the hostile file was screened"
    assert outcome.reason == reason, outcome.detail
    return outcome


def test_the_valid_crafted_chest_image_is_screened(screener: StudyScreener) -> None:
    # the hostile cases below are this image with one thing changed: it must pass on its own
    assert isinstance(_prepare(screener, crafted.native_chest()), PreparedImage)


# -- bad VOI / Modality LUT and rescale values raised inside to_display -----------------------


@pytest.mark.parametrize("kind", ["short-data", "depth-7", "two-values", "no-data"])
def test_bad_voi_lut_is_decode_failed(screener: StudyScreener, kind: str) -> None:
    _rejected(screener, crafted.bad_voi_lut(kind), ReasonCode.DECODE_FAILED)


@pytest.mark.parametrize("kind", ["short-data", "zero-entries-short"])
def test_bad_modality_lut_is_decode_failed(screener: StudyScreener, kind: str) -> None:
    _rejected(screener, crafted.bad_modality_lut(kind), ReasonCode.DECODE_FAILED)


def test_modality_lut_with_an_odd_entry_depth_is_handled(screener: StudyScreener) -> None:
    # pydicom built dtype "uint12" from the descriptor and raised TypeError
    outcome = _prepare(screener, crafted.bad_modality_lut("depth-12"))
    assert isinstance(outcome, RejectedImage) and outcome.reason == ReasonCode.BLANK_IMAGE  # all-zero LUT


@pytest.mark.parametrize("slope", [b"abc ", b"", b"NaN ", b"1e38"])
def test_bad_rescale_values_are_rejected(screener: StudyScreener, slope: bytes) -> None:
    outcome = _prepare(screener, crafted.bad_rescale(slope))
    assert isinstance(outcome, RejectedImage)
    assert outcome.reason in {ReasonCode.DECODE_FAILED, ReasonCode.CORRUPT_FILE}


@pytest.mark.parametrize(("center", "width"), [(b"40", b"0 "), (b"NaN ", b"400 "), (b"x ", b"400 ")])
def test_bad_window_values_are_rejected(screener: StudyScreener, center: bytes, width: bytes) -> None:
    outcome = _prepare(screener, crafted.bad_window(center, width))
    assert isinstance(outcome, RejectedImage)
    assert outcome.reason in {ReasonCode.DECODE_FAILED, ReasonCode.CORRUPT_FILE}


# -- pydicom's deferred element reads raised later (header_of, prepare, assemble) --------------


def test_deferred_sequence_that_cannot_be_parsed_is_rejected_inside_the_boundary(screener: StudyScreener) -> None:
    data = crafted.deferred_sequence_error()
    with pytest.raises(OSError):  # what pydicom does on first access, wherever that happens
        _ = pydicom.dcmread(io.BytesIO(data)).ReferencedImageSequence
    _rejected(screener, data, ReasonCode.CORRUPT_FILE)


def test_deferred_rows_that_cannot_be_converted_is_corrupt_file(screener: StudyScreener) -> None:
    _rejected(screener, crafted.deferred_rows_error(), ReasonCode.CORRUPT_FILE)


def _raw_or_private(ds: Dataset) -> list[str]:
    found = []
    for tag in ds.keys():
        elem = ds.get_item(tag)
        if isinstance(elem, RawDataElement):
            found.append(f"raw {tag}")
        elif tag.is_private:
            found.append(f"private {tag}")
        elif elem.VR == "SQ":
            for item in elem.value:
                found.extend(_raw_or_private(item))
    return found


def test_evidence_header_holds_no_deferred_reader_private_or_pixel_element(screener: StudyScreener) -> None:
    data = crafted.native_chest(
        extra={
            0x00090010: crafted.text(0x00090010, "LO", "FUZZ"),
            0x00091001: crafted.text(0x00091001, "LO", "PRIVATE VALUE"),
            0x00081140: crafted.elem(0x00081140, "SQ", crafted._ITEM + b"\xff\xff\xff\xff" + crafted._ITEM_END),
        }
    )
    outcome = _prepare(screener, data)
    assert isinstance(outcome, PreparedImage) and outcome.header is not None
    assert _raw_or_private(outcome.header) == []
    assert "PixelData" not in outcome.header
    assert outcome.header.PatientName == "FUZZ^CANARY"  # the SR still gets its patient module


# -- the Rust RLE decoder panicked on one corrupt byte (a BaseException) ----------------------


def test_rle_panic_on_one_corrupt_byte_is_decode_failed(screener: StudyScreener, tmp_path: Path) -> None:
    data = bytearray(write_synthetic_cxr(tmp_path / "rle.dcm", encoding="rle").read_bytes())
    data[27736] = 220
    ds = pydicom.dcmread(io.BytesIO(bytes(data)))
    with pytest.raises(BaseException) as raw:
        _ = ds.pixel_array
    assert type(raw.value).__name__ == "PanicException" and not isinstance(raw.value, Exception)
    _rejected(screener, bytes(data), ReasonCode.DECODE_FAILED)


# -- float64 promotion in windowing (MemoryError under the RSS cap) ---------------------------


def test_display_conversion_works_in_float32_without_float64_copies() -> None:
    rows = cols = 1024
    elements = crafted.chest_elements(rows, cols, bits=16)
    elements[0x00281052] = crafted.elem(0x00281052, "DS", b"-1024 ")
    elements[0x00281053] = crafted.elem(0x00281053, "DS", b"0.5 ")
    elements[0x00281050] = crafted.elem(0x00281050, "DS", b"40")
    elements[0x00281051] = crafted.elem(0x00281051, "DS", b"400 ")
    pixels = (np.arange(rows * cols) % 4096).astype(np.uint16).tobytes()
    ds = pydicom.dcmread(
        io.BytesIO(crafted.assemble(crafted.EXPLICIT, elements, crafted.elem(0x7FE00010, "OW", pixels)))
    )
    header, stored = header_of(ds), ds.pixel_array
    tracemalloc.start()
    try:
        out = to_display(ds, header, stored)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.dtype == np.float32
    # one float32 working array; the float64 path held 12 bytes per pixel at its peak
    assert peak / stored.size < 6


# -- a private sequence of a million empty items hung the parser ------------------------------


@pytest.mark.parametrize(("defined", "private"), [(False, True), (True, False)])
def test_million_empty_sequence_items_hit_the_parser_limit(
    screener: StudyScreener, defined: bool, private: bool
) -> None:
    outcome = _rejected(
        screener, crafted.million_empty_items(defined_length=defined, private=private), ReasonCode.CORRUPT_FILE
    )
    assert "sequence items" in outcome.detail


def test_deep_sequence_nesting_hits_the_depth_limit(screener: StudyScreener) -> None:
    outcome = _rejected(screener, crafted.deep_sequence(10_000), ReasonCode.CORRUPT_FILE)
    assert "nested" in outcome.detail


# -- a 4 MB RLE / deflated file declaring 16384 x 16384 took 5.5-7.6 GB ----------------------


def _peak(pool: DecodePool, data: bytes) -> tuple[ReasonCode | None, int]:
    outcome = pool.prepare(data, RoutePlanner((resolve("cxr-triage").manifest,)))
    reason = getattr(outcome, "reason", None)
    return reason, int(outcome.stats["peak_rss"])


def test_rle_bomb_is_refused_before_decoding_within_the_memory_budget(pool: DecodePool) -> None:
    data = crafted.rle_bomb(16384)
    assert len(data) < 5 * 2**20
    reason, peak = _peak(pool, data)
    assert reason == ReasonCode.IMAGE_TOO_LARGE
    assert 0 < peak < RSS_BUDGET


def test_deflate_bomb_is_refused_while_inflating_within_the_memory_budget(pool: DecodePool) -> None:
    data = crafted.deflate_bomb(16384)
    assert len(data) < 4 * 2**20
    reason, peak = _peak(pool, data)
    assert reason == ReasonCode.IMAGE_TOO_LARGE
    assert 0 < peak < RSS_BUDGET


# -- a failed 10 MB JPEG bomb left ~3 GB resident --------------------------------------------


def test_jpeg_bomb_is_refused_from_its_frame_header_before_the_codec_runs(pool: DecodePool) -> None:
    data = crafted.jpeg_bomb()
    assert len(data) > 10 * 2**20
    outcome = pool.prepare(data, RoutePlanner((resolve("cxr-triage").manifest,)))
    assert getattr(outcome, "reason", None) == ReasonCode.DECODE_FAILED
    assert "frame header" in getattr(outcome, "detail", "")
    assert int(outcome.stats["rss"]) < pool.limits.worker_recycle_rss_bytes  # nothing left resident


# -- aborted worker processes; hangs; allocations past the cap --------------------------------


@dataclass(frozen=True)
class AbortingPlanner:
    """Kills its process from inside the boundary, as a native abort() in a codec would."""

    def __call__(self, header: ImageHeader) -> FramePlan:
        os.abort()


@dataclass(frozen=True)
class SleepingPlanner:
    def __call__(self, header: ImageHeader) -> FramePlan:
        time.sleep(60)
        raise AssertionError("unreachable")


@dataclass(frozen=True)
class SpinningPlanner:
    """Loops forever on the CPU, as a codec stuck in a loop would."""

    def __call__(self, header: ImageHeader) -> FramePlan:
        while True:
            pass


@dataclass(frozen=True)
class GreedyPlanner:
    """Allocates far more than the worker's address-space cap."""

    def __call__(self, header: ImageHeader) -> FramePlan:
        np.ones(8 * GIB // 8, dtype=np.float64)
        raise AssertionError("unreachable")


def test_a_worker_that_aborts_fails_only_its_file_and_is_replaced() -> None:
    good = RoutePlanner((resolve("cxr-triage").manifest,))
    with DecodePool(1) as pool:
        died = pool.prepare(crafted.native_chest(), AbortingPlanner())
        assert getattr(died, "reason", None) == ReasonCode.DECODE_FAILED
        assert getattr(died, "fault", "") == FAULT_WORKER_DIED
        assert pool.stats.worker_deaths == 1
        assert type(pool.prepare(crafted.native_chest(), good)).__name__ == "DecodedInstance"
        assert pool.stats.workers_started == 2


def test_a_hanging_decode_times_out_and_the_next_file_is_served() -> None:
    good = RoutePlanner((resolve("cxr-triage").manifest,))
    with DecodePool(1, DecodeLimits(file_timeout_s=1.0, file_wall_timeout_s=60.0)) as pool:
        spinning = pool.prepare(crafted.native_chest(), SpinningPlanner())  # killed after 1 CPU second
        assert getattr(spinning, "fault", "") == FAULT_TIMEOUT and pool.stats.timeouts == 1
        blocked = DecodePool(1, DecodeLimits(file_timeout_s=1.0, file_wall_timeout_s=3.0))
        with blocked:  # no CPU used: the wall-clock limit ends it
            assert getattr(blocked.prepare(crafted.native_chest(), SleepingPlanner()), "fault", "") == FAULT_TIMEOUT
        assert type(pool.prepare(crafted.native_chest(), good)).__name__ == "DecodedInstance"


def test_an_allocation_past_the_worker_cap_is_a_typed_memory_fault(pool: DecodePool) -> None:
    outcome = pool.prepare(crafted.native_chest(), GreedyPlanner())
    assert getattr(outcome, "reason", None) == ReasonCode.IMAGE_TOO_LARGE
    assert getattr(outcome, "fault", "") == FAULT_MEMORY
    assert pool.stats.worker_deaths == 0  # the cap made it a MemoryError, the worker lived on


# -- found by this suite's own 50,000-case run ----------------------------------------------


def test_deflated_dataset_with_bytes_after_the_stream_end_is_measured_not_looped() -> None:
    import zlib

    from models.limits import inflated_size

    squeezer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = squeezer.compress(bytes(range(256)) * 5000) + squeezer.flush()
    # zlib keeps input after the end of the stream as an "unconsumed tail": the measuring loop
    # re-fed it forever (two 10 s timeouts in the long run)
    assert inflated_size(stream + b"\x00" * 136, 1 << 30) == 256 * 5000


def test_pixel_data_with_an_unknown_vr_is_a_typed_decode_failure() -> None:
    from models.decode import prepare_instance

    data = crafted.native_chest()
    at = data.find(b"\xe0\x7f\x10\x00OB")
    hostile = data[: at + 4] + b"\x4f\x8f" + data[at + 6 :]
    outcome = prepare_instance(hostile, RoutePlanner((resolve("cxr-triage").manifest,)))
    assert getattr(outcome, "reason", None) == ReasonCode.DECODE_FAILED
    assert getattr(outcome, "fault", None) == ""  # typed where it happens, not the last-resort handler
