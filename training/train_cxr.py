"""Train, evaluate, export and stage the chest radiograph triage model.

    python -m training.train_cxr --config configs/training/cxr_triage.yaml --out var/train/cxr [--register]

Steps: synthetic data (or a ChestX-ray14-layout folder, or labelled studies exported from the
DICOM store with ``dxassist export``; ``data.source``) -> the data's provenance measured -> MONAI CacheDataset over the model's
own preprocessing -> DenseNet121 (bf16 autocast on CPU) -> operating points on the validation
split -> test metrics on a set generated with another seed -> ONNX export with CAM -> parity
check -> manifest + model card -> (optional) INT8 cost -> registry.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, set_track_meta
from monai.transforms import Compose
from monai.utils import set_determinism
from sklearn.metrics import roc_auc_score

from models.manifest import DataKindValues, LoadedManifest, TrainingData
from models.pixels import load_frames
from models.registry import REGISTRY_ROOT, register_version
from models.synthetic.cxr import generate_cxr_dataset
from training.config import TrainConfig, optimiser_and_schedule
from training.datasets import ChestXray14Dataset
from training.evaluate import evaluate_multilabel, threshold_for_sensitivity
from training.export_onnx import (
    export_onnx,
    load_weights,
    parity_check,
    quantize_static_int8,
    save_weights,
    stage_model,
)
from training.model_card import ood_section, write_cxr_card
from training.networks import CxrWithCam, cxr_network
from training.ood_fit import fit_and_evaluate, stack_inputs
from training.plots import plot_calibration, plot_roc
from training.provenance import SPLITS, DataItem, data_kind, describe_data, describe_model, trained_on_text
from training.store_export import export_from_store
from training.transforms import ApplyModelPreprocessd, cxr_train_augment

#: appended to the intended use of a version trained on synthetic data only (``describe_model``)
SYNTHETIC_NOTE = "Reference model trained on synthetic phantoms only: not for clinical use."

logger = logging.getLogger("training.train_cxr")


def label_keys(cfg: TrainConfig) -> tuple[str, ...]:
    """The network's output order: the manifest's labels, the one source of truth (the exporter
    writes it into the artifact and the predictor checks it at load)."""
    return tuple(str(label["key"]) for label in cfg.manifest["labels"])


def data_root(cfg: TrainConfig, work: Path) -> Path:
    """The folder the data lives in: the work folder (synthetic), a fresh export of the store
    (``store``), else the configured folder."""
    if cfg.data.source == "synthetic":
        return work
    if cfg.data.source == "store":
        return export_from_store(cfg.data.store, work / "store-export", layout="chestxray14")
    return Path(cfg.data.source)


def _datasets(
    cfg: TrainConfig, work: Path, root: Path
) -> tuple[ChestXray14Dataset, ChestXray14Dataset, ChestXray14Dataset]:
    """(train, validation, test). Synthetic: test is generated with another seed. A real folder
    (ChestX-ray14 layout, a store export among them) is split: test = val_fraction of it, then
    validation from the rest."""
    if cfg.data.source != "synthetic":
        full = ChestXray14Dataset.from_folder(root, label_keys=label_keys(cfg))
        rest, test = full.split(cfg.data.val_fraction, cfg.data.test_seed)
        train, val = rest.split(cfg.data.val_fraction, cfg.data.train_seed)
        return train, val, test
    sets = []
    for seed, n in ((cfg.data.train_seed, cfg.data.n_train), (cfg.data.test_seed, cfg.data.n_test)):
        folder = work / f"data-seed{seed}-n{n}-{cfg.data.image_size[0]}"
        if not (folder / "Data_Entry.csv").exists():
            logger.info("generating %d synthetic radiographs (seed %d)", n, seed)
            generate_cxr_dataset(folder, n, seed, size=cfg.data.image_size)
        sets.append(ChestXray14Dataset.from_folder(folder, label_keys=label_keys(cfg)))
    train, val = sets[0].split(cfg.data.val_fraction, cfg.data.train_seed)
    return train, val, sets[1]


def _label_sources(root: Path) -> dict[str, str]:
    """``Image Index`` -> ``Label Source`` of a store export's ``Data_Entry.csv`` (else empty)."""
    path = root / "Data_Entry.csv"
    if not path.is_file():
        return {}
    with path.open(newline="") as fh:
        return {row["Image Index"]: row.get("Label Source") or "" for row in csv.DictReader(fh)}


