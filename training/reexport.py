"""Re-export a registered version from its shipped weights with the ``features`` output and a
fitted out-of-distribution gate, as a new version (the source version is never changed).

    python -m training.reexport --model cxr-triage@1.0.0 --version 1.1.0 [--register]
    python -m training.reexport --model endoscopy-polyp@1.0.0 --version 1.1.0 [--register]

Same weights (``weights.pt``, sha256 checked), same thresholds, same parity gate as a training
run; the training and validation images are regenerated with the seeds of the version's
training config, the gate is fitted on the training split, its limit chosen on the validation
split, and it is measured on the held-out set (test seed) and the far/near-OOD sets. The new
version's scores are also compared with the source version's artifact on the same inputs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import yaml

from models.manifest import LoadedManifest
from models.pixels import PixelFrame, load_frames
from models.preprocessing import get_pipeline
from models.registry import REGISTRY_ROOT, register_version, resolve
from training.config import TrainConfig
from training.export_onnx import export_onnx, load_weights, parity_check, stage_model
from training.model_card import ood_section
from training.networks import CxrWithCam, PolypWithScore, cxr_network, polyp_network
from training.ood_fit import fit_and_evaluate

logger = logging.getLogger("training.reexport")
REPO = Path(__file__).resolve().parents[1]


def _inputs(files: list[Path], preprocessing: str) -> tuple[np.ndarray, list[PixelFrame]]:
    pipeline = get_pipeline(preprocessing)
    frames = [load_frames(f, frame_indices=[0], target_size=pipeline.decode_size)[0] for f in files]
    return np.stack([pipeline(f) for f in frames]).astype(np.float32), frames


def split_files(cfg: TrainConfig, work: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(train, validation, held-out test) image files exactly as the training run split them."""
    if cfg.manifest["accepts"]["samples_per_pixel"] == 1:
        from training.train_cxr import _datasets, data_root

        train, val, test = _datasets(cfg, work, data_root(cfg, work))
        return list(train.files), list(val.files), list(test.files)
    from training.train_polyp import split_records

    tr, va, te = split_records(cfg, work)
    return [Path(str(r["image"])) for r in tr], [Path(str(r["image"])) for r in va], [Path(str(r["image"])) for r in te]


