"""ONNX Runtime predictor: provider fallback, batching, non-finite handling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.errors import InferenceFailed, ManifestError
from models.manifest import load_manifest
from models.predictor import LABEL_ORDER_KEY, OnnxPredictor, choose_providers, cuda_device_count


def _names(providers: list[str | tuple[str, dict[str, object]]]) -> list[str]:
    return [p if isinstance(p, str) else p[0] for p in providers]


def test_choose_providers_prefers_the_gpu_only_when_one_is_usable() -> None:
    gpu_build = {"TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"}
    cpu_build = {"CPUExecutionProvider"}
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    assert _names(choose_providers("auto", available=gpu_build, gpu=True)) == [cuda, cpu]
    assert _names(choose_providers("cuda", available=gpu_build, gpu=True)) == [cuda, cpu]
    assert _names(choose_providers("tensorrt", available=gpu_build, gpu=True)) == [
        "TensorrtExecutionProvider",
        cuda,
        cpu,
    ]
    # no device (the GPU build installed on a CPU machine), or a CPU-only build: CPU alone
    assert _names(choose_providers("auto", available=gpu_build, gpu=False)) == [cpu]
    assert _names(choose_providers("cuda", available=cpu_build, gpu=True)) == [cpu]
    # asked for CPU: never a GPU, even when one is there
    assert _names(choose_providers("cpu", available=gpu_build, gpu=True)) == [cpu]


def test_predictor_reports_provider_it_really_got(tiny_model_dir: Path) -> None:
    predictor = OnnxPredictor(load_manifest(tiny_model_dir), providers="auto")
    expected = "CUDAExecutionProvider" if cuda_device_count() > 0 else "CPUExecutionProvider"
    assert predictor.provider == expected


def test_predictor_batch_matches_single_rows(tiny_model_dir: Path) -> None:
    predictor = OnnxPredictor(load_manifest(tiny_model_dir), providers="cpu")
    rng = np.random.default_rng(0)
    batch = rng.random((3, 1, 32, 32), dtype=np.float32)
    together = predictor.scores(predictor.predict(batch))
    one_by_one = np.concatenate([predictor.scores(predictor.predict(batch[i : i + 1])) for i in range(3)])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-6)
    # tiny model: logits = mean(x) * W + B, so the score is a known function of the mean
    mean = batch.mean(axis=(1, 2, 3))
    expected = 1 / (1 + np.exp(-(mean[:, None] * np.array([-2.0, 2.0]) + np.array([-0.5, 0.5]))))
    np.testing.assert_allclose(together, expected, rtol=1e-5)


def test_predictor_rejects_wrong_shape_and_nan(tiny_model_dir: Path) -> None:
    predictor = OnnxPredictor(load_manifest(tiny_model_dir), providers="cpu")
    with pytest.raises(InferenceFailed, match="does not fit input"):
        predictor.predict(np.zeros((1, 1, 16, 16), np.float32))
    bad = np.zeros((1, 1, 32, 32), np.float32)
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(InferenceFailed, match="non-finite"):
        predictor.predict(bad)


def test_self_test_passes_and_names_provider(tiny_model_dir: Path) -> None:
    result = OnnxPredictor(load_manifest(tiny_model_dir), providers="cpu").self_test()
    assert result.ok and result.provider == "CPUExecutionProvider" and result.latency_ms > 0


def _record_order(model_dir: Path, order: str) -> None:
    """Write an output order into the tiny artifact's metadata and re-pin its checksum."""
    import hashlib

    import onnx
    import yaml

    onnx_path = model_dir / "tiny.onnx"
    model = onnx.load(str(onnx_path))
    model.metadata_props.add(key=LABEL_ORDER_KEY, value=order)
    onnx.save(model, str(onnx_path))
    manifest = yaml.safe_load((model_dir / "manifest.yaml").read_text())
    manifest["artifact"]["sha256"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    (model_dir / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


def test_predictor_refuses_an_artifact_whose_output_order_is_not_the_manifests(tiny_model_dir: Path) -> None:
    """Findings are named by position: the order the exporter recorded must be the manifest's."""
    _record_order(tiny_model_dir, "beta,alpha")
    with pytest.raises(ManifestError, match="another order"):
        OnnxPredictor(load_manifest(tiny_model_dir), providers="cpu")


def test_predictor_loads_an_artifact_recording_the_manifests_order(tiny_model_dir: Path) -> None:
    _record_order(tiny_model_dir, "alpha,beta")
    assert OnnxPredictor(load_manifest(tiny_model_dir), providers="cpu").manifest.labels[0].key == "alpha"