def measure_data(
    cfg: TrainConfig, root: Path, work: Path, sets: tuple[ChestXray14Dataset, ChestXray14Dataset, ChestXray14Dataset]
) -> TrainingData:
    """The data provenance of this run (see ``training/provenance.py``)."""
    keys = label_keys(cfg)
    kind = data_kind(cfg.data.source, root)
    sources = _label_sources(root) if kind is DataKindValues.STORE_EXPORT else {}
    items = [
        DataItem(split, path, dict(zip(keys, (int(v == 1) for v in vector), strict=True)), sources.get(path.name, ""))
        for split, ds in zip(SPLITS, sets, strict=True)
        for path, vector in zip(ds.files, ds.labels, strict=True)
    ]
    if kind is DataKindValues.SYNTHETIC:
        description = (
            "procedural phantoms from models/synthetic/cxr.py, train/validation seed "
            f"{cfg.data.train_seed}, test seed {cfg.data.test_seed}"
        )
    elif kind is DataKindValues.STORE_EXPORT:
        description = "labelled studies exported from the site's DICOM store with `dxassist export`"
    else:
        description = f"ChestX-ray14-layout folder `{root.name}`"
    return describe_data(kind, root, items, keys, description=description, manifest_path=work / "dataset_manifest.csv")


def _predict(net: torch.nn.Module, loader: DataLoader, bf16: bool) -> tuple[np.ndarray, np.ndarray]:
    net.eval()
    probs, ys = [], []
    with torch.no_grad():
        for batch in loader:
            x = batch["image"].float().contiguous(memory_format=torch.channels_last)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = net(x)
            probs.append(torch.sigmoid(logits.float()).numpy())
            ys.append(np.asarray(batch["label"]))
    return np.concatenate(probs), np.concatenate(ys)


def _mean_auroc(y: np.ndarray, p: np.ndarray) -> float:
    aucs = [roc_auc_score(y[:, i], p[:, i]) for i in range(y.shape[1]) if 0 < y[:, i].sum() < len(y)]
    return float(np.mean(aucs)) if aucs else float("nan")


