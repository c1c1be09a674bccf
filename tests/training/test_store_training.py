"""Retraining from the DICOM store: labelled studies in a real Orthanc, screened and judged by
readers, pulled through the StudySource and de-identified by ``dxassist export`` (run by the
training entry point itself, ``data.source: store``), one epoch of training, and a manifest and
model card that say truthfully what the version was trained on: the store export, with the
counts per label and split, where each label came from, the modality/manufacturer mix, the
de-identification state and the dataset manifest's sha256. No original identifier reaches them."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import pydicom
import pytest

from models.manifest import DataKindValues, load_manifest
from models.predictor import OnnxPredictor
from models.registry import resolve
from models.synthetic.cxr import generate_cxr_dataset, label_vector
from serving.core.screening import StudyScreener, screen_paths
from serving.persistence.results import Provenance, ResultsStore
from serving.persistence.schema import SourceValues, TriggerValues
from tests.conftest import orthanc_settings_file
from tests.integration.conftest import OrthancServer, orthanc  # noqa: F401  (fixture)
from training.config import TrainConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
N_STUDIES = 24
UNREVIEWED = 6  # the last studies get no reader feedback: their labels are the AI's own


def test_training_from_the_store_records_the_export_as_its_data(
    orthanc: OrthancServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    site = tmp_path / "site"
    generate_cxr_dataset(site, N_STUDIES, seed=808, size=(288, 288), prevalence=0.4)
    with (site / "Data_Entry.csv").open(newline="") as fh:
        truth_rows = list(csv.DictReader(fh))
    loaded = resolve("cxr-triage")
    keys = tuple(label.key for label in loaded.manifest.labels)
    screener = StudyScreener([OnnxPredictor(loaded, providers="cpu")], study_ref_key=b"k" * 16)
    store = ResultsStore(tmp_path / "results.sqlite3")
    uids, originals, expected = [], [], dict.fromkeys(keys, 0)
    for n, row in enumerate(truth_rows):
        path = site / row["Image Index"]
        orthanc.upload(path)
        header = pydicom.dcmread(path, stop_before_pixels=True)
        uids.append(str(header.StudyInstanceUID))
        originals += [str(header.StudyInstanceUID), str(header.SOPInstanceUID), str(header.PatientID)]
        (result,) = screen_paths(screener, [path])
        assert result.outcome == "SCREENED"
        store.save(result, Provenance(SourceValues.PACS_FETCH, TriggerValues.API))
        screening = store.screenings_for(uids[-1])[-1]
        truth = dict(zip(keys, label_vector(row["Finding Labels"], keys), strict=True))
        if n < N_STUDIES - UNREVIEWED:
            # a reader judges every finding: agrees where the AI was right, disagrees where not
            for finding in result.findings:
                verdict = "agree" if finding.positive == bool(truth[finding.key]) else "disagree"
                store.add_feedback(screening.screening_uuid, finding.key, verdict, "reader-1")
            labels = {k: int(truth[k] == 1) for k in keys}
        else:
            labels = {f.key: int(f.positive) for f in result.findings}
        for key in keys:
            expected[key] += labels[key]
    store.close()
    (tmp_path / "uids.txt").write_text("\n".join(uids))
    settings = orthanc_settings_file(tmp_path, orthanc)

    from training.train_cxr import train

    cfg = TrainConfig.from_yaml(
        REPO / "configs/training/cxr_triage.yaml",
        version="0.0.1-store",
        **{
            "data.source": "store",
            "data.store.settings": str(settings),
            "data.store.uids": str(tmp_path / "uids.txt"),
            "train.epochs": 1,
            "train.batch_size": 4,
            "int8": False,
        },
    )
    work = tmp_path / "work"
    report = train(cfg, work)
    staged = Path(str(report["staged"]))
    prov = load_manifest(staged).manifest.provenance
    data = prov.data
    assert data is not None and data.kind is DataKindValues.STORE_EXPORT
    assert data.images == data.studies == N_STUDIES and sum(data.splits.values()) == N_STUDIES
    assert data.splits["test"] > 0 and data.splits["validation"] > 0
    # the counts per label are the exported labels: readers' truth where they judged, else the AI's
    assert {k: sum(v.values()) for k, v in data.positives.items()} == expected
    assert data.label_sources == {"ai": UNREVIEWED, "reader": N_STUDIES - UNREVIEWED}
    assert data.modalities and set(data.modalities) <= {"CR", "DX"} and sum(data.modalities.values()) == N_STUDIES
    assert data.manufacturers and sum(data.manufacturers.values()) == N_STUDIES
    assert "dxassist export" in data.deidentification
    assert f"PatientIdentityRemoved YES on {N_STUDIES} of {N_STUDIES}" in data.deidentification
    assert data.study_dates is not None and "shifted" in data.dates_note
    manifest_file = work / "dataset_manifest.csv"
    assert data.manifest_sha256 == hashlib.sha256(manifest_file.read_bytes()).hexdigest()
    assert manifest_file.read_text().count("\n") == N_STUDIES + 1
    assert prov.trained_on.startswith("store-export: ") and "synthetic" not in prov.trained_on.lower()
    card = (staged / "MODEL_CARD.md").read_text()
    assert "Trained on synthetic data only" not in card and "phantoms" not in card.split("## Out-of-distribution")[0]
    manifest = load_manifest(staged).manifest  # the config's reference wording is for synthetic versions only
    assert "synthetic" not in manifest.name and "synthetic" not in manifest.intended_use
    assert f"Trained on {N_STUDIES} de-identified studies exported from the site's DICOM store" in card
    assert "Source: **store-export**" in card and data.manifest_sha256 in card
    assert f"{UNREVIEWED} images labelled by ai" in card and "unreviewed" in card
    # no original identifier in what ships with the version
    shipped = (staged / "manifest.yaml").read_text() + card
    assert not [o for o in originals if o in shipped]
