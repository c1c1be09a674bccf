"""The data provenance a training run records (training/provenance.py), without training: the
kind comes from the data, counts and the de-identification state from the files, and the dataset
manifest's digest is stable for the same data and changes when a label or a file does."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import pydicom

from models.manifest import DataKindValues
from models.synthetic.cxr import LABELS, generate_cxr_dataset
from models.synthetic.endoscopy import generate_kvasir_folder
from training.config import TrainConfig
from training.datasets import ChestXray14Dataset
from training.provenance import DataItem, card_banner, card_section, data_kind, describe_data, trained_on_text
from training.train_polyp import measure_data, split_records

REPO = Path(__file__).resolve().parents[2]


def _items(ds: ChestXray14Dataset) -> list[DataItem]:
    return [
        DataItem("train", f, dict(zip(LABELS, (int(v) for v in vec), strict=True)))
        for f, vec in zip(ds.files, ds.labels, strict=True)
    ]


def test_a_plain_folder_is_measured_and_called_not_deidentified(tmp_path: Path) -> None:
    folder = tmp_path / "site"
    generate_cxr_dataset(folder, 6, seed=3, size=(128, 128), prevalence=0.5)
    assert data_kind(str(folder), folder) is DataKindValues.FOLDER
    ds = ChestXray14Dataset.from_folder(folder)
    items = _items(ds)
    data = describe_data(
        DataKindValues.FOLDER, folder, items, LABELS, description="test folder", manifest_path=tmp_path / "m1.csv"
    )
    assert data.images == 6 and data.splits == {"train": 6, "validation": 0, "test": 0}
    assert {k: v["train"] for k, v in data.positives.items()} == {
        k: int(ds.labels[:, i].sum()) for i, k in enumerate(LABELS)
    }
    assert sum(data.modalities.values()) == 6 and sum(data.manufacturers.values()) == 6
    assert data.deidentification.startswith("NOT known to be de-identified: PatientIdentityRemoved YES on 0 of 6")
    assert trained_on_text(data).startswith("folder: test folder; ")
    assert "Trained on" in card_banner(data) and "synthetic" not in card_banner(data)
    assert "| images | 6 | 0 | 0 |" in card_section(data)
    # the same data, the same digest; a relabelled image or a changed file changes it
    again = describe_data(
        DataKindValues.FOLDER, folder, items, LABELS, description="test folder", manifest_path=tmp_path / "m2.csv"
    )
    assert again.manifest_sha256 == data.manifest_sha256
    first = items[0]
    flipped = {k: 1 - v for k, v in first.labels.items()}
    relabelled = [DataItem(first.split, first.path, flipped), *items[1:]]
    changed = describe_data(
        DataKindValues.FOLDER, folder, relabelled, LABELS, description="test folder", manifest_path=tmp_path / "m3.csv"
    )
    assert changed.manifest_sha256 != data.manifest_sha256
    header = pydicom.dcmread(first.path)
    header.PatientIdentityRemoved = "YES"
    header.save_as(first.path)
    touched = describe_data(
        DataKindValues.FOLDER, folder, items, LABELS, description="test folder", manifest_path=tmp_path / "m4.csv"
    )
    assert touched.manifest_sha256 != data.manifest_sha256
    assert "YES on 1 of 6" in touched.deidentification


def test_a_kvasir_store_export_is_split_and_recorded_as_such(tmp_path: Path) -> None:
    export = tmp_path / "export"
    generate_kvasir_folder(export, 10, seed=9, size=128)
    images = sorted(p.name for p in (export / "images").glob("*.dcm"))
    # what dxassist export writes beside the images: its report and where each label came from
    with (export / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "polyp", "Label Source"])
        writer.writerows([name, "1", "reader" if n < 7 else "ai"] for n, name in enumerate(images))
    report = {"studies": 10, "instances": 10, "images": 10, "skipped": {}, "layout": "kvasir"}
    report["profile"] = {"retain_longitudinal_dates": True, "retain_patient_characteristics": False}
    (export / "export.json").write_text(json.dumps(report))
    cfg = TrainConfig.from_yaml(REPO / "configs/training/endoscopy_polyp.yaml", **{"data.source": str(export)})
    splits = split_records(cfg, tmp_path / "work")
    assert [len(s) for s in splits] == [6, 2, 2]  # test drawn first (20 %), then validation from the rest
    assert len({str(r["image"]) for s in splits for r in s}) == 10
    data = measure_data(cfg, export, tmp_path / "work", splits)
    assert data.kind is DataKindValues.STORE_EXPORT
    assert data.label_sources == {"ai": 3, "reader": 7}
    masks = sorted((export / "masks").glob("*.png"))
    with_polyp = sum(int(cv2.imread(str(m), cv2.IMREAD_GRAYSCALE).max() > 127) for m in masks)
    assert 0 < with_polyp < 10 and sum(data.positives["polyp"].values()) == with_polyp
    assert "dxassist export" in data.deidentification and "shifted" in data.dates_note
    assert trained_on_text(data).startswith("store-export: ") and "labels: 3 ai, 7 reader" in trained_on_text(data)
