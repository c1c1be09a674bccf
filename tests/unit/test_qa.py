"""Input QA and routing: the closest model's reason, never a score for what a model does not accept."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from models.errors import ReasonCode, UnsupportedStudy
from models.manifest import load_manifest
from models.pixels import header_of, read_dataset
from models.qa import route
from tests.conftest import write_synthetic_cxr


@pytest.fixture
def manifests(tiny_model_dir: Path) -> list:
    chest = load_manifest(tiny_model_dir).manifest
    colour = chest.model_copy(
        update={
            "id": "tiny-colour",
            "accepts": chest.accepts.model_copy(
                update={
                    "modality": ["ES"],
                    "photometric_interpretation": ["RGB"],
                    "samples_per_pixel": 3,
                    "body_part_examined": [],
                }
            ),
        }
    )
    return [colour, chest]


def _header(path: Path):
    return header_of(read_dataset(path, header_only=True))


def test_chest_radiograph_routes_to_chest_model(tmp_path: Path, manifests: list) -> None:
    assert route(_header(write_synthetic_cxr(tmp_path / "c.dcm")), manifests).id == "tiny-test"


def test_lower_leg_gets_body_part_reason_not_modality(rg1: dict[str, Path], manifests: list) -> None:
    with pytest.raises(UnsupportedStudy) as info:
        route(_header(rg1["RG3_UNCR"]), manifests)
    assert info.value.reason == ReasonCode.UNSUPPORTED_BODY_PART
    assert "'EXTREMITY'" in info.value.detail and "tiny-test@0.1.0" in info.value.detail


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"view": "LL"}, ReasonCode.UNSUPPORTED_VIEW),
        ({"view": ""}, ReasonCode.UNSUPPORTED_VIEW),
        ({"body_part": "ABDOMEN"}, ReasonCode.UNSUPPORTED_BODY_PART),
        ({"modality": "CT"}, ReasonCode.UNSUPPORTED_MODALITY),
        ({"size": (200, 200)}, ReasonCode.IMAGE_TOO_SMALL),
    ],
)
def test_rejection_reasons(tmp_path: Path, manifests: list, kwargs: dict, reason: ReasonCode) -> None:
    path = write_synthetic_cxr(tmp_path / "x.dcm", **kwargs)
    manifests[1] = manifests[1].model_copy(
        update={"accepts": manifests[1].accepts.model_copy(update={"min_side": 256})}
    )
    with pytest.raises(UnsupportedStudy) as info:
        route(_header(path), manifests)
    assert info.value.reason == reason


def test_no_models_configured(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedStudy, match="no model is configured"):
        route(_header(write_synthetic_cxr(tmp_path / "c.dcm")), [])


@pytest.mark.parametrize(
    "change",
    [
        {"modality": "cr"},
        {"view_position": "pa"},
        {"modality": " Cr ", "view_position": "Pa"},
        {"body_part_examined": "chest"},
        {"body_part_examined": "THORAX"},
        {"body_part_examined": "Torax"},
        {"body_part_examined": "TÓRAX"},
        {"body_part_examined": ""},
        {"photometric_interpretation": "monochrome2"},
    ],
)
def test_header_values_are_case_insensitive_and_tolerant(tmp_path: Path, manifests: list, change: dict) -> None:
    header = dataclasses.replace(_header(write_synthetic_cxr(tmp_path / "c.dcm")), **change)
    assert route(header, manifests).id == "tiny-test"


def test_site_aliases_extend_the_defaults(tmp_path: Path, manifests: list) -> None:
    header = dataclasses.replace(_header(write_synthetic_cxr(tmp_path / "c.dcm")), body_part_examined="RINTAKEHÄ")
    with pytest.raises(UnsupportedStudy) as info:
        route(header, manifests)
    assert info.value.reason == ReasonCode.UNSUPPORTED_BODY_PART
    assert route(header, manifests, body_part_aliases={"rintakehä": "CHEST"}).id == "tiny-test"


@pytest.mark.parametrize("field", ["modality", "body_part_examined", "view_position", "photometric_interpretation"])
def test_reason_details_never_quote_an_unknown_header_value(tmp_path: Path, manifests: list, field: str) -> None:
    """A corrupt attribute can carry anything (a Modality once swallowed PatientName)."""
    canary = "ZZCANARY^PHI"
    header = dataclasses.replace(_header(write_synthetic_cxr(tmp_path / "c.dcm")), **{field: canary})
    with pytest.raises(UnsupportedStudy) as info:
        route(header, manifests)
    assert "ZZCANARY" not in info.value.detail.upper() and "PHI" not in info.value.detail
    assert "unrecognised value" in info.value.detail
