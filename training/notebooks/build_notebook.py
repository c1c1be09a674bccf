"""Writes retrain_cxr.ipynb (outputs stripped). Edit the cells here, then run:

    python training/notebooks/build_notebook.py
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        "# Retrain the chest radiograph model on your own labelled studies\n\n"
        "1. pull labelled studies from the DICOM store (here: the local folder store; labels in a\n"
        "   ChestX-ray14-style `Data_Entry.csv` beside them),\n"
        "2. fine-tune the registered `cxr-triage` version with MONAI, through the model's own\n"
        "   preprocessing (the exact function serving uses),\n"
        "3. evaluate: per-label AUROC with 95% CIs, ROC curves, calibration, operating points,\n"
        "4. export to ONNX (parity-checked against PyTorch), write manifest + model card,\n"
        "5. register the new version **beside** the old one (versions are never overwritten).\n\n"
        "Parameters come from environment variables so CI can run this notebook on a tiny dataset."
    ),
    new_code_cell(
        "import os\n"
        "from pathlib import Path\n\n"
        "REPO = Path.cwd()\n"
        "while not (REPO / 'pyproject.toml').exists():\n"
        "    REPO = REPO.parent\n"
        "os.chdir(REPO)\n"
        "STORE = Path(os.environ.get('DXASSIST_NB_STORE', 'var/notebook/store'))  # folder of labelled DICOM studies\n"
        "N_STUDIES = int(os.environ.get('DXASSIST_NB_N', '600'))  # only used to create a synthetic store\n"
        "EPOCHS = int(os.environ.get('DXASSIST_NB_EPOCHS', '2'))\n"
        "BASE = os.environ.get('DXASSIST_NB_BASE', 'latest')  # registered cxr-triage version to start from\n"
        "NEW_VERSION = os.environ.get('DXASSIST_NB_VERSION', '1.1.0')\n"
        "REGISTRY = Path(os.environ.get('DXASSIST_NB_REGISTRY', 'var/notebook/registry'))  # models/registry to go live\n"
        "WORK = Path(os.environ.get('DXASSIST_NB_WORK', 'var/notebook/work'))"
    ),
    new_markdown_cell(
        "## 1. Labelled studies from the store\n\n"
        "The store is read through `serving.dicom.sources.local.LocalFolderSource` (the embedded default\n"
        "store). With no hospital data at hand, a synthetic labelled store is created first."
    ),
    new_code_cell(
        "import csv\n"
        "from models.synthetic.cxr import generate_cxr_dataset\n"
        "from serving.dicom.sources.local import LocalFolderSource\n\n"
        "if not (STORE / 'Data_Entry.csv').exists():\n"
        "    generate_cxr_dataset(STORE, N_STUDIES, seed=4242, size=(384, 384))\n"
        "studies = LocalFolderSource(STORE).studies()\n"
        "labels = {row['Image Index']: row['Finding Labels'] for row in csv.DictReader((STORE / 'Data_Entry.csv').read_text().splitlines())}\n"
        "labelled = sum(1 for files in studies.values() for f in files if f.name in labels)\n"
        "print(f'{len(studies)} studies in the store, {labelled} labelled images')"
    ),
    new_markdown_cell("## 2-4. Fine-tune, evaluate, export"),
    new_code_cell(
        "import logging\n"
        "from models.registry import resolve\n"
        "from training.config import TrainConfig\n"
        "from training.train_cxr import train\n\n"
        "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')\n"
        "base = resolve('cxr-triage', BASE)\n"
        "cfg = TrainConfig.from_yaml(\n"
        "    'configs/training/cxr_triage.yaml',\n"
        "    **{'version': NEW_VERSION, 'data.source': str(STORE), 'train.epochs': EPOCHS, 'train.lr': 5e-4, 'int8': False},\n"
        ")\n"
        "report = train(cfg, WORK, init_from=base)\n"
        "print('fine-tuned from', base.manifest.ref)"
    ),
    new_code_cell(
        "import pandas as pd\n"
        "from IPython.display import Image, display\n\n"
        "display(pd.DataFrame(report['test']).set_index('label'))\n"
        "display(Image(filename=str(WORK / 'roc_test.png')))\n"
        "display(Image(filename=str(WORK / 'calibration_test.png')))\n"
        "print('ONNX parity (max abs diff):', report['parity_max_abs_diff'])"
    ),
    new_markdown_cell("## 5. Register the new version beside the old one"),
    new_code_cell(
        "from models.manifest import load_manifest\n"
        "from models.predictor import OnnxPredictor\n"
        "from models.registry import VersionExists, list_versions, register_version\n\n"
        "try:\n"
        "    target = register_version(Path(report['staged']), REGISTRY)\n"
        "except VersionExists as exc:\n"
        "    print('not registered:', exc)\n"
        "else:\n"
        "    predictor = OnnxPredictor(load_manifest(target), providers='cpu')\n"
        "    print('registered', predictor.manifest.ref, 'self-test ok:', predictor.self_test().ok)\n"
        "print([f'{e.model_id}@{e.version}' for e in list_versions(REGISTRY)])"
    ),
]


def main() -> None:
    nb = new_notebook(cells=CELLS, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    out = Path(__file__).with_name("retrain_cxr.ipynb")
    nbformat.write(nb, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
