"""ROC and calibration plots for evaluation reports (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from training.evaluate import calibration_curve


def plot_roc(labels: Sequence[str], y: np.ndarray, p: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, key in enumerate(labels):
        if 0 < y[:, i].sum() < len(y):
            fpr, tpr, _ = roc_curve(y[:, i], p[:, i])
            ax.plot(fpr, tpr, label=f"{key} (AUROC {roc_auc_score(y[:, i], p[:, i]):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC (held-out test set)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_calibration(labels: Sequence[str], y: np.ndarray, p: np.ndarray, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(5, 5))
    for i, key in enumerate(labels):
        pred, obs = calibration_curve(y[:, i], p[:, i])
        ax.plot(pred, obs, marker="o", ms=3, label=key)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="mean predicted probability", ylabel="observed frequency", title="Calibration (test)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
