"""Fixtures of the model-lifecycle tests: a folder of the "site's own" chest studies (synthetic
phantoms, labelled ChestX-ray14-style) and an import spec writer. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from models.synthetic.cxr import generate_cxr_dataset


@pytest.fixture(scope="session")
def site_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 in-distribution chest radiographs (the OOD fit folder)."""
    folder = tmp_path_factory.mktemp("site") / "unlabelled"
    generate_cxr_dataset(folder, 20, seed=5, size=(256, 256))
    return folder


def chest_spec(model_id: str, version: str, labels: list[str], **overrides: Any) -> dict[str, Any]:
    """An import spec for a 1-channel chest model with the given label keys."""
    codes = {
        "pneumothorax": ("36118008", "Pneumothorax", "3120008", "Pleural membrane structure"),
        "pleural_effusion": ("60046008", "Pleural effusion", "3120008", "Pleural membrane structure"),
        "cardiomegaly": ("8186001", "Cardiomegaly", "80891009", "Heart structure"),
    }
    spec: dict[str, Any] = {
        "id": model_id,
        "version": version,
        "name": "vendor chest model",
        "intended_use": "Worklist prioritisation aid for adult frontal chest radiographs (test).",
        "accepts": {
            "modality": ["CR", "DX"],
            "body_part_examined": ["CHEST", "THORAX"],
            "view_position": ["PA", "AP"],
            "photometric_interpretation": ["MONOCHROME1", "MONOCHROME2"],
            "samples_per_pixel": 1,
            "min_side": 128,
        },
        "input": {"preprocessing": "cxr_v1"},
        "labels": [
            {
                "key": key,
                "display": codes[key][1],
                "code": {"scheme": "SCT", "value": codes[key][0], "meaning": codes[key][1]},
                "body_site": {"scheme": "SCT", "value": codes[key][2], "meaning": codes[key][3]},
            }
            for key in labels
        ],
        "trained_on": "random initial weights (test fixture)",
        "source": "test fixture",
    }
    spec.update(overrides)
    return spec


def write_spec(path: Path, spec: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path
