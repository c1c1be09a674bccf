"""Evaluation: per-label AUROC with bootstrap confidence intervals, operating points chosen on
validation data, calibration (expected calibration error), Dice/IoU for segmentation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import roc_auc_score, roc_curve


@dataclass(frozen=True)
class LabelMetrics:
    label: str
    auroc: float
    auroc_ci_low: float
    auroc_ci_high: float
    threshold: float
    sensitivity: float
    specificity: float
    ece: float
    positives: int
    negatives: int

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def auroc_with_ci(
    y: NDArray, p: NDArray, *, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """AUROC and a percentile bootstrap (1-alpha) interval (stratified resampling); NaN for all
    three when the set has no positive or no negative (a rare finding in a site's small test
    split): undefined, not an error."""
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if not len(pos) or not len(neg):
        return float("nan"), float("nan"), float("nan")
    auc = float(roc_auc_score(y, p))
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        boots[b] = roc_auc_score(y[idx], p[idx])
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return auc, float(low), float(high)


def threshold_for_sensitivity(y: NDArray, p: NDArray, target: float) -> float:
    """Highest threshold whose sensitivity on (y, p) is >= ``target`` (ties favour sensitivity)."""
    _fpr, tpr, thresholds = roc_curve(y, p)
    ok = np.flatnonzero(tpr >= target)
    threshold = float(thresholds[ok[0]])
    if not np.isfinite(threshold):
        threshold = float(p.max())
    return float(np.clip(threshold, 1e-4, 1 - 1e-4))


def sens_spec(y: NDArray, p: NDArray, threshold: float) -> tuple[float, float]:
    pred = p >= threshold
    sens = float((pred & (y == 1)).sum() / max(1, (y == 1).sum()))
    spec = float((~pred & (y == 0)).sum() / max(1, (y == 0).sum()))
    return sens, spec


def expected_calibration_error(y: NDArray, p: NDArray, bins: int = 10) -> float:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(float(y[m].mean()) - float(p[m].mean()))
    return float(ece)


def calibration_curve(y: NDArray, p: NDArray, bins: int = 10) -> tuple[NDArray, NDArray]:
    """Mean predicted vs observed frequency per probability bin (empty bins dropped)."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
    pred, obs = [], []
    for b in range(bins):
        m = idx == b
        if m.any():
            pred.append(float(p[m].mean()))
            obs.append(float(y[m].mean()))
    return np.asarray(pred), np.asarray(obs)


def evaluate_multilabel(
    labels: tuple[str, ...] | list[str],
    y: NDArray,
    p: NDArray,
    thresholds: dict[str, float],
    *,
    n_boot: int = 1000,
) -> list[LabelMetrics]:
    """Metrics per label on a labelled set, at the given thresholds."""
    out = []
    for i, key in enumerate(labels):
        yi, pi = y[:, i], p[:, i]
        auc, low, high = auroc_with_ci(yi, pi, n_boot=n_boot, seed=i)
        sens, spec = sens_spec(yi, pi, thresholds[key])
        out.append(
            LabelMetrics(
                label=key,
                auroc=round(auc, 4),
                auroc_ci_low=round(low, 4),
                auroc_ci_high=round(high, 4),
                threshold=round(thresholds[key], 4),
                sensitivity=round(sens, 4),
                specificity=round(spec, 4),
                ece=round(expected_calibration_error(yi, pi), 4),
                positives=int((yi == 1).sum()),
                negatives=int((yi == 0).sum()),
            )
        )
    return out


def dice_iou(pred: NDArray[np.bool_], truth: NDArray[np.bool_]) -> tuple[float, float]:
    """Dice and IoU of two boolean masks; both empty counts as perfect agreement."""
    inter = float((pred & truth).sum())
    total = float(pred.sum() + truth.sum())
    union = float((pred | truth).sum())
    if total == 0:
        return 1.0, 1.0
    return 2 * inter / total, inter / union if union else 1.0
