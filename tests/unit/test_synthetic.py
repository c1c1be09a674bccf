"""The synthetic generators: labels are exactly what was constructed, output is deterministic,
and the files are valid DICOM in the layouts of the public datasets."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from models.pixels import load_frames
from models.synthetic.cxr import LABELS, generate_cxr_dataset, label_vector, render_cxr
from models.synthetic.endoscopy import generate_kvasir_folder


def test_every_requested_finding_is_labelled() -> None:
    rng = np.random.default_rng(0)
    seen = dict.fromkeys(LABELS, 0)
    for _ in range(60):
        want = {k: bool(rng.random() < 0.3) for k in LABELS}
        _, case = render_cxr(rng, (256, 256), want)
        for key in LABELS:
            if key == "consolidation" and want[key] and not case.labels[key]:
                continue  # a patch can fall entirely outside the lung: then it is not there
            assert case.labels[key] == int(want[key]), key
            seen[key] += case.labels[key]
    assert all(n > 5 for n in seen.values()), seen


def test_cxr_dataset_is_deterministic_and_chestxray14_shaped(tmp_path: Path) -> None:
    a = generate_cxr_dataset(tmp_path / "a", 4, seed=9, size=(256, 256))
    b = generate_cxr_dataset(tmp_path / "b", 4, seed=9, size=(256, 256))
    assert a.read_text() == b.read_text()
    rows = list(csv.DictReader(a.read_text().splitlines()))
    assert {"Image Index", "Finding Labels", "View Position"} <= rows[0].keys()
    for row in rows:
        assert label_vector(row["Finding Labels"]).shape == (len(LABELS),)
        np.testing.assert_array_equal(
            load_frames(tmp_path / "a" / row["Image Index"])[0].pixels,
            load_frames(tmp_path / "b" / row["Image Index"])[0].pixels,
        )


def test_kvasir_layout_masks_match_labels(tmp_path: Path) -> None:
    import cv2

    out = generate_kvasir_folder(tmp_path / "k", 6, seed=3, size=128)
    for row in csv.DictReader((out / "labels.csv").read_text().splitlines()):
        mask = cv2.imread(str(out / "masks" / f"{row['image']}.png"), cv2.IMREAD_GRAYSCALE)
        assert bool(mask.any()) == (row["polyp"] == "1")
        assert load_frames(out / "images" / f"{row['image']}.dcm")[0].pixels.shape == (128, 128, 3)
