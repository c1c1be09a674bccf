"""`dxassist models import`: an ONNX file + YAML, a MONAI Bundle and a torchxrayvision DenseNet
(random weights, nothing downloaded) become registry versions that pass the parity gate, carry
an OOD gate fitted on the site's folder, and screen studies end to end; wrong signatures are
refused with a typed error and leave nothing behind."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.errors import ManifestError, ReasonCode, SignatureMismatch
from models.importing import import_onnx, inspect_onnx, load_import_spec
from models.manifest import OutputRoleValues
from models.predictor import OnnxPredictor
from models.registry import list_versions, resolve
from models.results import OutcomeValues, ScreeningResult
from serving.core.screening import StudyScreener, screen_paths
from tests.lifecycle.conftest import chest_spec, write_spec


class _TinyChest(nn.Module):
    def __init__(self, labels: int, size: int = 224) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 5, stride=4)
        self.head = nn.Linear(8, labels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.relu(self.conv(x))
        pooled = f.mean(dim=(2, 3))
        feats = torch.cat([pooled, f.std(dim=(2, 3))], dim=1)
        return self.head(pooled), feats


class _ScoresOnly(nn.Module):
    def __init__(self, inner: _TinyChest) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[0]


def _export(path: Path, labels: int, size: int = 224, *, dynamic: bool = True, features: bool = True) -> Path:
    torch.manual_seed(0)
    module: nn.Module = _TinyChest(labels).eval()
    names = ["logits", "features"]
    if not features:
        module, names = _ScoresOnly(module).eval(), ["logits"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.rand(1, 1, size, size),),
            str(path),
            input_names=["image"],
            output_names=names,
            dynamic_axes={"image": {0: "b"}, **{n: {0: "b"} for n in names}} if dynamic else None,
            opset_version=17,
            dynamo=False,
        )
    return path


def _screener(ref: str, root: Path) -> StudyScreener:
    model_id, version = ref.split("@")
    return StudyScreener([OnnxPredictor(resolve(model_id, version, root), providers="cpu")], study_ref_key=b"k" * 16)


def _screen_site(ref: str, root: Path, folder: Path, n: int = 4) -> list[ScreeningResult]:
    """Screen site studies; the version's own OOD gate may refuse the odd one (it accepts 95 %
    of held-out site images by construction), nothing else may stop them. Screened ones first."""
    results = screen_paths(_screener(ref, root), sorted(folder.glob("*.dcm"))[:n], group_by_study=False)
    assert {r.reason for r in results} <= {None, ReasonCode.OUT_OF_DISTRIBUTION}
    screened = [r for r in results if r.outcome == OutcomeValues.SCREENED]
    assert screened
    return screened


def test_onnx_plus_yaml_import_registers_a_verified_version_that_screens(tmp_path: Path, site_folder: Path) -> None:
    onnx_path = _export(tmp_path / "vendor.onnx", labels=2)
    spec = load_import_spec(
        write_spec(tmp_path / "spec.yaml", chest_spec("vendor-cxr", "1.0.0", ["pneumothorax", "cardiomegaly"]))
    )
    root = tmp_path / "registry"
    report = import_onnx(onnx_path, spec, root=root, ood_folder=site_folder)

    loaded = resolve("vendor-cxr", "1.0.0", root)
    m = loaded.manifest
    assert [o.role for o in m.outputs] == [OutputRoleValues.SCORES, OutputRoleValues.FEATURES]
    assert m.input.shape == [-1, 1, 224, 224] and m.input.preprocessing == "cxr_v1"
    assert m.artifact.opset == 17 and len(m.artifact.sha256) == 64
    assert m.ood is not None and (report.staged / "ood.npz").is_file()
    assert (report.staged / "MODEL_CARD.md").read_text().count("Not yet validated at this site") == 1
    predictor = OnnxPredictor(loaded, providers="cpu")
    assert predictor.ood is not None

    results = _screen_site("vendor-cxr@1.0.0", root, site_folder)
    assert {f.key for f in results[0].findings} == {"pneumothorax", "cardiomegaly"}
    assert results[0].models == ["vendor-cxr@1.0.0"]


def test_a_scores_only_graph_gets_a_features_output_and_its_ood_gate(tmp_path: Path, site_folder: Path) -> None:
    """The supplier exported only scores: the importer adds pooled features of the graph's own
    stages (scores unchanged) so that the version still gets an OOD gate fitted on site studies."""
    import onnxruntime as ort

    onnx_path = _export(tmp_path / "vendor.onnx", labels=2, features=False)
    spec = load_import_spec(
        write_spec(tmp_path / "spec.yaml", chest_spec("vendor-cxr", "1.0.0", ["pneumothorax", "cardiomegaly"]))
    )
    report = import_onnx(onnx_path, spec, root=tmp_path / "registry", ood_folder=site_folder)
    loaded = resolve("vendor-cxr", "1.0.0", tmp_path / "registry")
    assert [o.name for o in loaded.manifest.outputs] == ["logits", "dxassist_features"]
    assert loaded.manifest.ood is not None and loaded.manifest.ood.features_output == "dxassist_features"
    probe = np.random.default_rng(3).random((2, 1, 224, 224), dtype=np.float32)
    before = ort.InferenceSession(str(onnx_path)).run(["logits"], {"image": probe})[0]
    after = OnnxPredictor(loaded, providers="cpu").predict(probe)["logits"]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    assert "dxassist added the output dxassist_features" in (report.staged / "MODEL_CARD.md").read_text()
    assert _screen_site("vendor-cxr@1.0.0", tmp_path / "registry", site_folder)


@pytest.mark.parametrize(
    ("labels", "size", "preprocessing", "dynamic", "message"),
    [
        (["pneumothorax", "cardiomegaly", "pleural_effusion"], 224, "cxr_v1", True, "exactly one scores output"),
        (["pneumothorax", "cardiomegaly"], 256, "cxr_v1", True, "gives 224x224"),
        (["pneumothorax", "cardiomegaly"], 256, "endo_v1", True, "channels"),
        (["pneumothorax", "cardiomegaly"], 224, "cxr_v1", False, "batch dimension must be dynamic"),
    ],
)
def test_import_refuses_a_graph_that_does_not_fit_its_spec(
    tmp_path: Path, labels: list[str], size: int, preprocessing: str, dynamic: bool, message: str
) -> None:
    onnx_path = _export(tmp_path / "vendor.onnx", labels=2, size=size, dynamic=dynamic)
    spec = load_import_spec(
        write_spec(
            tmp_path / "spec.yaml", chest_spec("vendor-cxr", "1.0.0", labels, input={"preprocessing": preprocessing})
        )
    )
    root = tmp_path / "registry"
    with pytest.raises(SignatureMismatch, match=message):
        import_onnx(onnx_path, spec, root=root, ood_folder=tmp_path)
    assert list_versions(root) == []


def test_import_spec_and_file_errors_are_typed(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="preprocessing"):
        spec = load_import_spec(
            write_spec(
                tmp_path / "s.yaml", chest_spec("v", "1.0.0", ["pneumothorax"], input={"preprocessing": "python:eval"})
            )
        )
        import_onnx(_export(tmp_path / "a.onnx", 1), spec, root=tmp_path / "r")
    with pytest.raises(ManifestError, match="labels"):
        load_import_spec(write_spec(tmp_path / "s2.yaml", {**chest_spec("v", "1.0.0", ["pneumothorax"]), "labels": []}))
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07junk" * 100)
    with pytest.raises(ManifestError):
        inspect_onnx(tmp_path / "junk.onnx")


def test_torchxrayvision_densenet_imports_with_parity_and_screens(tmp_path: Path, site_folder: Path) -> None:
    from training.import_xrv import import_xrv, xrv_densenet

    torch.manual_seed(1)
    weights = tmp_path / "xrv-weights.pt"
    torch.save(xrv_densenet().state_dict(), weights)  # the "site's local file": random weights
    root = tmp_path / "registry"
    report = import_xrv(
        weights,
        model_id="xrv-densenet",
        version="1.0.0",
        pathologies=["Pneumothorax", "Effusion", "Cardiomegaly"],
        trained_on="random initial weights (test)",
        ood_folder=site_folder,
        root=root,
    )
    m = resolve("xrv-densenet", "1.0.0", root).manifest
    assert m.input.preprocessing == "xrv_v1" and tuple(m.input.value_range) == (-1024.0, 1024.0)
    assert [lab.code.value for lab in m.labels] == ["36118008", "60046008", "8186001"]
    assert m.labels[0].critical and m.ood is not None
    card = (report.staged / "MODEL_CARD.md").read_text()
    assert "parity" in card and "xrv-weights.pt" in card
    results = _screen_site("xrv-densenet@1.0.0", root, site_folder)
    assert {f.key for f in results[0].findings} == {"pneumothorax", "pleural_effusion", "cardiomegaly"}


def _bundle(folder: Path, *, torchscript: bool, network_def: dict[str, object] | None = None) -> Path:
    from monai.networks.nets import DenseNet121

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    metadata = {
        "name": "test chest bundle",
        "version": "0.1.0",
        "network_data_format": {
            "inputs": {"image": {"num_channels": 1, "spatial_shape": [224, 224], "type": "image"}},
            "outputs": {"pred": {"num_channels": 2, "type": "probabilities"}},
        },
    }
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    definition = network_def or {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 1, "out_channels": 2}
    (folder / "configs" / "inference.json").write_text(json.dumps({"network_def": definition}))
    torch.manual_seed(2)
    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=2).eval()
    if torchscript:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated, yet bundles still ship TorchScript
            torch.jit.save(torch.jit.script(net), str(folder / "models" / "model.ts"))
    else:
        torch.save(net.state_dict(), folder / "models" / "model.pt")
    return folder


@pytest.mark.parametrize("torchscript", [True])  # the state-dict bundle: tests/lifecycle/test_cli.py
def test_monai_bundle_imports_with_parity_and_screens(tmp_path: Path, site_folder: Path, torchscript: bool) -> None:
    from training.import_bundle import import_bundle

    bundle = _bundle(tmp_path / "bundle", torchscript=torchscript)
    spec = load_import_spec(
        write_spec(tmp_path / "spec.yaml", chest_spec("bundle-cxr", "1.0.0", ["pneumothorax", "cardiomegaly"]))
    )
    root = tmp_path / "registry"
    report = import_bundle(bundle, spec, ood_folder=site_folder, root=root)
    m = resolve("bundle-cxr", "1.0.0", root).manifest
    assert [o.role for o in m.outputs] == [OutputRoleValues.SCORES, OutputRoleValues.HEATMAP, OutputRoleValues.FEATURES]
    card = (report.staged / "MODEL_CARD.md").read_text()
    parity = card.split("per output: ")[1].split(" (gate")[0]
    assert all(float(part.split()[1]) <= 1e-4 for part in parity.split(", "))
    results = _screen_site("bundle-cxr@1.0.0", root, site_folder)
    assert len(results[0].findings) == 2 and results[0].findings[0].region is not None


def test_bundle_with_code_in_its_config_or_wrong_channels_is_refused(tmp_path: Path) -> None:
    from training.import_bundle import import_bundle

    spec = load_import_spec(
        write_spec(tmp_path / "spec.yaml", chest_spec("bundle-cxr", "1.0.0", ["pneumothorax", "cardiomegaly"]))
    )
    evil = _bundle(
        tmp_path / "evil",
        torchscript=False,
        network_def={
            "_target_": "DenseNet121",
            "spatial_dims": "$__import__('os').getpid()",
            "in_channels": 1,
            "out_channels": 2,
        },
    )
    with pytest.raises(ManifestError, match="expressions"):
        import_bundle(evil, spec, ood_folder=None, root=tmp_path / "r")
    three = load_import_spec(
        write_spec(
            tmp_path / "s3.yaml",
            chest_spec("bundle-cxr", "1.0.0", ["pneumothorax", "cardiomegaly", "pleural_effusion"]),
        )
    )
    with pytest.raises(SignatureMismatch, match="3 labels"):
        import_bundle(_bundle(tmp_path / "ok", torchscript=False), three, ood_folder=None, root=tmp_path / "r")
    assert np.asarray(list_versions(tmp_path / "r")).size == 0
