"""The plain classes of the staged topology's versions (serving.rayserve.versions), no Ray: a
model deployment's batch mixing two versions runs each on its own session and answers each
request in order; a version that cannot be opened fails its own requests only; the fetcher
prepares with the rules of the versions it is told."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr

from models.errors import DxAssistError
from models.importing import derive_version
from models.predictor import OnnxPredictor
from models.registry import REGISTRY_ROOT, resolve
from serving.core.screening import ModelOutputs, run_model
from serving.dicom.sources.local import LocalFolderSource
from serving.online.pipeline import StudyRequest
from serving.rayserve.versions import VersionedModels, VersionedPreparer
from serving.settings import ModelSettings, SecuritySettings, Settings
from tests.conftest import write_synthetic_cxr

KEYS = ["cardiomegaly", "pleural_effusion", "pneumothorax", "nodule_mass", "consolidation"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("versions") / "registry"
    shutil.copytree(REGISTRY_ROOT / "cxr-triage" / "1.0.0", root / "cxr-triage" / "1.0.0")
    derive_version(
        "cxr-triage", "1.0.0", "1.0.1", dict.fromkeys(KEYS, (0.5, "test: every threshold at 0.5")), root=root
    )
    return root


def test_a_batch_mixing_versions_runs_each_on_its_own_session(registry: Path) -> None:
    model = ModelSettings(id="cxr-triage", version="1.0.0", providers="cpu")
    default = OnnxPredictor(resolve("cxr-triage", "1.0.0", registry), providers="cpu")
    versions = VersionedModels(model, default, root=registry)
    assert versions.warm(["1.0.1", "9.9.9"]) == ["cxr-triage@9.9.9 (ManifestError)"]
    assert sorted(p.manifest.ref for p in versions.loaded()) == ["cxr-triage@1.0.0", "cxr-triage@1.0.1"]

    rng = np.random.default_rng(3)
    images = [rng.random((n, 1, 224, 224), dtype=np.float32) for n in (1, 2, 1, 1)]
    refs = [None, "cxr-triage@1.0.1", "cxr-triage@9.9.9", "cxr-triage@1.0.1"]
    out = versions.run_batch(list(zip(refs, images, strict=True)), batch_size=4)
    assert len(out) == 4
    assert isinstance(out[2], DxAssistError)  # the unknown version fails its own request only
    shadow = OnnxPredictor(resolve("cxr-triage", "1.0.1", registry), providers="cpu")
    for result, image, predictor in (
        (out[0], images[0], default),
        (out[1], images[1], shadow),
        (out[3], images[3], shadow),
    ):
        assert isinstance(result, ModelOutputs)
        np.testing.assert_allclose(result.scores, run_model(predictor, image, 4).scores, atol=1e-5)
    assert versions.predictor("cxr-triage@1.0.1").manifest.version == "1.0.1"
    with pytest.raises(DxAssistError):
        versions.predictor("endoscopy-polyp@1.0.0")  # another model's version is never opened here


def test_the_fetcher_prepares_with_the_versions_it_is_told(registry: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_synthetic_cxr(store / "a.dcm", seed=5)
    settings = Settings(
        models=[ModelSettings(id="cxr-triage", version="1.0.0", providers="cpu")],
        security=SecuritySettings(study_ref_key=SecretStr("versions-test-key-0123456789")),
    )
    preparer = VersionedPreparer(settings, LocalFolderSource(store), root=registry)
    request = StudyRequest(study_instance_uid=None, spool_dir=str(store))
    default = preparer.prepare(request)
    told = preparer.prepare(request, {"cxr-triage": "1.0.1"})
    assert default.prepared and told.prepared
    assert preparer.screener(None) is preparer.screener({"cxr-triage": "1.0.0"})
    assert sorted(preparer.screener({"cxr-triage": "1.0.1"}).loaded) == ["cxr-triage"]
    assert preparer.screener({"cxr-triage": "1.0.1"}).loaded["cxr-triage"].manifest.version == "1.0.1"
    np.testing.assert_array_equal(default.prepared[0].tensors, told.prepared[0].tensors)
