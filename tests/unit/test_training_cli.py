"""The training CLI's ``--set`` overrides: YAML values, validated by the typed config."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from pydantic import ValidationError

from training.cli import parse_overrides
from training.config import TrainConfig

REPO = Path(__file__).resolve().parents[2]


def test_set_reads_words_starting_with_t_or_f_as_text() -> None:
    # the old parser sent every value starting with t or f to json.loads ("tiny", "folder" crashed)
    assert parse_overrides(["data.source=folder", "model_id=tiny-cxr"]) == {
        "data.source": "folder",
        "model_id": "tiny-cxr",
    }


def test_set_reads_booleans_numbers_and_lists() -> None:
    got = parse_overrides(["train.bf16=false", "data.n_train=64", "train.lr=0.0005", "data.image_size=[64, 64]"])
    assert got == {"train.bf16": False, "data.n_train": 64, "train.lr": 0.0005, "data.image_size": [64, 64]}


def test_set_without_equals_is_a_usage_error() -> None:
    with pytest.raises(typer.BadParameter, match="KEY=VALUE"):
        parse_overrides(["data.n_train"])


def test_overrides_are_validated_by_the_config() -> None:
    config = REPO / "configs/training/cxr_triage.yaml"
    cfg = TrainConfig.from_yaml(config, **parse_overrides(["data.n_train=64", "train.bf16=false"]))
    assert cfg.data.n_train == 64 and cfg.train.bf16 is False
    with pytest.raises(ValidationError):
        TrainConfig.from_yaml(config, **parse_overrides(["train.epochs=0"]))
