"""The out-of-distribution gate's maths and its artifact: fitted distances, limits, integrity."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml

from models.errors import ManifestError, ModelIntegrityError
from models.manifest import load_manifest, parse_manifest, verify_artifact
from models.ood import GaussianStats, OodGate, fit_gaussian, ledoit_wolf_shrinkage, threshold_for_acceptance
from tests.conftest import build_tiny_onnx, tiny_manifest_dict


def test_distance_equals_full_mahalanobis_when_every_direction_is_kept() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 3.0
    stats = fit_gaussian(x, components=5)  # 5 of 6 directions + one residual variance == full rank
    z = (x - stats.mean) / stats.scale
    cov = np.cov(z, rowvar=False, bias=True)
    alpha = ledoit_wolf_shrinkage(z)
    shrunk = (1 - alpha) * cov + alpha * np.trace(cov) / 6 * np.eye(6)
    probe = rng.normal(size=(10, 6)) * 2 + 3.0
    zp = (probe - stats.mean) / stats.scale
    expected = np.sqrt(np.einsum("ij,jk,ik->i", zp, np.linalg.inv(shrunk), zp))
    np.testing.assert_allclose(stats.distances(probe), expected, rtol=1e-4)  # float32 projection


def test_far_points_are_farther_and_shrinkage_is_a_fraction() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 200))  # more dimensions than rows: shrinkage is needed
    alpha = ledoit_wolf_shrinkage(x - x.mean(axis=0))
    assert 0.0 < alpha <= 1.0
    stats = fit_gaussian(x, components=32)
    inside = stats.distances(rng.normal(size=(50, 200)))
    outside = stats.distances(rng.normal(size=(50, 200)) + 3.0)
    assert inside.max() < outside.min()


def test_threshold_accepts_the_stated_share() -> None:
    d = np.arange(1, 101, dtype=float)
    assert threshold_for_acceptance(d, 0.99) == 99.0
    assert np.mean(d <= threshold_for_acceptance(d, 0.95)) == pytest.approx(0.95)
    with pytest.raises(ValueError):
        threshold_for_acceptance(np.array([]), 0.99)


def test_stats_round_trip_and_refuse_foreign_arrays() -> None:
    rng = np.random.default_rng(2)
    stats = fit_gaussian(rng.normal(size=(50, 12)), components=4)
    again = GaussianStats.from_bytes(stats.to_bytes())
    probe = rng.normal(size=(5, 12))
    np.testing.assert_allclose(again.distances(probe), stats.distances(probe), rtol=1e-5)
    import io

    buf = io.BytesIO()
    np.savez(buf, mean=np.zeros(3), evil=np.zeros(3))
    with pytest.raises(ValueError):
        GaussianStats.from_bytes(buf.getvalue())
    with pytest.raises(ValueError):
        stats.distances(rng.normal(size=(2, 5)))


def _gated_model(tmp_path: Path, *, tamper: bool = False) -> Path:
    """The tiny model with a 'features' output (its pooled input) and a fitted gate."""
    import onnx
    from onnx import TensorProto, helper

    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx", size=32)
    model = onnx.load(str(onnx_path))
    model.graph.node.append(helper.make_node("Identity", ["pooled4"], ["features"]))
    model.graph.output.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 1]))
    onnx.save(model, str(onnx_path))
    rng = np.random.default_rng(3)
    stats = fit_gaussian(rng.normal(0.5, 0.05, size=(100, 1)), components=1)
    (tmp_path / "ood.npz").write_bytes(stats.to_bytes())
    sha = hashlib.sha256((tmp_path / "ood.npz").read_bytes()).hexdigest()
    manifest = tiny_manifest_dict(hashlib.sha256(onnx_path.read_bytes()).hexdigest())
    manifest["outputs"].append(
        {"name": "features", "shape": [-1, 1], "dtype": "float32", "role": "features", "activation": "none"}
    )
    manifest["ood"] = {
        "method": "mahalanobis",
        "features_output": "features",
        "stats_file": "ood.npz",
        "stats_sha256": ("0" * 64) if tamper else sha,
        "threshold": 3.0,
        "acceptance_target": 0.99,
        "basis": "fitted on 100 draws for this test",
    }
    (tmp_path / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return tmp_path


def test_predictor_loads_the_gate_and_measures_each_row(tmp_path: Path) -> None:
    from models.predictor import OnnxPredictor

    predictor = OnnxPredictor(load_manifest(_gated_model(tmp_path)), providers="cpu")
    assert predictor.ood is not None
    batch = np.stack([np.full((1, 32, 32), 0.5, np.float32), np.full((1, 32, 32), 0.95, np.float32)])
    distances = predictor.ood_distances(predictor.predict(batch))
    assert distances is not None
    assert distances[0] < 3.0 < distances[1]


def test_tampered_stats_file_is_refused_before_any_session(tmp_path: Path) -> None:
    loaded = load_manifest(_gated_model(tmp_path, tamper=True))
    with pytest.raises(ModelIntegrityError, match="ood stats sha256"):
        verify_artifact(loaded)
    with pytest.raises(ModelIntegrityError):
        OodGate(loaded)


def test_manifest_ood_block_must_name_a_features_output(tmp_path: Path) -> None:
    d = _gated_model(tmp_path)
    data = yaml.safe_load((d / "manifest.yaml").read_text())
    data["ood"]["features_output"] = "logits"
    with pytest.raises(ManifestError, match="ood"):
        parse_manifest(yaml.safe_dump(data))
