"""Typed training configuration. YAML is data: nothing in it is evaluated."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StoreExportConfig(_Strict):
    """``data.source: store``: pull labelled studies from the DICOM store with ``dxassist export``
    (through the configured ``StudySource``, de-identified on the way) before training."""

    #: dxassist settings naming the store, the results database (labels) and ``export.*``
    settings: Path | None = None
    #: file of Study Instance UIDs (one a line) to export
    uids: Path | None = None
    #: or search the store (DICOMweb/DIMSE): modality, StudyDate range YYYYMMDD-YYYYMMDD
    query_modality: str | None = None
    query_dates: str | None = None


class DataConfig(_Strict):
    #: "synthetic"; "store" (export from the DICOM store first, see ``store``); or a folder in
    #: the public dataset's layout (a ``dxassist export`` folder is recognised as such)
    source: str = "synthetic"
    store: StoreExportConfig = StoreExportConfig()
    train_seed: int = 11
    n_train: int = 3000
    test_seed: int = 2027
    n_test: int = 600
    image_size: tuple[int, int] = (512, 512)
    val_fraction: float = Field(default=0.2, gt=0, lt=1)


class OptimConfig(_Strict):
    epochs: int = Field(default=5, ge=1)
    batch_size: int = Field(default=16, ge=1)
    lr: float = 1e-3
    bf16: bool = True
    seed: int = 0
    threads: int = 2


class OperatingPointConfig(_Strict):
    target_sensitivity: float = Field(default=0.95, gt=0, lt=1)


class OodConfig(_Strict):
    """The out-of-distribution gate fitted after export (models/ood.py, training/ood_fit.py)."""

    #: share of the validation split the distance limit must accept
    acceptance: float = Field(default=0.99, gt=0.5, lt=1)
    #: principal directions of the feature covariance kept exactly
    components: int = Field(default=256, ge=1)
    #: the limit is ``margin`` x the validation distance at ``acceptance`` (1.0: exactly that
    #: quantile); above 1 it leaves room for acquisition variation the network was trained to
    #: tolerate but the un-augmented training images do not show
    margin: float = Field(default=1.0, ge=1.0, le=3.0)


class TrainConfig(_Strict):
    model_id: str
    version: str
    data: DataConfig = DataConfig()
    train: OptimConfig = OptimConfig()
    operating_point: OperatingPointConfig = OperatingPointConfig()
    ood: OodConfig = OodConfig()
    int8: bool = False
    manifest: dict[str, Any]  # static manifest parts: name, intended_use, accepts, input, outputs, labels

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        data = yaml.safe_load(Path(path).read_text())
        for dotted, value in overrides.items():
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = value
        return cls.model_validate(data)


def optimiser_and_schedule(params, cfg: TrainConfig, steps_per_epoch: int):  # type: ignore[no-untyped-def]
    """AdamW + one-cycle LR, the recipe both reference models use (import torch lazily)."""
    import torch

    optim = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=1e-4)
    steps = cfg.train.epochs * max(1, steps_per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(optim, max_lr=cfg.train.lr, total_steps=steps, pct_start=0.15)
    return optim, sched
