"""Writes retrain_cxr.ipynb (outputs stripped). Edit the cells here, then run:

    python training/notebooks/build_notebook.py
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

CELLS = [
    new_markdown_cell(
        "# Retrain the chest radiograph model on your own labelled studies, from the DICOM store\n\n"
        "1. **the DICOM store**: your PACS or Orthanc (DICOMweb or DIMSE, as in your dxassist settings). The\n"
        "   labels are what dxassist already knows about each study: its screening's findings, decided by your\n"
        "   radiologists' feedback where they gave it (`POST /v1/screenings/{id}/feedback`),\n"
        "2. **pull and de-identify**: `dxassist export` fetches the studies through the configured `StudySource`\n"
        "   and de-identifies them on the way (PS3.15 Basic Profile allow-list, pseudonyms, shifted dates);\n"
        "   the training entry point runs it itself with `data.source: store`,\n"
        "3. **fine-tune** the registered `cxr-triage` version with MONAI, through the model's own preprocessing,\n"
        "4. **evaluate**: per-label AUROC with 95% CIs, ROC curves, calibration, operating points,\n"
        "5. **export to ONNX** (parity-checked against PyTorch), manifest + model card that record what the\n"
        "   data really was (source, counts per label, modality/manufacturer mix, de-identification,\n"
        "   dataset manifest sha256),\n"
        "6. **register** the new version beside the old one (versions are never overwritten),\n"
        "7. **validate** it with `dxassist models validate` on studies it never saw (held out of the export).\n\n"
        "Parameters come from environment variables. Without `DXASSIST_NB_SETTINGS` the notebook builds a\n"
        "stand-in: a local folder store of synthetic studies, screened into a results database, with a\n"
        "simulated reader's feedback (so CI can run it on a tiny set)."
    ),
    new_code_cell(
        "import os\n"
        "import sys\n"
        "from pathlib import Path\n\n"
        "REPO = Path.cwd()\n"
        "while not (REPO / 'pyproject.toml').exists():\n"
        "    REPO = REPO.parent\n"
        "os.chdir(REPO)\n"
        "SETTINGS = os.environ.get('DXASSIST_NB_SETTINGS')  # dxassist settings: store, results database, export.*\n"
        "UIDS = os.environ.get('DXASSIST_NB_UIDS')  # file of Study UIDs to pull (one a line)\n"
        "STORE = Path(os.environ.get('DXASSIST_NB_STORE', 'var/notebook/store'))  # stand-in store (no SETTINGS)\n"
        "N_STUDIES = int(os.environ.get('DXASSIST_NB_N', '600'))  # size of the stand-in store\n"
        "EPOCHS = int(os.environ.get('DXASSIST_NB_EPOCHS', '2'))\n"
        "BASE = os.environ.get('DXASSIST_NB_BASE', 'latest')  # registered cxr-triage version to start from\n"
        "NEW_VERSION = os.environ.get('DXASSIST_NB_VERSION', '1.3.0')\n"
        "REGISTRY = Path(os.environ.get('DXASSIST_NB_REGISTRY', 'var/notebook/registry'))  # models/registry to go live\n"
        "WORK = Path(os.environ.get('DXASSIST_NB_WORK', 'var/notebook/work'))\n"
        "HOLDOUT = 0.2  # share of the studies kept out of training, for models validate\n"
        "WORK.mkdir(parents=True, exist_ok=True)"
    ),
    new_markdown_cell(
        "## 1. The store and its labels\n\n"
        "With your settings, nothing happens here but reading the list of studies. The stand-in does what\n"
        "the service and your readers do over weeks: every study is screened (results database) and a\n"
        "reader agrees or disagrees with each finding."
    ),
    new_code_cell(
        "import csv\n"
        "import yaml\n"
        "from models.predictor import OnnxPredictor\n"
        "from models.registry import resolve\n"
        "from models.synthetic.cxr import generate_cxr_dataset, label_vector\n"
        "from serving.core.screening import StudyScreener, screen_paths\n"
        "from serving.persistence.results import Provenance, ResultsStore\n"
        "from serving.persistence.schema import SourceValues, TriggerValues\n\n"
        "base = resolve('cxr-triage', BASE)\n"
        "if SETTINGS is None:\n"
        "    if not (STORE / 'Data_Entry.csv').exists():\n"
        "        generate_cxr_dataset(STORE, N_STUDIES, seed=4242, size=(384, 384))\n"
        "    results_db = WORK / 'results.sqlite3'\n"
        "    SETTINGS = str(WORK / 'settings.yaml')\n"
        "    Path(SETTINGS).write_text(yaml.safe_dump({\n"
        "        'models': [{'id': 'cxr-triage', 'version': base.manifest.version}],\n"
        "        'store': {'kind': 'local', 'path': str(STORE)},\n"
        "        'results': {'sqlite_path': str(results_db)},\n"
        "    }))\n"
        "    keys = [label.key for label in base.manifest.labels]\n"
        "    screener = StudyScreener([OnnxPredictor(base, providers='cpu')], study_ref_key=os.urandom(16))\n"
        "    store = ResultsStore(results_db)\n"
        "    uids = []\n"
        "    with (STORE / 'Data_Entry.csv').open(newline='') as fh:\n"
        "        for row in csv.DictReader(fh):\n"
        "            (result,) = screen_paths(screener, [STORE / row['Image Index']])\n"
        "            if result.outcome != 'SCREENED':\n"
        "                continue\n"
        "            if store.screenings_for(result.study_instance_uid):  # screened by an earlier run\n"
        "                uids.append(result.study_instance_uid)\n"
        "                continue\n"
        "            store.save(result, Provenance(SourceValues.PACS_FETCH, TriggerValues.API))\n"
        "            screening = store.screenings_for(result.study_instance_uid)[-1]\n"
        "            truth = dict(zip(keys, label_vector(row['Finding Labels'], keys)))\n"
        "            for finding in result.findings:  # the simulated reader\n"
        "                verdict = 'agree' if finding.positive == bool(truth[finding.key]) else 'disagree'\n"
        "                store.add_feedback(screening.screening_uuid, finding.key, verdict, 'reader-1')\n"
        "            uids.append(result.study_instance_uid)\n"
        "    store.close()\n"
        "else:\n"
        "    uids = Path(UIDS).read_text().split()\n"
        "n_holdout = max(1, round(len(uids) * HOLDOUT))\n"
        "(WORK / 'train_uids.txt').write_text('\\n'.join(uids[n_holdout:]))\n"
        "(WORK / 'holdout_uids.txt').write_text('\\n'.join(uids[:n_holdout]))\n"
        "print(f'{len(uids)} labelled studies: {len(uids) - n_holdout} to train on, {n_holdout} held out for validation')"
    ),
    new_markdown_cell(
        "## 2. Pull the held-out studies, de-identified\n\n"
        "The same command a site runs by hand (the training run below calls it for its own studies)."
    ),
    new_code_cell(
        "import json\n"
        "import subprocess\n\n"
        "def dxassist(*args, registry=None):\n"
        "    env = {**os.environ, **({'DXASSIST_REGISTRY': str(registry.resolve())} if registry else {})}\n"
        "    done = subprocess.run([sys.executable, '-m', 'serving.cli.main', *args], capture_output=True, text=True, env=env)\n"
        "    print(done.stdout[-3000:], done.stderr[-2000:])\n"
        "    done.check_returncode()\n\n"
        "HOLDOUT_DIR = WORK / 'export-holdout'\n"
        "dxassist('export', '--uids', str(WORK / 'holdout_uids.txt'), '--out', str(HOLDOUT_DIR), '--settings', SETTINGS)\n"
        "print(json.loads((HOLDOUT_DIR / 'export.json').read_text()))"
    ),
    new_markdown_cell("## 3-5. Pull the training studies through `data.source: store`, fine-tune, evaluate, export"),
    new_code_cell(
        "import logging\n"
        "from training.config import TrainConfig\n"
        "from training.train_cxr import train\n\n"
        "logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')\n"
        "cfg = TrainConfig.from_yaml(\n"
        "    'configs/training/cxr_triage.yaml',\n"
        "    **{'version': NEW_VERSION, 'data.source': 'store', 'data.store.settings': SETTINGS,\n"
        "       'data.store.uids': str(WORK / 'train_uids.txt'), 'train.epochs': EPOCHS, 'train.lr': 5e-4, 'int8': False},\n"
        ")\n"
        "report = train(cfg, WORK / 'train', init_from=base)\n"
        "print('fine-tuned from', base.manifest.ref)\n"
        "data = report['data']\n"
        "print('trained on:', data['kind'], '-', data['studies'], 'studies, splits', data['splits'])\n"
        "print('positives per label and split:', data['positives'])\n"
        "print('label sources:', data['label_sources'], '| de-identification:', data['deidentification'])\n"
        "print('dataset manifest sha256:', data['manifest_sha256'])"
    ),
    new_code_cell(
        "import pandas as pd\n"
        "from IPython.display import Image, display\n\n"
        "display(pd.DataFrame(report['test']).set_index('label'))\n"
        "display(Image(filename=str(WORK / 'train' / 'roc_test.png')))\n"
        "display(Image(filename=str(WORK / 'train' / 'calibration_test.png')))\n"
        "print('ONNX parity (max abs diff):', report['parity_max_abs_diff'])"
    ),
    new_markdown_cell("## 6. Register the new version beside the old one"),
    new_code_cell(
        "from models.manifest import load_manifest\n"
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
    new_markdown_cell(
        "## 7. Validate on the held-out studies\n\n"
        "`dxassist models validate` screens them exactly as serving would and writes the report (JSON + HTML,\n"
        "proposed operating points, the drift baseline). Then: `dxassist models register --from-validation`,\n"
        "`models shadow`, `compare`, `promote` (README, \"Bringing a real model\")."
    ),
    new_code_cell(
        "dxassist('models', 'validate', f'cxr-triage@{NEW_VERSION}', '--labels', str(HOLDOUT_DIR / 'Data_Entry.csv'),\n"
        "         '--images', str(HOLDOUT_DIR), '--out', str(WORK / 'validation'), registry=REGISTRY)\n"
        "validation = json.loads((WORK / 'validation' / f'cxr-triage-{NEW_VERSION}' / 'validation.json').read_text())\n"
        "print('validated', validation['model'], 'on', validation['studies'], 'held-out studies')"
    ),
]


def main() -> None:
    nb = new_notebook(cells=CELLS, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    out = Path(__file__).with_name("retrain_cxr.ipynb")
    nbformat.write(nb, out)
    print("wrote", out)


if __name__ == "__main__":
    main()
