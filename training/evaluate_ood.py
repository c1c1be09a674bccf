"""Evaluate a model version's out-of-distribution gate.

    python -m training.evaluate_ood --model cxr-triage@1.1.0
    python -m training.evaluate_ood --model endoscopy-polyp@1.1.0 --json

Prints, per image set, how many images the gate refuses and the AUROC of the gate's distance
for telling that set from held-out in-distribution images (synthetic, generated with the test
seed of the model's training config: never seen in training or in choosing the limit):

* in-distribution acceptance on the held-out set (target >= 98 %);
* far-OOD: pydicom's and pydicom-data's MR, CT, ultrasound, NM, segmentation and secondary
  capture images, the real lower leg ``RG3`` and project-generated non-chest phantoms (target
  AUROC >= 0.99);
* near-OOD: the held-out images rotated, upside down, mirrored, inverted, noisy, cropped;
* real radiographs (``RG1``) for a model trained on phantoms only.

The gate alone is measured here: every image reaches the network, including those the content
check (models/content.py) would refuse before it.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import roc_auc_score

from models.pixels import PixelFrame, load_frames
from models.preprocessing import Pipeline, get_pipeline
from training import ood_sets
from training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
Distances = Callable[[NDArray[np.float32]], NDArray[np.float64]]

FAR_TARGET_AUROC = 0.99
HELDOUT_TARGET_ACCEPTANCE = 0.98


@dataclass
class SetResult:
    name: str
    kind: str  # in-distribution | far | near | real
    n: int
    refused: float  # share of the set above the limit
    auroc: float | None  # distance: this set vs held-out in-distribution
    median_distance: float


@dataclass
class GateEvaluation:
    """Per-set results and the pooled numbers that go into the manifest's ``ood.metrics``."""

    threshold: float
    results: list[SetResult]
    metrics: dict[str, float]

    def table(self) -> str:
        rows = [
            f"| set | kind | n | refused | AUROC vs held-out | median distance (limit {self.threshold:.1f}) |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.results:
            auc = f"{r.auroc:.3f}" if r.auroc is not None else "-"
            rows.append(f"| {r.name} | {r.kind} | {r.n} | {r.refused:.1%} | {auc} | {r.median_distance:.1f} |")
        return "\n".join(rows)


def _auroc(inside: NDArray[np.float64], outside: NDArray[np.float64]) -> float:
    y = np.r_[np.zeros(len(inside)), np.ones(len(outside))]
    return float(roc_auc_score(y, np.r_[inside, outside]))


def evaluate_gate(
    distances: Distances,
    threshold: float,
    heldout: NDArray[np.float32],
    heldout_frames: Sequence[PixelFrame],
    pipeline: Pipeline,
    channels: int,
) -> GateEvaluation:
    """Measure the gate (``distances`` + ``threshold``) on held-out, far-OOD and near-OOD sets."""
    d_in = distances(heldout)
    template = heldout_frames[0]
    sets: list[tuple[str, ood_sets.ImageSet]] = []
    files = ood_sets.file_set(
        "pydicom / pydicom-data MR, CT, US, NM, SEG, SC and RG3", ood_sets.FAR_OOD_FILES, pipeline, channels
    )
    sets.append(("far", files))
    sets.append(("far", ood_sets.phantom_set(pipeline, channels, template)))
    real = ood_sets.file_set("real chest radiograph RG1 (4 encodings)", ood_sets.REAL_CHEST_FILES, pipeline, channels)
    sets.append(("real" if channels == 1 else "far", real))
    for near in ood_sets.near_ood_sets(heldout_frames, pipeline, channels):
        sets.append(("near", near))
    results = [
        SetResult(
            "held-out synthetic (other seed)",
            "in-distribution",
            len(d_in),
            float(np.mean(d_in > threshold)),
            None,
            float(np.median(d_in)),
        )
    ]
    pooled: dict[str, list[NDArray[np.float64]]] = {"far": [], "near": [], "real": []}
    for kind, image_set in sets:
        if not len(image_set):
            continue
        d = distances(image_set.tensors)
        pooled[kind].append(d)
        results.append(
            SetResult(image_set.name, kind, len(d), float(np.mean(d > threshold)), _auroc(d_in, d), float(np.median(d)))
        )
    metrics = {"heldout_acceptance": float(np.mean(d_in <= threshold)), "heldout_n": float(len(d_in))}
    for kind, parts in pooled.items():
        if parts:
            d = np.concatenate(parts)
            metrics[f"{kind}_ood_auroc"] = _auroc(d_in, d)
            metrics[f"{kind}_ood_refused"] = float(np.mean(d > threshold))
            metrics[f"{kind}_ood_n"] = float(len(d))
    return GateEvaluation(threshold=threshold, results=results, metrics=metrics)


def heldout_set(
    cfg: TrainConfig, work: Path, *, limit: int | None = None
) -> tuple[NDArray[np.float32], list[PixelFrame]]:
    """The held-out synthetic test set of ``cfg`` (generated with its test seed, cached in ``work``)."""
    from models.synthetic.cxr import generate_cxr_dataset
    from models.synthetic.endoscopy import generate_kvasir_folder

    pipeline = get_pipeline(cfg.manifest["input"]["preprocessing"])
    seed, n = cfg.data.test_seed, cfg.data.n_test
    if cfg.manifest["accepts"]["samples_per_pixel"] == 1:
        folder = work / f"data-seed{seed}-n{n}-{cfg.data.image_size[0]}"
        if not (folder / "Data_Entry.csv").exists():
            generate_cxr_dataset(folder, n, seed, size=(cfg.data.image_size[0], cfg.data.image_size[1]))
        files = sorted(folder.glob("*.dcm"))
    else:
        folder = work / f"data-test-seed{seed}-n{n}"
        if not (folder / "labels.csv").exists():
            generate_kvasir_folder(folder, n, seed, size=cfg.data.image_size[0])
        files = sorted((folder / "images").glob("*.dcm"))
    files = files[:limit] if limit else files
    frames = [load_frames(f, frame_indices=[0], target_size=pipeline.decode_size)[0] for f in files]
    tensors = np.stack([pipeline(f) for f in frames]).astype(np.float32)
    return tensors, frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="id@version from the registry, e.g. cxr-triage@1.1.0")
    parser.add_argument("--work", type=Path, default=None, help="cache folder for the held-out set (var/train/<model>)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON after the table")
    args = parser.parse_args()
    from models.predictor import OnnxPredictor
    from models.registry import resolve

    model_id, _, version = args.model.partition("@")
    predictor = OnnxPredictor(resolve(model_id, version or "latest"), providers="cpu")
    manifest = predictor.manifest
    if predictor.ood is None or manifest.ood is None:
        raise SystemExit(f"{manifest.ref} has no out-of-distribution gate")
    gate = predictor.ood
    cfg = TrainConfig.from_yaml(REPO / manifest.provenance.training_config)
    work = args.work or REPO / "var" / "train" / ("cxr" if manifest.accepts.samples_per_pixel == 1 else "polyp")
    tensors, frames = heldout_set(cfg, work)

    def distances(batch: NDArray[np.float32]) -> NDArray[np.float64]:
        feats = [predictor.predict(batch[i : i + 16])[gate.features_output] for i in range(0, len(batch), 16)]
        return gate.stats.distances(np.concatenate(feats))

    evaluation = evaluate_gate(
        distances, gate.threshold, tensors, frames, get_pipeline(manifest.input.preprocessing), manifest.input.shape[1]
    )
    m = evaluation.metrics
    print(f"{manifest.ref}: out-of-distribution gate, limit {gate.threshold:.1f} ({manifest.ood.basis})")
    print(evaluation.table())
    print(
        f"held-out acceptance {m['heldout_acceptance']:.1%} (target >= {HELDOUT_TARGET_ACCEPTANCE:.0%}); "
        f"far-OOD AUROC {m.get('far_ood_auroc', float('nan')):.4f} (target >= {FAR_TARGET_AUROC}), "
        f"refused {m.get('far_ood_refused', float('nan')):.1%}; near-OOD AUROC {m.get('near_ood_auroc', float('nan')):.4f}"
        + (f"; real radiographs refused {m['real_ood_refused']:.0%}" if "real_ood_refused" in m else "")
    )
    if args.json:
        print(json.dumps({"metrics": m, "sets": [asdict(r) for r in evaluation.results]}, indent=2))


if __name__ == "__main__":
    main()
