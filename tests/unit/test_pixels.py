"""The shared DICOM pixel pipeline: transfer syntaxes, LUTs, photometrics, reduced J2K, bad input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from models.cxr_triage.preprocess import cxr_v1
from models.errors import InvalidDicom, InvalidPixelData, ReasonCode
from models.pixels import (
    choose_reduction,
    decode_frames,
    header_of,
    letterbox,
    load_frames,
    parse_j2k_codestream,
    read_dataset,
)
from tests.conftest import write_synthetic_cxr


def _file(name: str) -> Path:
    path = get_testdata_file(name)
    assert path, name
    return Path(str(path))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",  # RLE lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
        "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
        "MR_small_bigendian.dcm",  # explicit VR big endian
        "MR_small_implicit.dcm",  # implicit VR little endian
    ],
)
def test_lossless_encodings_decode_identically(name: str) -> None:
    reference = load_frames(_file("MR_small.dcm"))[0].pixels
    np.testing.assert_array_equal(load_frames(_file(name))[0].pixels, reference)


@pytest.mark.parametrize(
    ("name", "channels"),
    [
        ("JPGExtended.dcm", 1),  # JPEG extended 12-bit
        ("JPEG-LL.dcm", 1),  # JPEG lossless process 14
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", 1),  # JPEG lossless SV1
        ("SC_rgb_jpeg_dcmtk.dcm", 3),  # JPEG baseline YBR -> RGB
        ("image_dfl.dcm", 1),  # deflated explicit VR LE
        ("JPEG2000.dcm", 1),
        ("SC_ybr_full_422_uncompressed.dcm", 3),
        ("examples_palette.dcm", 3),  # PALETTE COLOR expanded
    ],
)
def test_transfer_syntaxes_and_photometrics_decode_to_unit_range(name: str, channels: int) -> None:
    frame = load_frames(_file(name))[0]
    assert frame.pixels.dtype == np.float32
    assert (frame.pixels.ndim == 2) == (channels == 1)
    assert 0.0 <= frame.pixels.min() and frame.pixels.max() <= 1.0
    assert frame.pixels.std() > 0.01


def test_ybr_jpeg_is_converted_to_rgb() -> None:
    # the dcmtk JPEG and the uncompressed RGB reference hold the same picture
    jpeg = load_frames(_file("SC_rgb_jpeg_dcmtk.dcm"))[0].pixels
    raw = load_frames(_file("SC_rgb.dcm"))[0].pixels
    assert np.abs(jpeg - raw).mean() < 0.02


def test_multiframe_by_index() -> None:
    path = _file("SC_rgb_rle_2frame.dcm")
    both = load_frames(path)
    assert [f.frame_index for f in both] == [0, 1]
    second = load_frames(path, frame_indices=[1])[0]
    np.testing.assert_array_equal(second.pixels, both[1].pixels)
    assert not np.array_equal(both[0].pixels, both[1].pixels)
    with pytest.raises(InvalidPixelData, match="out of range"):
        load_frames(path, frame_indices=[2])


def test_monochrome1_is_inverted_so_bright_means_dense(tmp_path: Path) -> None:
    m2 = write_synthetic_cxr(tmp_path / "m2.dcm", photometric="MONOCHROME2", seed=3)
    m1 = write_synthetic_cxr(tmp_path / "m1.dcm", photometric="MONOCHROME1", seed=3)
    a, b = load_frames(m2)[0].pixels, load_frames(m1)[0].pixels
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.99
    # the mediastinum (centre column) is dense: bright in both
    assert a[200:300, 250:262].mean() > a[200:300, 140:160].mean()
    assert b[200:300, 250:262].mean() > b[200:300, 140:160].mean()


def test_rescale_slope_intercept_is_applied_before_window(tmp_path: Path) -> None:
    plain = load_frames(write_synthetic_cxr(tmp_path / "a.dcm", seed=4, rescale=False))[0].pixels
    rescaled = load_frames(write_synthetic_cxr(tmp_path / "b.dcm", seed=4, rescale=True))[0].pixels
    # same stored values; the window is written in rescaled units: display must agree
    np.testing.assert_allclose(plain, rescaled, atol=2e-3)


def test_percentile_window_when_header_has_none(tmp_path: Path) -> None:
    frame = load_frames(write_synthetic_cxr(tmp_path / "nw.dcm", seed=6, window=False))[0]
    assert frame.pixels.min() == 0.0 and frame.pixels.max() == 1.0


def test_voi_lut_sequence_and_modality_lut_sequence() -> None:
    voi = load_frames(_file("vlut_04.dcm"))[0].pixels
    assert 0.0 <= voi.min() and voi.max() <= 1.0 and voi.std() > 0.01
    mlut = load_frames(_file("mlut_18.dcm"))[0].pixels
    assert 0.0 <= mlut.min() and mlut.max() <= 1.0 and mlut.std() > 0.01


@pytest.mark.parametrize("encoding", ["deflate", "rle", "j2k"])
def test_own_lossless_encodings_match_uncompressed(tmp_path: Path, encoding: str) -> None:
    ref = load_frames(write_synthetic_cxr(tmp_path / "ref.dcm", seed=8, bits=16))[0].pixels
    other = load_frames(write_synthetic_cxr(tmp_path / f"{encoding}.dcm", seed=8, bits=16, encoding=encoding))[0].pixels
    np.testing.assert_array_equal(ref, other)


def test_j2k_reduced_resolution_decode_matches_full_decode_after_resize(rg1: dict[str, Path]) -> None:
    ds = read_dataset(rg1["RG1_J2KR"])
    reduced = decode_frames(ds, target_size=448)[0]  # cxr_v1's decode size: twice its 224 input
    full = decode_frames(ds)[0]
    assert reduced.reduction == 2 and full.reduction == 0
    assert reduced.pixels.shape == (489, 461)
    a, b = cxr_v1(reduced), cxr_v1(full)
    diff = np.abs(a - b)
    assert diff.mean() < 0.01
    assert np.percentile(diff, 99) < 0.05  # only sharp edges differ (wavelet vs area filter)


def test_j2k_reduction_stops_at_target_and_at_levels() -> None:
    info = parse_j2k_codestream(
        b"\xff\x4f\xff\x51\x00\x29\x00\x00"
        + (1841).to_bytes(4, "big")
        + (1955).to_bytes(4, "big")
        + bytes(8)
        + bytes(16)
        + (1).to_bytes(2, "big")
        + bytes([14, 1, 1])
        + b"\xff\x52\x00\x0c\x00\x00\x00\x01\x00\x05\x04\x04\x00\x00"
        + b"\xff\x90"
    )
    assert (info.width, info.height, info.precision, info.levels) == (1841, 1955, 15, 5)
    assert choose_reduction(info, 224) == 3  # 1955/8 = 245 >= 224, 1955/16 = 123 < 224
    assert choose_reduction(info, 2000) == 0
    assert choose_reduction(info, 16) == 5  # capped by the decomposition levels


def test_letterbox_keeps_aspect_and_centres() -> None:
    img = np.ones((100, 50), np.float32)
    out = letterbox(img, 64)
    assert out.shape == (64, 64)
    assert out[:, :16].max() == 0.0 and out[:, -16:].max() == 0.0 and out[:, 16:48].min() > 0.999


# ---- bad input: typed errors with reason codes, nothing crashes ---------------------------


def test_zero_byte_and_random_bytes_are_not_dicom() -> None:
    for payload in (b"", b"\x89PNG\r\n\x1a\n" + bytes(500), np.random.default_rng(0).bytes(4096)):
        with pytest.raises(InvalidDicom) as info:
            read_dataset(payload)
        assert info.value.reason == ReasonCode.NOT_DICOM


def test_file_without_preamble_is_refused_not_forced() -> None:
    with pytest.raises(InvalidDicom) as info:
        read_dataset(_file("no_meta.dcm"))
    assert info.value.reason == ReasonCode.NOT_DICOM


@pytest.mark.parametrize("fraction", [0.02, 0.2, 0.6, 0.97])
def test_truncated_file_is_rejected_with_reason(tmp_path: Path, fraction: float) -> None:
    whole = write_synthetic_cxr(tmp_path / "whole.dcm").read_bytes()
    cut = whole[: int(len(whole) * fraction)]
    with pytest.raises((InvalidDicom, InvalidPixelData)) as info:
        load_frames(cut)
    assert info.value.reason in {ReasonCode.CORRUPT_FILE, ReasonCode.DECODE_FAILED, ReasonCode.NOT_DICOM}


def test_no_pixel_data_is_rejected() -> None:
    with pytest.raises(InvalidPixelData) as info:
        load_frames(_file("rtplan.dcm"))
    assert info.value.reason == ReasonCode.NO_PIXEL_DATA


def test_corrupt_j2k_stream_is_decode_failed(rg1: dict[str, Path]) -> None:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(rg1["RG1_J2KR"])
    # a codestream whose main header is garbage after SOC+SIZ
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + np.random.default_rng(1).bytes(5000)])
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(InvalidPixelData) as info:
        load_frames(buf.getvalue())
    assert info.value.reason == ReasonCode.DECODE_FAILED


def test_blank_image_is_rejected(tmp_path: Path) -> None:
    path = write_synthetic_cxr(tmp_path / "blank.dcm")
    ds = pydicom.dcmread(path)
    ds.PixelData = np.full((ds.Rows, ds.Columns), 700, np.uint16).tobytes()
    del ds.WindowCenter, ds.WindowWidth
    ds.save_as(path)
    with pytest.raises(InvalidPixelData) as info:
        load_frames(path)
    assert info.value.reason == ReasonCode.BLANK_IMAGE


def test_oversized_dimensions_are_refused_before_decoding(tmp_path: Path) -> None:
    path = write_synthetic_cxr(tmp_path / "huge.dcm")
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns, ds.NumberOfFrames = 65535, 65535, 1
    ds.save_as(path)
    with pytest.raises(InvalidPixelData) as info:
        load_frames(path)
    assert info.value.reason == ReasonCode.IMAGE_TOO_LARGE


def test_unsupported_transfer_syntax_is_refused(tmp_path: Path) -> None:
    path = write_synthetic_cxr(tmp_path / "mpeg.dcm")
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264
    header = header_of(ds)
    from models.pixels import check_decodable

    with pytest.raises(InvalidPixelData) as info:
        check_decodable(header)
    assert info.value.reason == ReasonCode.UNSUPPORTED_TRANSFER_SYNTAX


def test_error_messages_carry_no_patient_values(tmp_path: Path) -> None:
    path = write_synthetic_cxr(tmp_path / "p.dcm", patient_name="ZZCANARY^PHI")
    ds = pydicom.dcmread(path)
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(path)
    with pytest.raises((InvalidDicom, InvalidPixelData)) as info:
        load_frames(path)
    text = str(info.value)
    for secret in ("ZZCANARY", "CANARY-123", str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)):
        assert secret not in text


# ---- limits: size before work, parser limits, codestream headers ----------------------------


def test_inflated_size_streams_and_stops_past_the_limit() -> None:
    import tracemalloc
    import zlib

    from models.limits import inflated_size

    squeezer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    bomb = b"".join(squeezer.compress(bytes(1 << 20)) for _ in range(64)) + squeezer.flush()  # 64 MiB of zeros
    assert len(bomb) < 100_000
    tracemalloc.start()
    try:
        with pytest.raises(InvalidDicom) as info:
            inflated_size(bomb, 16 << 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.reason == ReasonCode.IMAGE_TOO_LARGE
    assert peak < 8 << 20  # measured in 1 MiB chunks, never inflated whole
    assert inflated_size(bomb, 64 << 20) == 64 << 20


def test_decode_estimate_refuses_what_the_budget_cannot_hold() -> None:
    from models.limits import DEFAULT_LIMITS, check_decode_budget, decode_estimate

    def estimate(side: int, bits: int = 16, spp: int = 1) -> int:
        return decode_estimate(
            rows=side, columns=side, samples_per_pixel=spp, bits_allocated=bits, frames_decoded=1, file_bytes=0
        )

    check_decode_budget(estimate(4300), DEFAULT_LIMITS)  # the largest chest detectors
    check_decode_budget(estimate(1080, bits=8, spp=3), DEFAULT_LIMITS)  # HD endoscopy
    with pytest.raises(InvalidPixelData) as info:
        check_decode_budget(estimate(16384, bits=8), DEFAULT_LIMITS)
    assert info.value.reason == ReasonCode.IMAGE_TOO_LARGE


def test_parse_guard_limits_sequence_items_and_depth(tmp_path: Path) -> None:
    from models.limits import DecodeLimits
    from tests.fuzz import crafted

    few_items = DecodeLimits(max_sequence_items=50)
    with pytest.raises(InvalidDicom, match="more than 50 sequence items"):
        read_dataset(crafted.million_empty_items(items=100), limits=few_items)
    shallow = DecodeLimits(max_sequence_depth=5)
    read_dataset(crafted.deep_sequence(5), limits=shallow)
    with pytest.raises(InvalidDicom, match="nested deeper than 5"):
        read_dataset(crafted.deep_sequence(6), limits=shallow)
    # outside a guard (training, SR building) pydicom parses as it always did
    pydicom.dcmread(io.BytesIO(crafted.million_empty_items(items=100)))


def test_compressed_frame_header_must_agree_with_rows_and_columns() -> None:
    from tests.fuzz import crafted

    for data in (crafted.jpeg_bomb(scan_bytes=1000), crafted._codestream_mismatch_j2k()):
        with pytest.raises(InvalidPixelData, match="frame header refused") as info:
            load_frames(data)
        assert info.value.reason == ReasonCode.DECODE_FAILED


def test_stream_source_is_read_no_further_than_the_file_limit() -> None:
    from models.limits import DecodeLimits
    from models.pixels import read_source

    stream = io.BytesIO(bytes(5000))
    with pytest.raises(InvalidDicom) as info:
        read_source(stream, DecodeLimits(max_file_bytes=4096))
    assert info.value.reason == ReasonCode.IMAGE_TOO_LARGE
    assert stream.tell() == 4097


def test_header_values_outside_their_dicom_range_are_corrupt() -> None:
    from tests.fuzz import crafted

    ds = read_dataset(
        crafted.native_chest(extra={0x00280010: crafted.elem(0x00280010, "UL", (70000).to_bytes(4, "little"))})
    )
    with pytest.raises(InvalidDicom, match="Rows outside") as info:
        header_of(ds)
    assert info.value.reason == ReasonCode.CORRUPT_FILE
