"""MONAI transforms around the models' own preprocessing (wrapped, never copied) plus training-only
augmentation."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandScaleIntensityd,
)

from models.pixels import load_frames
from models.preprocessing import get_pipeline


class ApplyModelPreprocessd(MapTransform):
    """Read a DICOM path with ``models.pixels`` and apply a model's registered preprocessing.

    ``data[key]`` is a path; it becomes the model input array ``(C, H, W)`` float32, exactly as
    the serving predictor would receive it.
    """

    def __init__(self, keys: KeysCollection, preprocessing: str, frame_index: int = 0) -> None:
        super().__init__(keys)
        self.pipeline = get_pipeline(preprocessing)
        self.frame_index = frame_index

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            frame = load_frames(d[key], frame_indices=[self.frame_index], target_size=self.pipeline.decode_size)[0]
            d[key] = self.pipeline(frame)
        return d


def cxr_train_augment() -> Compose:
    """Geometric and exposure jitter a radiograph can plausibly have. No flips: laterality matters."""
    return Compose(
        [
            RandAffined(
                keys="image",
                prob=0.7,
                rotate_range=0.07,
                scale_range=0.07,
                translate_range=(8, 8),
                padding_mode="zeros",
            ),
            RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.8, 1.25)),
            RandGaussianNoised(keys="image", prob=0.3, std=0.01),
        ]
    )


def polyp_train_augment() -> Compose:
    return Compose(
        [
            RandFlipd(keys=("image", "mask"), prob=0.5, spatial_axis=1),
            RandFlipd(keys=("image", "mask"), prob=0.5, spatial_axis=0),
            RandAffined(
                keys=("image", "mask"),
                prob=0.5,
                rotate_range=0.3,
                scale_range=0.1,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys="image", prob=0.3, factors=0.15),
        ]
    )


def as_float_image(x: np.ndarray) -> np.ndarray:
    return np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
