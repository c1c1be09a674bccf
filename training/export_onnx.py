"""Export to ONNX, prove parity with PyTorch, then stage a manifest + artifact + model card.

``stage_model`` refuses to write a manifest unless the ONNX Runtime outputs match PyTorch's on
the golden inputs (``ParityError``). Optional static INT8 (QDQ) quantisation is measured, not
assumed: ``quantize_static_int8`` returns the artifact and the caller reports its accuracy cost.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import yaml
from numpy.typing import NDArray
from torch import nn

from models.errors import ParityError
from models.manifest import file_sha256, load_manifest, parse_manifest
from models.predictor import LABEL_ORDER_KEY, OnnxPredictor

logger = logging.getLogger(__name__)


def export_onnx(
    module: nn.Module,
    example: torch.Tensor,
    path: Path,
    *,
    input_name: str,
    output_names: Sequence[str],
    opset: int = 17,
) -> Path:
    """Export ``module`` (eval mode, fp32) with a dynamic batch dimension."""
    module = module.eval().float()
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_axes = {input_name: {0: "batch"}, **{name: {0: "batch"} for name in output_names}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example.float(),),
            str(path),
            input_names=[input_name],
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            dynamo=False,
        )
    return path


def parity_check(
    module: nn.Module,
    onnx_path: Path,
    inputs: NDArray[np.float32],
    *,
    input_name: str,
    rtol: float = 1e-3,
    atol: float = 1e-4,
) -> float:
    """Max abs difference between PyTorch and ONNX Runtime on ``inputs`` for every output.

    Raises:
        ParityError: any output differs beyond ``atol + rtol * |torch|``.
    """
    module = module.eval().float()
    with torch.no_grad():
        expected = module(torch.from_numpy(inputs))
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {input_name: inputs})
    worst = 0.0
    for i, (e, g) in enumerate(zip(expected, got, strict=True)):
        e_np = e.numpy()
        diff = np.abs(e_np - g)
        worst = max(worst, float(diff.max()))
        if not np.all(diff <= atol + rtol * np.abs(e_np)):
            raise ParityError(f"output {i}: max |torch - onnx| = {diff.max():.3g} beyond tolerance")
    return worst


def save_weights(module: nn.Module, path: Path) -> str:
    """Save a state_dict (loadable with ``torch.load(weights_only=True)``); returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    return file_sha256(path)


def load_weights(module: nn.Module, path: Path, sha256: str) -> nn.Module:
    """Load fine-tuning weights after checking their sha256; never unpickles arbitrary objects."""
    actual = file_sha256(path)
    if actual != sha256:
        raise ValueError(f"weights {path.name}: sha256 {actual[:12]}... does not match {sha256[:12]}...")
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return module


def write_label_order(onnx_path: Path, keys: Sequence[str]) -> None:
    """Record the output order in the artifact's metadata (``LABEL_ORDER_KEY``), where the
    predictor checks it against the manifest at every load."""
    import onnx

    model = onnx.load(str(onnx_path))
    for prop in list(model.metadata_props):
        if prop.key == LABEL_ORDER_KEY:
            model.metadata_props.remove(prop)
    model.metadata_props.add(key=LABEL_ORDER_KEY, value=",".join(keys))
    onnx.save(model, str(onnx_path))


def stage_model(
    staged_dir: Path,
    manifest: dict[str, Any],
    onnx_path: Path,
    model_card: str,
) -> Path:
    """Write ``manifest.yaml`` (with the artifact's sha256), the artifact and ``MODEL_CARD.md``,
    then load them back through ``OnnxPredictor`` (checksum + signature) as the final check."""
    staged_dir.mkdir(parents=True, exist_ok=True)
    target = staged_dir / manifest["artifact"]["file"]
    if onnx_path.resolve() != target.resolve():
        shutil.copyfile(onnx_path, target)
    write_label_order(target, [str(label["key"]) for label in manifest["labels"]])
    manifest = {**manifest, "artifact": {**manifest["artifact"], "sha256": file_sha256(target)}}
    text = yaml.safe_dump(manifest, sort_keys=False, allow_unicode=True)
    parse_manifest(text)  # schema check before anything is written
    (staged_dir / "manifest.yaml").write_text(text)
    (staged_dir / "MODEL_CARD.md").write_text(model_card)
    OnnxPredictor(load_manifest(staged_dir), providers="cpu")
    return staged_dir


def quantize_static_int8(
    onnx_path: Path,
    out_path: Path,
    calibration: NDArray[np.float32],
    *,
    input_name: str,
) -> Path:
    """Static INT8 quantisation (QDQ, per-channel weights) calibrated on real preprocessed inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(calibration[i : i + 1] for i in range(len(calibration)))

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            batch = next(self._it, None)
            return None if batch is None else {input_name: batch}

    prepared = out_path.with_suffix(".pre.onnx")
    quant_pre_process(str(onnx_path), str(prepared))
    quantize_static(
        str(prepared),
        str(out_path),
        _Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
    )
    prepared.unlink(missing_ok=True)
    return out_path
