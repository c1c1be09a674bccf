"""Statistics for site validation, shadow comparison and drift, in numpy only (serving uses them;
training has the same definitions with sklearn in ``training.evaluate``).

- AUROC by the rank (Mann-Whitney) formula with ties, with a stratified percentile bootstrap CI;
- sensitivity/specificity/PPV/NPV at a threshold, the highest threshold reaching a target
  sensitivity (the rule every manifest threshold states);
- calibration: reliability bins and expected calibration error;
- agreement of two versions: positive/negative agreement, Cohen's kappa, score correlation;
- drift: population stability index (binned on the baseline's quantiles, or over categories)
  and the two-sample Kolmogorov-Smirnov statistic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.float64]


def _arrays(
    y: Sequence[float] | NDArray[np.generic], p: Sequence[float] | NDArray[np.generic]
) -> tuple[FloatArray, FloatArray]:
    ya = np.asarray(y, dtype=np.float64).ravel()
    pa = np.asarray(p, dtype=np.float64).ravel()
    if ya.shape != pa.shape:
        raise ValueError("labels and scores differ in length")
    return ya, pa


def auroc(y: Sequence[float] | NDArray[np.generic], p: Sequence[float] | NDArray[np.generic]) -> float:
    """Area under the ROC curve (ties count one half); NaN without both classes."""
    ya, pa = _arrays(y, p)
    pos = ya == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(pa, kind="mergesort")
    ranks = np.empty(len(pa), dtype=np.float64)
    sorted_p = pa[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_p, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2.0 + 1.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auroc_ci(
    y: Sequence[float] | NDArray[np.generic],
    p: Sequence[float] | NDArray[np.generic],
    *,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """AUROC and its stratified percentile bootstrap ``1 - alpha`` interval."""
    ya, pa = _arrays(y, p)
    value = auroc(ya, pa)
    pos, neg = np.flatnonzero(ya == 1), np.flatnonzero(ya != 1)
    if not len(pos) or not len(neg):
        return value, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    boots = np.empty(n_boot)
    for b in range(n_boot):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        boots[b] = auroc(ya[idx], pa[idx])
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return value, float(low), float(high)


@dataclass(frozen=True)
class Confusion:
    threshold: float
    tp: int
    fp: int
    tn: int
    fn: int

    @staticmethod
    def _ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    @property
    def sensitivity(self) -> float:
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        return self._ratio(self.tn, self.tn + self.fp)

    @property
    def ppv(self) -> float:
        return self._ratio(self.tp, self.tp + self.fp)

    @property
    def npv(self) -> float:
        return self._ratio(self.tn, self.tn + self.fn)


def confusion_at(
    y: Sequence[float] | NDArray[np.generic], p: Sequence[float] | NDArray[np.generic], threshold: float
) -> Confusion:
    """Counts with ``score >= threshold`` read as positive (the service's rule)."""
    ya, pa = _arrays(y, p)
    pred, truth = pa >= threshold, ya == 1
    return Confusion(
        threshold,
        int((pred & truth).sum()),
        int((pred & ~truth).sum()),
        int((~pred & ~truth).sum()),
        int((~pred & truth).sum()),
    )


def threshold_for_sensitivity(
    y: Sequence[float] | NDArray[np.generic], p: Sequence[float] | NDArray[np.generic], target: float
) -> float:
    """Highest threshold whose sensitivity is at least ``target`` (clipped into (0, 1))."""
    ya, pa = _arrays(y, p)
    positives = np.sort(pa[ya == 1])[::-1]
    if not len(positives):
        raise ValueError("no positive studies: no operating point can be proposed")
    need = int(np.ceil(target * len(positives)))
    threshold = float(positives[max(need, 1) - 1])
    return float(np.clip(threshold, 1e-4, 1 - 1e-4))


def reliability(
    y: Sequence[float] | NDArray[np.generic], p: Sequence[float] | NDArray[np.generic], bins: int = 10
) -> list[tuple[float, float, int]]:
    """Per non-empty probability bin: mean score, observed positive rate, count."""
    ya, pa = _arrays(y, p)
    idx = np.clip((pa * bins).astype(int), 0, bins - 1)
    out = []
    for b in range(bins):
        m = idx == b
        if m.any():
            out.append((float(pa[m].mean()), float(ya[m].mean()), int(m.sum())))
    return out


def expected_calibration_error(
    y: Sequence[float] | NDArray[np.generic], p: Sequence[float] | NDArray[np.generic], bins: int = 10
) -> float:
    rows = reliability(y, p, bins)
    n = sum(c for _, _, c in rows)
    return float(sum(c * abs(obs - mean) for mean, obs, c in rows) / n) if n else float("nan")


@dataclass(frozen=True)
class Agreement:
    n: int
    both_positive: int
    both_negative: int
    only_a: int
    only_b: int
    positive_agreement: float
    negative_agreement: float
    kappa: float
    score_correlation: float


def agreement(
    a_pos: Sequence[bool] | NDArray[np.bool_],
    b_pos: Sequence[bool] | NDArray[np.bool_],
    a_score: Sequence[float] | NDArray[np.generic],
    b_score: Sequence[float] | NDArray[np.generic],
) -> Agreement:
    """How two versions agree on one finding over the same studies."""
    a, b = np.asarray(a_pos, dtype=bool), np.asarray(b_pos, dtype=bool)
    sa, sb = np.asarray(a_score, dtype=np.float64), np.asarray(b_score, dtype=np.float64)
    n = len(a)
    pp, nn = int((a & b).sum()), int((~a & ~b).sum())
    pa_only, pb_only = int((a & ~b).sum()), int((~a & b).sum())
    pos_agree = 2 * pp / (2 * pp + pa_only + pb_only) if (2 * pp + pa_only + pb_only) else float("nan")
    neg_agree = 2 * nn / (2 * nn + pa_only + pb_only) if (2 * nn + pa_only + pb_only) else float("nan")
    if n:
        observed = (pp + nn) / n
        expected = (a.mean() * b.mean()) + ((1 - a.mean()) * (1 - b.mean()))
        kappa = float((observed - expected) / (1 - expected)) if expected < 1 else 1.0
    else:
        kappa = float("nan")
    corr = float(np.corrcoef(sa, sb)[0, 1]) if n > 1 and sa.std() > 0 and sb.std() > 0 else float("nan")
    return Agreement(n, pp, nn, pa_only, pb_only, pos_agree, neg_agree, kappa, corr)


def psi_continuous(
    baseline: Sequence[float] | NDArray[np.generic], current: Sequence[float] | NDArray[np.generic], bins: int = 10
) -> float:
    """Population stability index of ``current`` against ``baseline``, binned on the baseline's
    quantiles (empty bins get half a count, so a new region shows instead of dividing by zero)."""
    base = np.asarray(baseline, dtype=np.float64)
    cur = np.asarray(current, dtype=np.float64)
    if not len(base) or not len(cur):
        return float("nan")
    edges = np.unique(np.quantile(base, np.linspace(0, 1, bins + 1)[1:-1]))
    b_counts = np.bincount(np.searchsorted(edges, base, side="right"), minlength=len(edges) + 1)
    c_counts = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1)
    return _psi(b_counts.astype(np.float64), c_counts.astype(np.float64))


