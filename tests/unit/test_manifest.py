"""Manifest contract: valid once constructed, checksum before session, signature checked."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from models.errors import ManifestError, ModelIntegrityError
from models.manifest import load_manifest, parse_manifest, verify_artifact
from models.predictor import OnnxPredictor
from models.registry import VersionExists, list_versions, register_version, resolve
from tests.conftest import build_tiny_onnx, tiny_manifest_dict


def _dump(d: dict) -> str:
    return yaml.safe_dump(d, sort_keys=False)


def test_manifest_rejects_unknown_key() -> None:
    d = tiny_manifest_dict("0" * 64)
    d["surprise"] = 1
    with pytest.raises(ManifestError, match="surprise"):
        parse_manifest(_dump(d))


def test_manifest_rejects_non_semver_version() -> None:
    d = tiny_manifest_dict("0" * 64)
    d["version"] = "1.2"
    with pytest.raises(ManifestError, match="version"):
        parse_manifest(_dump(d))


def test_manifest_rejects_label_count_not_matching_output() -> None:
    d = tiny_manifest_dict("0" * 64)
    d["labels"] = d["labels"][:1]
    with pytest.raises(ManifestError, match="2 channels for 1 labels"):
        parse_manifest(_dump(d))


def test_manifest_rejects_threshold_outside_unit_interval() -> None:
    d = tiny_manifest_dict("0" * 64)
    d["labels"][0]["threshold"] = 1.0
    with pytest.raises(ManifestError, match="threshold"):
        parse_manifest(_dump(d))


def test_manifest_rejects_static_batch_dimension() -> None:
    d = tiny_manifest_dict("0" * 64)
    d["input"]["shape"] = [1, 1, 32, 32]
    with pytest.raises(ManifestError, match="dynamic batch"):
        parse_manifest(_dump(d))


def test_verify_artifact_refuses_checksum_mismatch(tiny_model_dir: Path) -> None:
    artifact = tiny_model_dir / "tiny.onnx"
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 0x01  # one flipped bit
    artifact.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="does not match manifest"):
        verify_artifact(load_manifest(tiny_model_dir))


def test_predictor_refuses_tampered_artifact_before_session(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    created = []
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: created.append(1))
    (tiny_model_dir / "tiny.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelIntegrityError):
        OnnxPredictor(load_manifest(tiny_model_dir))
    assert created == []  # no session was ever opened


def test_verify_artifact_refuses_symlinked_artifact(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    outside = tmp_path_factory.mktemp("elsewhere") / "tiny.onnx"
    shutil.move(tiny_model_dir / "tiny.onnx", outside)
    (tiny_model_dir / "tiny.onnx").symlink_to(outside)
    with pytest.raises(ModelIntegrityError, match="regular file beside its manifest"):
        verify_artifact(load_manifest(tiny_model_dir))


def test_predictor_refuses_signature_mismatch(tmp_path: Path) -> None:
    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx", size=48)  # manifest says 32
    import hashlib

    sha = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    (tmp_path / "manifest.yaml").write_text(_dump(tiny_manifest_dict(sha, size=32)))
    with pytest.raises(ManifestError, match="input shape"):
        OnnxPredictor(load_manifest(tmp_path))


def test_predictor_refuses_wrong_output_name(tmp_path: Path) -> None:
    import hashlib

    onnx_path = build_tiny_onnx(tmp_path / "tiny.onnx")
    d = tiny_manifest_dict(hashlib.sha256(onnx_path.read_bytes()).hexdigest())
    d["outputs"][0]["name"] = "scores"
    (tmp_path / "manifest.yaml").write_text(_dump(d))
    with pytest.raises(ManifestError, match="no output 'scores'"):
        OnnxPredictor(load_manifest(tmp_path))


def test_register_version_never_overwrites(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    registry = tmp_path_factory.mktemp("registry")
    target = register_version(tiny_model_dir, registry)
    assert (target / "manifest.yaml").is_file()
    with pytest.raises(VersionExists, match="bump the version"):
        register_version(tiny_model_dir, registry)
    # a new version lands beside the old one; "latest" is the highest semver
    d = yaml.safe_load((tiny_model_dir / "manifest.yaml").read_text())
    d["version"] = "0.10.0"
    (tiny_model_dir / "manifest.yaml").write_text(_dump(d))
    register_version(tiny_model_dir, registry)
    assert [e.version for e in list_versions(registry)] == ["0.1.0", "0.10.0"]
    assert resolve("tiny-test", "latest", registry).manifest.version == "0.10.0"
    assert resolve("tiny-test", "0.1.0", registry).manifest.version == "0.1.0"


def test_registered_reference_models_verify() -> None:
    """The shipped reference models must pass their own checksums and signature checks."""
    entries = list_versions()
    assert {e.model_id for e in entries} >= {"cxr-triage", "endoscopy-polyp"}
    for e in entries:
        loaded = resolve(e.model_id, e.version)
        predictor = OnnxPredictor(loaded, providers="cpu")
        assert predictor.self_test().ok
        assert "not for clinical use" in loaded.manifest.provenance.trained_on.lower()
        assert (e.path / "MODEL_CARD.md").is_file()


def test_manifest_refuses_an_input_type_the_predictor_cannot_feed(tiny_model_dir: Path) -> None:
    """The predictor feeds float32 tensors: a manifest declaring another input type is refused at load."""
    text = (tiny_model_dir / "manifest.yaml").read_text()
    assert "dtype: float32" in text
    (tiny_model_dir / "manifest.yaml").write_text(text.replace("dtype: float32", "dtype: uint8", 1))
    with pytest.raises(ManifestError, match="dtype"):
        load_manifest(tiny_model_dir)