def reexport(source: LoadedManifest, version: str, out: Path, *, register: bool = False) -> dict[str, Any]:
    """Stage ``source``'s weights as ``version`` with features + gate; optionally register it."""
    src = source.manifest
    cfg = TrainConfig.from_yaml(REPO / src.provenance.training_config, version=version)
    prov = src.provenance
    if not prov.weights_file:
        raise ValueError(f"{src.ref} ships no weights to re-export")
    colour = src.accepts.samples_per_pixel == 3
    if colour:
        net = load_weights(polyp_network(), source.directory / prov.weights_file, prov.weights_sha256)
        wrapper: torch.nn.Module = PolypWithScore(net.eval(), features=True).eval()
    else:
        net = load_weights(cxr_network(len(src.labels)), source.directory / prov.weights_file, prov.weights_sha256)
        wrapper = CxrWithCam(net.eval(), features=True).eval()
    out.mkdir(parents=True, exist_ok=True)
    train_files, val_files, test_files = split_files(cfg, out)
    preprocessing = src.input.preprocessing
    x_train, _ = _inputs(train_files, preprocessing)
    x_val, _ = _inputs(val_files, preprocessing)
    x_test, test_frames = _inputs(test_files, preprocessing)
    logger.info("inputs: %d train, %d validation, %d held-out", len(x_train), len(x_val), len(x_test))

    names = [o.name for o in src.outputs if o.role.value != "features"] + ["features"]
    onnx_path = out / f"{src.id}-{version}.onnx"
    golden = x_test[:4]
    export_onnx(wrapper, torch.from_numpy(golden), onnx_path, input_name=src.input.name, output_names=names)
    parity = parity_check(wrapper, onnx_path, golden, input_name=src.input.name, atol=2e-3 if colour else 1e-4)
    # same weights: the new artifact's scores against the source version's on the same inputs
    scores = src.outputs[0].name
    old = ort.InferenceSession(str(source.artifact_path), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    same = float(
        np.abs(old.run([scores], {src.input.name: golden})[0] - new.run([scores], {src.input.name: golden})[0]).max()
    )
    logger.info("parity %.2e; max |%s - new| on %s = %.2e", parity, src.ref, scores, same)

    staged = out / "staged" / src.id / version
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    kind = "frames" if colour else "images"
    block, evaluation = fit_and_evaluate(
        onnx_path,
        x_train,
        x_val,
        x_test,
        test_frames,
        preprocessing=preprocessing,
        acceptance=cfg.ood.acceptance,
        components=cfg.ood.components,
        margin=cfg.ood.margin,
        data_text=f"the {cfg.data.source} training split ({len(x_train)} {kind}, seed {cfg.data.train_seed})",
        staged_dir=staged,
    )
    manifest: dict[str, Any] = json.loads(src.model_dump_json())
    manifest["version"] = version
    dim = int(block_dim(onnx_path))
    manifest["outputs"] = [o for o in manifest["outputs"] if o["role"] != "features"] + [
        {"name": "features", "shape": [-1, dim], "dtype": "float32", "role": "features", "activation": "none"}
    ]
    manifest["artifact"] = {**manifest["artifact"], "file": onnx_path.name, "sha256": "0" * 64}
    manifest["ood"] = block
    manifest["provenance"] = {
        **manifest["provenance"],
        "created": dt.date.today().isoformat(),
        "trained_on": manifest["provenance"]["trained_on"]
        + f" Re-exported from {src.ref}'s weights.pt (same weights and thresholds) with the out-of-distribution gate.",
        "metrics": {
            **manifest["provenance"]["metrics"],
            "ood_heldout_acceptance": round(evaluation.metrics["heldout_acceptance"], 4),
            "ood_far_auroc": round(evaluation.metrics.get("far_ood_auroc", float("nan")), 4),
        },
    }
    card = (source.directory / "MODEL_CARD.md").read_text()
    card = card.replace(f"# Model card: {src.id} {src.version}", f"# Model card: {src.id} {version}", 1)
    card = card.rstrip() + "\n\n" + ood_section(block, evaluation, prov.data)
    card += (
        f"\nThis version is {src.ref} re-exported from its `weights.pt` (sha256 {prov.weights_sha256[:12]}...) with"
        f" the extra `features` output: ONNX parity {parity:.2e}; max score difference to {src.ref} {same:.1e}.\n"
    )
    shutil.copyfile(source.directory / prov.weights_file, staged / prov.weights_file)
    stage_model(staged, manifest, onnx_path, card)
    report: dict[str, Any] = {
        "staged": str(staged),
        "parity_max_abs_diff": parity,
        "max_score_diff_to_source": same,
        "ood": block,
        "evaluation": evaluation.table(),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2, default=float))
    if register:
        report["registered"] = str(register_version(staged, REGISTRY_ROOT))
    return report


def block_dim(onnx_path: Path) -> int:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    out = next(o for o in session.get_outputs() if o.name == "features")
    return int(out.shape[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="source id@version, e.g. cxr-triage@1.0.0")
    parser.add_argument("--version", required=True, help="the new version, e.g. 1.1.0")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default var/train/<cxr|polyp>)")
    parser.add_argument("--register", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    model_id, _, version = args.model.partition("@")
    source = resolve(model_id, version or "latest")
    out = args.out or REPO / "var" / "train" / ("polyp" if source.manifest.accepts.samples_per_pixel == 3 else "cxr")
    report = reexport(source, args.version, out, register=args.register)
    print(report["evaluation"])
    print(yaml.safe_dump({k: v for k, v in report.items() if k != "evaluation"}, sort_keys=False))


if __name__ == "__main__":
    main()
