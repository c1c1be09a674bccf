"""Model cards written next to each exported version."""

from __future__ import annotations

from typing import Any

from models.manifest import DataKindValues, TrainingData
from training.config import TrainConfig
from training.evaluate import LabelMetrics
from training.evaluate_ood import GateEvaluation
from training.provenance import card_banner, card_section


def _metrics_table(metrics: list[LabelMetrics]) -> str:
    rows = [
        "| label | AUROC (95% CI) | threshold | sensitivity | specificity | ECE | positives / negatives |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in metrics:
        auroc = (
            f"{m.auroc:.3f} ({m.auroc_ci_low:.3f}-{m.auroc_ci_high:.3f})"
            if m.auroc == m.auroc
            else "undefined (one class in the test split)"
        )
        rows.append(
            f"| {m.label} | {auroc} | {m.threshold:.3f} | "
            f"{m.sensitivity:.3f} | {m.specificity:.3f} | {m.ece:.3f} | {m.positives} / {m.negatives} |"
        )
    return "\n".join(rows)


def write_cxr_card(
    cfg: TrainConfig,
    manifest: dict[str, Any],
    metrics: list[LabelMetrics],
    history: list[dict[str, float]],
    parity: float,
    int8: dict[str, float] | None,
    data: TrainingData,
) -> str:
    synthetic = data.kind is DataKindValues.SYNTHETIC
    lines = [
        f"# Model card: {cfg.model_id} {cfg.version}",
        "",
        card_banner(data),
        *(
            [
                "This is the project's reference model: it exists so that the service, its tests and its benchmarks run",
                "end to end without downloading weights. A hospital retrains it on its own labelled studies",
                "(training/notebooks/retrain_cxr.ipynb, or `python -m training.cli cxr --source store`).",
            ]
            if synthetic
            else []
        ),
        "",
        "## Intended use",
        manifest["intended_use"],
        "",
        "## Inputs",
        f"- Accepts: modality {manifest['accepts']['modality']}, body part {manifest['accepts'].get('body_part_examined')},"
        f" view {manifest['accepts'].get('view_position')}, photometric {manifest['accepts']['photometric_interpretation']}.",
        f"- Preprocessing `{manifest['input']['preprocessing']}` (models/): Modality LUT, VOI window, MONOCHROME1",
        "  inverted, letterboxed to 224x224, [0, 1]. The same function runs in training and serving.",
        "- Studies outside these are NOT_SCREENED with a reason code, never scored.",
        "",
        card_section(data),
        "",
        *(
            [
                "Procedural phantoms from `models/synthetic/cxr.py` (lungs, ribs, heart, mediastinum, diaphragm) with",
                "findings placed by construction, written as CR/DX DICOM with varied bit depth, photometric",
                "interpretation, rescale and windowing. Real radiographs look different: expect these numbers to",
                "collapse on real data until the model is retrained on it.",
                "",
            ]
            if synthetic
            else []
        ),
        "## Network",
        "MONAI DenseNet121, 1 channel, 5 sigmoid outputs; trained with AdamW + one-cycle LR, bf16 autocast on",
        "CPU, augmentation: small affine, contrast gamma, noise (no flips: laterality matters).",
        "Outputs: `logits` and `cam` (class activation maps, 7x7 per label; their spatial mean is the logit).",
        "",
        "## Operating points",
        f"Chosen on the validation split to reach sensitivity >= {cfg.operating_point.target_sensitivity}",
        "(worklist triage favours sensitivity). Thresholds change only with a new version.",
        "",
        "## Evaluation (held-out test set generated with a different seed)"
        if synthetic
        else f"## Evaluation (held-out test split: {data.splits['test']} images never trained on)",
        _metrics_table(metrics),
        "",
        "Training history:",
        "",
        "| epoch | loss | validation mean AUROC | img/s |",
        "|---|---|---|---|",
        *[f"| {h['epoch']} | {h['loss']:.4f} | {h['val_mean_auroc']:.4f} | {h['img_per_s']:.1f} |" for h in history],
        "",
        f"ONNX export parity: max |PyTorch - ONNX Runtime| = {parity:.2e} on golden inputs.",
    ]
    if int8:
        lines += [
            "",
            "## Static INT8 (QDQ) cost, measured",
            f"- mean test AUROC: fp32 {int8['fp32_mean_auroc']:.4f}, int8 {int8['int8_mean_auroc']:.4f}",
            f"- batch-1 CPU throughput: fp32 {int8['fp32_img_per_s_batch1']:.1f} img/s, int8 {int8['int8_img_per_s_batch1']:.1f} img/s",
            "- The INT8 artifact is not registered by default; register it as its own version if adopted.",
        ]
    lines += [
        "",
        "## Limitations",
        *limitations(data),
        "- Heatmaps are coarse (7x7) and show where the score came from, not a segmentation.",
        "",
    ]
    return "\n".join(lines)


def limitations(data: TrainingData) -> list[str]:
    """What the training data cannot vouch for, by kind."""
    if data.kind is DataKindValues.SYNTHETIC:
        return ["- Synthetic anatomy and findings; no real pathology, no paediatric, lateral or portable variation."]
    out = [
        f"- Trained on {data.studies} studies from {len(data.manufacturers)} manufacturer(s); performance on other"
        " equipment, populations or sites is unknown until validated there.",
        "- The test split comes from the same data: validate on other studies before clinical use.",
    ]
    if data.label_sources.get("ai"):
        out.append(
            f"- {data.label_sources['ai']} images carry the AI's own findings as labels, unreviewed by a reader:"
            " errors of the labelling model can be learnt."
        )
    return out


def ood_section(block: dict[str, Any], evaluation: GateEvaluation, data: TrainingData | None = None) -> str:
    """The model card's account of when this version refuses to answer, with measured numbers."""
    m = evaluation.metrics
    lines = [
        "## Out-of-distribution gate: when this model does not answer",
        "",
        "Every image that passes header QA and the content check (models/content.py: SOP class, bit depth,",
        "grey levels, blank background, contrast, colour) meets this version's gate before any finding is made.",
        f"Basis: {block['basis']}.",
        f"Limit: distance {block['threshold']} (manifest `ood.threshold`); above it the image is NOT_SCREENED",
        "with reason OUT_OF_DISTRIBUTION and the measured distance, and no score leaves the service.",
        "",
        "Measured with `python -m training.evaluate_ood` (gate alone, content check bypassed):",
        "",
        evaluation.table(),
        "",
        f"- In-distribution acceptance on held-out synthetic images (another seed): {m['heldout_acceptance']:.1%}.",
    ]
    if "far_ood_auroc" in m:
        lines.append(
            f"- Far-OOD AUROC {m['far_ood_auroc']:.4f}, refused {m['far_ood_refused']:.1%} of {int(m['far_ood_n'])} images."
        )
    if "near_ood_auroc" in m:
        lines.append(
            f"- Near-OOD AUROC {m['near_ood_auroc']:.4f}, refused {m['near_ood_refused']:.1%}: changes the model was"
            " trained to tolerate (for instance mirrored or rotated frames) are accepted, by design."
        )
    synthetic = data is None or data.kind is DataKindValues.SYNTHETIC
    if "real_ood_refused" in m:
        lines.append(
            f"- Real radiographs (NEMA `RG1`, four encodings): refused {m['real_ood_refused']:.0%}."
            + (
                " This version has seen phantoms only, so it has no basis for a finding on a real radiograph and says so."
                if synthetic
                else ""
            )
        )
    lines += [
        "",
        "A site gets a model that accepts its images by retraining on its own studies (`python -m training.cli`,"
        if synthetic
        else "The gate was fitted on this version's own training split: images unlike it are refused, not scored.",
        "training/notebooks/retrain_cxr.ipynb): the same pipeline refits this gate on the new training data."
        if synthetic
        else "",
        "",
    ]
    return "\n".join(lines)