def psi_categorical(baseline: Sequence[str], current: Sequence[str]) -> float:
    """Population stability index over categories (the union of both sides)."""
    if not len(baseline) or not len(current):
        return float("nan")
    cats = sorted(set(baseline) | set(current))
    b = np.array([sum(1 for v in baseline if v == c) for c in cats], dtype=np.float64)
    c = np.array([sum(1 for v in current if v == k) for k in cats], dtype=np.float64)
    return _psi(b, c)


def _psi(b_counts: FloatArray, c_counts: FloatArray) -> float:
    b = np.where(b_counts == 0, 0.5, b_counts)
    c = np.where(c_counts == 0, 0.5, c_counts)
    b, c = b / b.sum(), c / c.sum()
    return float(((c - b) * np.log(c / b)).sum())


def ks_statistic(a: Sequence[float] | NDArray[np.generic], b: Sequence[float] | NDArray[np.generic]) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (largest gap between the empirical CDFs)."""
    x = np.sort(np.asarray(a, dtype=np.float64))
    z = np.sort(np.asarray(b, dtype=np.float64))
    if not len(x) or not len(z):
        return float("nan")
    grid = np.concatenate([x, z])
    cdf_x = np.searchsorted(x, grid, side="right") / len(x)
    cdf_z = np.searchsorted(z, grid, side="right") / len(z)
    return float(np.abs(cdf_x - cdf_z).max())
