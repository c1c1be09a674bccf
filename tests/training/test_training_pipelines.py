"""Training end to end on tiny synthetic sets: train -> evaluate -> export -> parity -> stage -> register,
with the data provenance measured into manifest and card, plus the parity gate itself and the
retraining notebook (executed, not just opened: store -> export -> train -> register -> validate)."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from models.errors import ParityError
from models.manifest import DataKindValues, load_manifest
from models.predictor import OnnxPredictor
from models.registry import VersionExists, list_versions, register_version, resolve
from models.synthetic.cxr import label_vector
from training.config import TrainConfig
from training.export_onnx import export_onnx, parity_check

REPO = Path(__file__).resolve().parents[2]
TINY = {"data.n_train": 40, "data.n_test": 24, "data.image_size": [288, 288], "train.epochs": 1, "int8": False}


@pytest.mark.slow
def test_cxr_training_end_to_end(tmp_path: Path) -> None:
    from training.train_cxr import train

    cfg = TrainConfig.from_yaml(REPO / "configs/training/cxr_triage.yaml", version="0.0.1-test", **TINY)
    registry = tmp_path / "registry"
    report = train(cfg, tmp_path / "work", register=True, registry_root=registry)
    staged = Path(str(report["staged"]))
    loaded = load_manifest(staged)
    m = loaded.manifest
    assert m.ref == "cxr-triage@0.0.1-test"
    assert all(0 < lab.threshold < 1 and lab.threshold_basis for lab in m.labels)
    assert "not for clinical use" in m.provenance.trained_on.lower()
    assert float(str(report["parity_max_abs_diff"])) < 1e-3
    card = (staged / "MODEL_CARD.md").read_text()
    assert "AUROC" in card and "Trained on synthetic data only" in card
    # the data it was really trained on, measured from the generated files
    data = m.provenance.data
    assert data is not None and data.kind is DataKindValues.SYNTHETIC
    assert data.images == 64 and data.splits == {"train": 32, "validation": 8, "test": 24}
    work = tmp_path / "work"
    truth = dict.fromkeys(data.positives, 0)
    for folder in (work / "data-seed11-n40-288", work / "data-seed2027-n24-288"):
        with (folder / "Data_Entry.csv").open(newline="") as fh:
            for row in csv.DictReader(fh):
                for key, value in zip(truth, label_vector(row["Finding Labels"], tuple(truth)), strict=True):
                    truth[key] += int(value)
    assert {k: sum(v.values()) for k, v in data.positives.items()} == truth
    assert data.deidentification.startswith("not applicable") and data.label_sources == {}
    assert data.manifest_sha256 == hashlib.sha256((work / "dataset_manifest.csv").read_bytes()).hexdigest()
    assert "Source: **synthetic**" in card and data.manifest_sha256 in card
    # train -> export -> fit OOD: the gate is fitted on this run's training split and shipped
    assert m.ood is not None and (staged / m.ood.stats_file).is_file()
    assert m.ood.threshold > 0 and "training split" in m.ood.basis and "validation" in m.ood.basis
    assert {"heldout_acceptance", "far_ood_auroc", "near_ood_auroc"} <= m.ood.metrics.keys()
    assert "Out-of-distribution gate" in card and "Far-OOD AUROC" in card
    # registered beside nothing else, verifies, runs
    assert [e.version for e in list_versions(registry)] == ["0.0.1-test"]
    predictor = OnnxPredictor(resolve("cxr-triage", "0.0.1-test", registry), providers="cpu")
    assert predictor.self_test().ok
    with pytest.raises(VersionExists):
        register_version(staged, registry)


@pytest.mark.slow
def test_polyp_training_end_to_end(tmp_path: Path) -> None:
    from training.train_polyp import train

    cfg = TrainConfig.from_yaml(
        REPO / "configs/training/endoscopy_polyp.yaml",
        version="0.0.1-test",
        **{"data.n_train": 20, "data.n_test": 8, "data.image_size": [256, 256], "train.epochs": 1},
    )
    report = train(cfg, tmp_path / "work")
    loaded = load_manifest(Path(str(report["staged"])))
    assert loaded.manifest.task.value == "segmentation"
    data = loaded.manifest.provenance.data
    assert data is not None and data.kind is DataKindValues.SYNTHETIC
    assert data.splits == {"train": 16, "validation": 4, "test": 8} and set(data.positives) == {"polyp"}
    assert "Trained on synthetic data only" in (Path(str(report["staged"])) / "MODEL_CARD.md").read_text()
    predictor = OnnxPredictor(loaded, providers="cpu")
    out = predictor.predict(np.random.default_rng(0).random((2, 3, 256, 256), dtype=np.float32))
    assert out["score"].shape == (2, 1) and out["mask"].shape == (2, 1, 256, 256)
    assert loaded.manifest.ood is not None and predictor.ood is not None
    distances = predictor.ood_distances(out)
    assert distances is not None and distances.shape == (2,)


def test_parity_check_refuses_a_mismatched_export(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    b = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.rand(2, 1, 16, 16)
    path = export_onnx(a, x, tmp_path / "a.onnx", input_name="image", output_names=["logits"])
    assert parity_check(a, path, x.numpy(), input_name="image") < 1e-5
    with pytest.raises(ParityError, match="beyond tolerance"):
        parity_check(b, path, x.numpy(), input_name="image")


@pytest.mark.slow
def test_retraining_notebook_runs_on_a_tiny_store(tmp_path: Path) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO / "training/notebooks/retrain_cxr.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit notebooks without outputs"
    env = {
        "DXASSIST_NB_STORE": str(tmp_path / "store"),
        "DXASSIST_NB_N": "48",
        "DXASSIST_NB_EPOCHS": "1",
        "DXASSIST_NB_REGISTRY": str(tmp_path / "registry"),
        "DXASSIST_NB_WORK": str(tmp_path / "work"),
        "DXASSIST_NB_VERSION": "9.9.9",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        NotebookClient(nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert [e.version for e in list_versions(tmp_path / "registry")] == ["9.9.9"]
    text = "".join(str(o.get("text", "")) for c in nb.cells for o in c.get("outputs", []))
    assert "fine-tuned from cxr-triage@" in text and "self-test ok: True" in text
    # pulled from the store through dxassist export, and the card says so; validated on held-out studies
    assert "trained on: store-export" in text and "validated cxr-triage@9.9.9 on 10 held-out studies" in text
    card = (tmp_path / "registry" / "cxr-triage" / "9.9.9" / "MODEL_CARD.md").read_text()
    assert "de-identified studies exported from the site's DICOM store" in card and "reader" in card
