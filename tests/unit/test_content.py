"""The content check: what the header claims against what the file and its pixels are."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from models.content import check_header_facts, check_pixels, measure
from models.decode import RoutePlanner, prepare_instance
from models.errors import ReasonCode, UnsupportedStudy
from models.manifest import load_manifest
from models.pixels import header_of, load_frames, read_dataset
from models.synthetic.endoscopy import generate_endoscopy_demo
from tests.conftest import relabel_as_chest, write_synthetic_cxr


@pytest.fixture
def chest(tiny_model_dir: Path):
    manifest = load_manifest(tiny_model_dir).manifest
    return manifest.model_copy(update={"accepts": manifest.accepts.model_copy(update={"min_side": 64})})


@pytest.mark.parametrize(
    ("name", "kind"),
    [("MR2_UNCR", "an MR image"), ("693_UNCR", "a CT image"), ("liver", "a segmentation"), ("CT_small", "a CT image")],
)
def test_sop_class_of_another_modality_is_a_content_mismatch(tmp_path: Path, chest, name: str, kind: str) -> None:
    header = header_of(read_dataset(relabel_as_chest(name, tmp_path), header_only=True))
    assert header.modality == "CR" and header.body_part_examined == "CHEST"
    with pytest.raises(UnsupportedStudy) as info:
        check_header_facts(chest, header)
    assert info.value.reason == ReasonCode.CONTENT_MISMATCH
    assert kind in info.value.detail


def test_one_bit_mask_is_refused_even_when_stored_as_a_radiograph(tmp_path: Path, chest) -> None:
    header = header_of(read_dataset(relabel_as_chest("liver", tmp_path, sop_class=True), header_only=True))
    with pytest.raises(UnsupportedStudy, match="1 bit per pixel") as info:
        check_header_facts(chest, header)
    assert info.value.reason == ReasonCode.CONTENT_MISMATCH


@pytest.mark.parametrize("name", ["693_UNCR", "JPGLosslessP14SV1_1s_1f_8b", "mlut_18", "image_dfl"])
def test_pixels_of_ct_ultrasound_and_test_patterns_disagree_with_a_radiograph(chest, name: str) -> None:
    """Pixel statistics alone (the SOP class is not consulted here)."""
    frames = load_frames(str(get_testdata_file(f"{name}.dcm")), frame_indices=[0], target_size=448)
    with pytest.raises(UnsupportedStudy) as info:
        check_pixels(chest, frames)
    assert info.value.reason == ReasonCode.CONTENT_MISMATCH
    assert "limit" in info.value.detail or "at least" in info.value.detail


def test_real_and_synthetic_radiographs_pass_the_content_check(tmp_path: Path, chest, rg1: dict[str, Path]) -> None:
    for path in (rg1["RG1_UNCR"], rg1["RG3_UNCR"], write_synthetic_cxr(tmp_path / "s.dcm", photometric="MONOCHROME1")):
        ds = read_dataset(path)
        check_header_facts(chest, header_of(ds))
        stats = check_pixels(chest, load_frames(path, frame_indices=[0], target_size=448))
        assert stats[0].grey_levels >= 32


def test_colour_model_refuses_a_frame_without_colour(tmp_path: Path, chest) -> None:
    colour = chest.model_copy(
        update={
            "accepts": chest.accepts.model_copy(
                update={"modality": ["ES"], "photometric_interpretation": ["RGB"], "samples_per_pixel": 3}
            ),
            "input": chest.input.model_copy(update={"shape": [-1, 3, 32, 32]}),
        }
    )
    generate_endoscopy_demo(tmp_path / "endo", seed=3)
    frame = load_frames(next((tmp_path / "endo").glob("*.dcm")), frame_indices=[0])[0]
    assert measure(frame).chroma > 0.05
    check_pixels(colour, [frame])
    grey = dataclasses.replace(frame, pixels=np.repeat(frame.pixels.mean(axis=2, keepdims=True), 3, axis=2))
    with pytest.raises(UnsupportedStudy, match="no colour") as info:
        check_pixels(colour, [grey])
    assert info.value.reason == ReasonCode.CONTENT_MISMATCH


def test_decode_boundary_refuses_relabelled_files_before_any_tensor(tmp_path: Path, chest) -> None:
    """The planner the service uses runs the content check inside the decode boundary."""
    planner = RoutePlanner((chest,), 4)
    for name in ("MR2_UNCR", "693_UNCR", "liver", "US1_UNCR", "OBXXXX1A"):
        outcome = prepare_instance(relabel_as_chest(name, tmp_path), planner)
        assert getattr(outcome, "reason", None) == ReasonCode.CONTENT_MISMATCH, name
        assert not hasattr(outcome, "tensors")
    # the same CT pixels stored as a CR: refused on its pixels (blank background)
    outcome = prepare_instance(relabel_as_chest("693_UNCR", tmp_path, sop_class=True), planner)
    assert getattr(outcome, "reason", None) == ReasonCode.CONTENT_MISMATCH
    assert "blank" in outcome.detail  # type: ignore[union-attr]
