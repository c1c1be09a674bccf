"""Fit a model version's out-of-distribution gate: the step after export in every training run.

``fit_ood_gate`` runs the exported ONNX model (the artifact serving will run, so the fitted
features are exactly the ones the gate will see) over the training images, fits the Gaussian
(``models.ood.fit_gaussian``), chooses the distance limit on the validation images for the
configured in-distribution acceptance, and writes ``ood.npz`` beside the staged artifact. The
returned ``ood:`` manifest block states the basis. A hospital retraining on its own studies
runs the same step, so its model's gate accepts its own images.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from models.manifest import file_sha256
from models.ood import GaussianStats, fit_gaussian, threshold_for_acceptance
from models.pixels import PixelFrame
from models.preprocessing import get_pipeline
from training.evaluate_ood import GateEvaluation, evaluate_gate

logger = logging.getLogger(__name__)

STATS_FILE = "ood.npz"
FEATURES_OUTPUT = "features"


class OnnxFeatures:
    """Run an exported artifact and return its ``features`` output (and scores) in batches."""

    def __init__(self, onnx_path: Path, *, input_name: str = "image", threads: int = 2) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(onnx_path), sess_options=options, providers=["CPUExecutionProvider"])
        self.input_name = input_name
        self.names = [o.name for o in self.session.get_outputs()]

    def __call__(self, tensors: NDArray[np.float32], batch_size: int = 16) -> NDArray[np.float32]:
        return self.run(tensors, batch_size)[FEATURES_OUTPUT]

    def run(self, tensors: NDArray[np.float32], batch_size: int = 16) -> dict[str, NDArray[np.float32]]:
        outs: dict[str, list[NDArray[np.float32]]] = {n: [] for n in self.names}
        for start in range(0, len(tensors), batch_size):
            batch = np.ascontiguousarray(tensors[start : start + batch_size], dtype=np.float32)
            for name, value in zip(self.names, self.session.run(self.names, {self.input_name: batch}), strict=True):
                outs[name].append(np.asarray(value, np.float32))
        return {n: np.concatenate(v) if v else np.zeros((0,), np.float32) for n, v in outs.items()}


@dataclass
class FittedGate:
    stats: GaussianStats
    threshold: float
    acceptance_target: float
    basis: str
    validation_distances: NDArray[np.float64]
    metrics: dict[str, float] = field(default_factory=dict)

    def manifest_block(self, stats_sha256: str) -> dict[str, Any]:
        return {
            "method": "mahalanobis",
            "features_output": FEATURES_OUTPUT,
            "stats_file": STATS_FILE,
            "stats_sha256": stats_sha256,
            "threshold": round(self.threshold, 3),
            "acceptance_target": self.acceptance_target,
            "basis": self.basis,
            "metrics": {k: round(float(v), 4) for k, v in self.metrics.items()},
        }

    def write(self, directory: Path) -> str:
        """Write ``ood.npz`` into ``directory``; returns its sha256."""
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / STATS_FILE
        path.write_bytes(self.stats.to_bytes())
        return file_sha256(path)


def fit_ood_gate(
    features_of: OnnxFeatures,
    train: NDArray[np.float32],
    validation: NDArray[np.float32],
    *,
    acceptance: float,
    data_text: str,
    components: int = 256,
    margin: float = 1.0,
) -> FittedGate:
    """Fit on ``train`` model inputs; the limit is ``margin`` x the ``validation`` distance that
    accepts ``acceptance`` of it."""
    f_train = features_of(train)
    stats = fit_gaussian(f_train, components=components)
    # the limit is chosen on the written (float32) statistics: what serving will load
    stats = GaussianStats.from_bytes(stats.to_bytes())
    d_val = stats.distances(features_of(validation))
    threshold = margin * threshold_for_acceptance(d_val, acceptance)
    d_train = stats.distances(f_train)
    basis = (
        f"Mahalanobis distance of pooled intermediate features to a Gaussian fitted on {data_text} "
        f"(n={len(train)}, Ledoit-Wolf shrinkage, {stats.components.shape[1]} principal directions); "
        + (
            f"limit = the distance that accepts {acceptance:.1%} of the validation split (n={len(validation)})"
            if margin == 1.0
            else f"limit = {margin:g} x the distance that accepts {acceptance:.1%} of the validation split "
            f"(n={len(validation)}), room for acquisition variation (image size, exposure) the network "
            "tolerates but the un-augmented training images do not show"
        )
    )
    logger.info(
        "ood gate: limit %.2f (validation median %.2f, training median %.2f)",
        threshold,
        float(np.median(d_val)),
        float(np.median(d_train)),
    )
    return FittedGate(
        stats=stats,
        threshold=threshold,
        acceptance_target=acceptance,
        basis=basis,
        validation_distances=d_val,
        metrics={"validation_acceptance": float(np.mean(d_val <= threshold))},
    )


def stack_inputs(dataset: Sequence[dict[str, Any]], key: str = "image") -> NDArray[np.float32]:
    """Model inputs of a (MONAI) dataset as one ``(N, C, H, W)`` array."""
    return np.stack([np.asarray(dataset[i][key], np.float32) for i in range(len(dataset))])


def fit_and_evaluate(
    onnx_path: Path,
    train: NDArray[np.float32],
    validation: NDArray[np.float32],
    heldout: NDArray[np.float32],
    heldout_frames: Sequence[PixelFrame],
    *,
    preprocessing: str,
    acceptance: float,
    components: int,
    data_text: str,
    staged_dir: Path,
    margin: float = 1.0,
) -> tuple[dict[str, Any], GateEvaluation]:
    """The training pipeline's last step: fit the gate on ``train``, choose its limit on
    ``validation``, measure it on ``heldout`` (another seed) and the far/near-OOD sets, write
    ``ood.npz`` into ``staged_dir``. Returns the manifest's ``ood:`` block and the evaluation."""
    features_of = OnnxFeatures(onnx_path)
    gate = fit_ood_gate(
        features_of,
        train,
        validation,
        acceptance=acceptance,
        data_text=data_text,
        components=components,
        margin=margin,
    )
    evaluation = evaluate_gate(
        lambda batch: gate.stats.distances(features_of(batch)),
        gate.threshold,
        heldout,
        list(heldout_frames)[:100],
        get_pipeline(preprocessing),
        int(train.shape[1]),
    )
    gate.metrics.update(evaluation.metrics)
    return gate.manifest_block(gate.write(staged_dir)), evaluation