def train(
    cfg: TrainConfig,
    out: Path,
    *,
    register: bool = False,
    registry_root: Path | None = None,
    init_from: LoadedManifest | None = None,
) -> dict[str, object]:
    """Train (or fine-tune from ``init_from``'s weights), evaluate, export, stage, register."""
    torch.set_num_threads(cfg.train.threads)
    set_determinism(cfg.train.seed)
    set_track_meta(False)  # plain tensors: MetaTensor dispatch slowed every op ~3x
    out.mkdir(parents=True, exist_ok=True)
    preprocessing = cfg.manifest["input"]["preprocessing"]
    root = data_root(cfg, out)
    train_set, val_set, test_set = _datasets(cfg, out, root)
    data = measure_data(cfg, root, out, (train_set, val_set, test_set))
    data_label = data.kind.value
    load = ApplyModelPreprocessd("image", preprocessing)
    t0 = time.perf_counter()
    train_ds = CacheDataset(
        train_set.records(), Compose([load, cxr_train_augment()]), num_workers=cfg.train.threads, progress=False
    )
    val_ds = CacheDataset(val_set.records(), load, num_workers=cfg.train.threads, progress=False)
    test_ds = CacheDataset(test_set.records(), load, num_workers=cfg.train.threads, progress=False)
    n_images = len(train_set) + len(val_set) + len(test_set)
    logger.info("decoded + preprocessed %d images in %.1fs", n_images, time.perf_counter() - t0)
    train_loader = DataLoader(train_ds, batch_size=cfg.train.batch_size, shuffle=True, num_workers=0, drop_last=True)
    val_loader = DataLoader(val_ds, batch_size=32, num_workers=0)
    test_loader = DataLoader(test_ds, batch_size=32, num_workers=0)

    keys = label_keys(cfg)
    net = cxr_network(len(keys))
    if init_from is not None:
        prov = init_from.manifest.provenance
        if not prov.weights_file:
            raise ValueError(f"{init_from.manifest.ref} ships no fine-tuning weights")
        load_weights(net, init_from.directory / prov.weights_file, prov.weights_sha256)
        logger.info("fine-tuning from %s", init_from.manifest.ref)
    net = net.to(memory_format=torch.channels_last)
    optim, sched = optimiser_and_schedule(net.parameters(), cfg, len(train_loader))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best, best_state, history = -1.0, None, []
    for epoch in range(cfg.train.epochs):
        net.train()
        t_epoch, seen, total = time.perf_counter(), 0, 0.0
        for batch in train_loader:
            x = batch["image"].float().contiguous(memory_format=torch.channels_last)
            y = torch.as_tensor(np.asarray(batch["label"]), dtype=torch.float32)
            optim.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.bf16):
                logits = net(x)
            loss = loss_fn(logits.float(), y)
            loss.backward()
            optim.step()
            sched.step()
            seen += len(x)
            total += float(loss.detach()) * len(x)
            if (seen // len(x)) % 50 == 0:
                logger.info("  step %d: %.1f img/s", seen // len(x), seen / (time.perf_counter() - t_epoch))
        p_val, y_val = _predict(net, val_loader, cfg.train.bf16)
        auc = _mean_auroc(y_val, p_val)
        rate = seen / (time.perf_counter() - t_epoch)
        history.append({"epoch": epoch + 1, "loss": total / max(1, seen), "val_mean_auroc": auc, "img_per_s": rate})
        logger.info("epoch %d loss %.4f val mean AUROC %.4f (%.1f img/s)", epoch + 1, total / max(1, seen), auc, rate)
        if (not np.isnan(auc) and auc > best) or best_state is None:
            best = auc
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    assert best_state is not None
    net.load_state_dict(best_state)
    net = net.to(memory_format=torch.contiguous_format).float()

    # Operating points on validation, reported on the test set (another seed). Scores from the
    # fp32 model, i.e. what the exported ONNX computes.
    p_val, y_val = _predict(net, val_loader, bf16=False)
    thresholds, bases = {}, {}
    target = cfg.operating_point.target_sensitivity
    for i, key in enumerate(keys):
        positives = int(y_val[:, i].sum())
        if 0 < positives < len(y_val):
            thresholds[key] = threshold_for_sensitivity(y_val[:, i], p_val[:, i], target)
            bases[key] = (
                f"{data_label} validation split (seed {cfg.data.train_seed}, n={len(y_val)}, "
                f"{positives} positive): highest threshold with sensitivity >= {target}"
            )
        else:
            thresholds[key] = 0.5
            bases[key] = "no positives in validation split; default 0.5 (not an operating point)"
    p_test, y_test = _predict(net, test_loader, bf16=False)
    metrics = evaluate_multilabel(keys, y_test, p_test, thresholds, n_boot=500)
    plot_roc(keys, y_test, p_test, out / "roc_test.png")
    plot_calibration(keys, y_test, p_test, out / "calibration_test.png")

    # Export with CAM and pooled features, parity on golden inputs (real preprocessed test images).
    wrapper = CxrWithCam(net, features=True).eval()
    golden = np.stack([test_ds[i]["image"] for i in range(min(4, len(test_ds)))]).astype(np.float32)
    onnx_path = out / f"{cfg.model_id}-{cfg.version}.onnx"
    names = ["logits", "cam", "features"]
    export_onnx(wrapper, torch.from_numpy(golden), onnx_path, input_name="image", output_names=names)
    parity = parity_check(wrapper, onnx_path, golden, input_name="image")
    logger.info("ONNX parity: max |torch - onnx| = %.2e", parity)

    # Out-of-distribution gate: fitted on the (un-augmented) training split through the
    # exported artifact, limit chosen on validation, measured on the test set and OOD sets.
    staged = out / "staged" / cfg.model_id / cfg.version
    train_plain = CacheDataset(train_set.records(), load, num_workers=cfg.train.threads, progress=False)
    test_frames = [
        load_frames(f, frame_indices=[0], target_size=load.pipeline.decode_size)[0] for f in test_set.files[:100]
    ]
    ood_block, ood_eval = fit_and_evaluate(
        onnx_path,
        stack_inputs(train_plain),
        stack_inputs(val_ds),
        stack_inputs(test_ds),
        test_frames,
        preprocessing=preprocessing,
        acceptance=cfg.ood.acceptance,
        components=cfg.ood.components,
        margin=cfg.ood.margin,
        data_text=f"the {data_label} training split ({len(train_set)} images, seed {cfg.data.train_seed})",
        staged_dir=staged,
    )

    manifest = {"id": cfg.model_id, "version": cfg.version, **describe_model(cfg.manifest, data, SYNTHETIC_NOTE)}
    manifest["artifact"] = {"file": onnx_path.name, "sha256": "0" * 64, "opset": 17}
    labels = []
    for label in manifest["labels"]:
        labels.append(
            {**label, "threshold": round(thresholds[label["key"]], 6), "threshold_basis": bases[label["key"]]}
        )
    manifest["labels"] = labels
    manifest["ood"] = ood_block
    summary = {m.label: m.auroc for m in metrics}
    manifest["provenance"] = {
        "trained_on": trained_on_text(data),
        "training_config": f"configs/training/{cfg.model_id.replace('-', '_')}.yaml",
        "created": dt.date.today().isoformat(),
        "metrics": {f"test_auroc_{k}": float(v) for k, v in summary.items() if v == v},  # NaN: undefined
        "weights_file": "weights.pt",
        "weights_sha256": save_weights(net, staged / "weights.pt"),
        "data": data.model_dump(mode="json"),
    }
    int8_report = None
    if cfg.int8:
        int8_report = _int8_cost(onnx_path, golden, test_ds, y_test, p_test, out)
    card = (
        write_cxr_card(cfg, manifest, metrics, history, parity, int8_report, data)
        + "\n"
        + ood_section(ood_block, ood_eval, data)
    )
    stage_model(staged, manifest, onnx_path, card)
    report: dict[str, object] = {
        "history": history,
        "test": [m.as_dict() for m in metrics],
        "parity_max_abs_diff": parity,
        "int8": int8_report,
        "ood": ood_block,
        "staged": str(staged),
        "data": data.model_dump(mode="json"),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if register:
        report["registered"] = str(register_version(staged, registry_root or REGISTRY_ROOT))
    return report


def _int8_cost(
    onnx_path: Path, golden: np.ndarray, test_ds: CacheDataset, y_test: np.ndarray, p_test: np.ndarray, out: Path
) -> dict[str, float]:
    """Quantise statically on 64 test-distribution inputs and measure AUROC and speed change."""
    calib = np.stack([test_ds[i]["image"] for i in range(min(64, len(test_ds)))]).astype(np.float32)
    q_path = quantize_static_int8(onnx_path, out / "int8.onnx", calib, input_name="image")
    import onnxruntime as ort

    def run(path: Path) -> tuple[np.ndarray, float]:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        probs = []
        t = time.perf_counter()
        for i in range(len(test_ds)):
            logits = sess.run(["logits"], {"image": test_ds[i]["image"][None].astype(np.float32)})[0]
            probs.append(1 / (1 + np.exp(-logits[0])))
        return np.stack(probs), len(test_ds) / (time.perf_counter() - t)

    p_fp32, fps32 = run(onnx_path)
    p_int8, fps8 = run(q_path)
    return {
        "fp32_mean_auroc": _mean_auroc(y_test, p_fp32),
        "int8_mean_auroc": _mean_auroc(y_test, p_int8),
        "fp32_img_per_s_batch1": fps32,
        "int8_img_per_s_batch1": fps8,
    }


def main() -> None:
    """``python -m training.train_cxr`` is ``python -m training.cli cxr``."""
    import sys

    from training.cli import app

    app(["cxr", *sys.argv[1:]])


if __name__ == "__main__":
    main()
