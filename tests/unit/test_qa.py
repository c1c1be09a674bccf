"""Input QA and routing: the closest model's reason, never a score for what a model does not accept."""

from __future__ import annotations

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
        ({"body_part": ""}, ReasonCode.UNSUPPORTED_BODY_PART),
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
