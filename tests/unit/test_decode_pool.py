"""The decode pool: same outputs as in-process decoding, selection by setting, stream sources."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from models.decode import DecodedInstance, DecodeRejection, RoutePlanner
from models.decode_pool import DecodePool, InlineDecoder, make_decoder
from models.errors import ReasonCode
from models.limits import DecodeLimits
from models.registry import resolve
from serving.online.factory import build_screener
from serving.settings import Settings
from tests.conftest import write_synthetic_cxr


@pytest.fixture(scope="module")
def planner() -> RoutePlanner:
    return RoutePlanner((resolve("cxr-triage").manifest, resolve("endoscopy-polyp").manifest))


def test_pool_and_in_process_decoding_give_identical_model_inputs(
    rg1: dict[str, Path], planner: RoutePlanner, tmp_path: Path
) -> None:
    files = [rg1["RG1_J2KR"], rg1["RG1_UNCR"], write_synthetic_cxr(tmp_path / "m1.dcm", photometric="MONOCHROME1")]
    inline = InlineDecoder()
    with DecodePool(1) as pool:
        for path in files:
            a, b = inline.prepare(path, planner), pool.prepare(path, planner)
            assert isinstance(a, DecodedInstance) and isinstance(b, DecodedInstance)
            assert a.tensors.dtype == b.tensors.dtype == np.float32
            np.testing.assert_array_equal(a.tensors, b.tensors)
            assert (a.study_instance_uid, a.image_shape, a.model_id) == (
                b.study_instance_uid,
                b.image_shape,
                b.model_id,
            )
            assert a.evidence == b.evidence


def test_stream_sources_are_read_in_the_parent_within_the_file_limit(planner: RoutePlanner, tmp_path: Path) -> None:
    data = write_synthetic_cxr(tmp_path / "s.dcm").read_bytes()
    with DecodePool(1, DecodeLimits(max_file_bytes=len(data) - 1)) as pool:
        outcome = pool.prepare(io.BytesIO(data), planner)
        assert isinstance(outcome, DecodeRejection) and outcome.reason == ReasonCode.IMAGE_TOO_LARGE
        assert pool.stats.workers_started == 0  # refused before any worker was needed


def test_isolation_is_chosen_by_setting() -> None:
    default = make_decoder()
    assert isinstance(default, DecodePool)  # safe by default
    assert isinstance(make_decoder("inline"), InlineDecoder)
    pool = make_decoder("process", workers=3)
    assert isinstance(pool, DecodePool) and pool.workers == 3
    with pytest.raises(ValueError, match="unknown decode isolation"):
        make_decoder("threads")
    settings = Settings.model_validate({"models": [{"id": "cxr-triage"}], "screening": {"decode_isolation": "inline"}})
    assert isinstance(build_screener(settings, sessions=False).decoder, InlineDecoder)
