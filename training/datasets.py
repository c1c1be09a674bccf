"""Labelled datasets in the public datasets' layouts, read through the models' own pipeline.

* ``ChestXray14Dataset``: a folder of images + ``Data_Entry.csv`` (NIH ChestX-ray14 columns).
  Labels are aligned to ``LABELS`` with 1/0 (NaN where the source cannot say).
* ``KvasirSegDataset``: ``images/`` + ``masks/`` folders (Kvasir-SEG layout) of DICOM frames
  and PNG masks.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from models.synthetic.cxr import LABELS, label_vector


@dataclass
class ChestXray14Dataset:
    root: Path
    files: list[Path]
    labels: NDArray[np.float32]
    views: list[str]
    label_keys: tuple[str, ...] = LABELS

    @classmethod
    def from_folder(
        cls,
        root: Path,
        csv_name: str = "Data_Entry.csv",
        views: tuple[str, ...] = ("PA", "AP"),
        label_keys: tuple[str, ...] = LABELS,
    ) -> ChestXray14Dataset:
        """Read the folder; label vectors follow ``label_keys`` (the model's manifest order)."""
        files, labels, view_list = [], [], []
        with (root / csv_name).open(newline="") as fh:
            for row in csv.DictReader(fh):
                view = row.get("View Position", "")
                if views and view not in views:
                    continue
                files.append(root / row["Image Index"])
                labels.append(label_vector(row["Finding Labels"], label_keys))
                view_list.append(view)
        return cls(root=root, files=files, labels=np.stack(labels), views=view_list, label_keys=label_keys)

    def __len__(self) -> int:
        return len(self.files)

    def records(self) -> list[dict[str, object]]:
        """MONAI-style list of dicts: {"image": path, "label": vector}."""
        return [{"image": str(f), "label": lab} for f, lab in zip(self.files, self.labels, strict=True)]

    def split(self, val_fraction: float, seed: int) -> tuple[ChestXray14Dataset, ChestXray14Dataset]:
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self))
        n_val = round(len(self) * val_fraction)
        val, train = order[:n_val], order[n_val:]

        def take(idx: NDArray) -> ChestXray14Dataset:
            return ChestXray14Dataset(
                self.root, [self.files[i] for i in idx], self.labels[idx], [self.views[i] for i in idx], self.label_keys
            )

        return take(train), take(val)


@dataclass
class KvasirSegDataset:
    root: Path
    images: list[Path]
    masks: list[Path]

    @classmethod
    def from_folder(cls, root: Path) -> KvasirSegDataset:
        images = sorted((root / "images").glob("*.dcm"))
        masks = [root / "masks" / (p.stem + ".png") for p in images]
        missing = [m.name for m in masks if not m.exists()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} masks missing, e.g. {missing[0]}")
        return cls(root=root, images=images, masks=masks)

    def __len__(self) -> int:
        return len(self.images)

    def records(self) -> list[dict[str, object]]:
        return [{"image": str(i), "mask": str(m)} for i, m in zip(self.images, self.masks, strict=True)]
