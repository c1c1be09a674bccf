"""Batch job outputs: results table (CSV + Parquet) and an HTML report with PNG plots.

The report is a clinical work product (it lists flagged studies so they can be found), so it
names studies by their file and ``study_ref``; it is written to the job folder, never logged.
"""

from __future__ import annotations

import csv
import html
from collections import Counter
from pathlib import Path

import numpy as np

from models.errors import ReasonCode
from models.results import OutcomeValues, ScreeningResult, TriagePriorityValues

#: image-level refusals on what the image is (content check, out-of-distribution gate)
CONTENT_REASONS = (ReasonCode.CONTENT_MISMATCH, ReasonCode.OUT_OF_DISTRIBUTION)


def result_rows(results: list[ScreeningResult]) -> list[dict[str, object]]:
    """One row per study: outcome, reason, priority and, per finding, score and verdict."""
    rows = []
    for r in results:
        row: dict[str, object] = {
            "study_ref": r.study_ref,
            "study_instance_uid": r.study_instance_uid,
            "files": ";".join(i.label for i in r.images),
            "outcome": r.outcome.value,
            "reason": r.reason.value if r.reason else "",
            "priority": r.priority.value if r.priority else "",
            "models": ";".join(r.models),
            # the model's out-of-distribution distance (largest over the study's images): drift
            # and threshold reviews read it beside the outcome
            "ood_distance": max((i.ood_distance for i in r.images if i.ood_distance is not None), default=None),
        }
        for f in r.findings:
            row[f"score_{f.key}"] = f.score
            row[f"positive_{f.key}"] = f.positive
        rows.append(row)
    return rows


def write_tables(results: list[ScreeningResult], out_dir: Path) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = result_rows(results)
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    csv_path, parquet_path = out_dir / "results.csv", out_dir / "results.parquet"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    table = pa.table({c: [row.get(c) for row in rows] for c in columns})
    pq.write_table(table, parquet_path)
    return csv_path, parquet_path


def _labels_for(results: list[ScreeningResult], inputs: list[Path]) -> dict[str, dict[str, int]] | None:
    """Ground truth from a ChestX-ray14 ``Data_Entry.csv`` beside the inputs, by file name."""
    from models.synthetic.cxr import LABELS, label_vector

    truth: dict[str, dict[str, int]] = {}
    for root in inputs:
        entry = (root if root.is_dir() else root.parent) / "Data_Entry.csv"
        if entry.is_file():
            with entry.open(newline="") as fh:
                for row in csv.DictReader(fh):
                    vec = label_vector(row["Finding Labels"])
                    truth[row["Image Index"]] = {k: int(v) for k, v in zip(LABELS, vec, strict=True)}
    return truth or None


def _ood_limits(refs: set[str]) -> dict[str, float]:
    """Each model version's distance limit from its registered manifest (absent: not shown)."""
    from models.errors import DxAssistError
    from models.registry import resolve

    limits = {}
    for ref in refs:
        model_id, _, version = ref.partition("@")
        try:
            spec = resolve(model_id, version).manifest.ood
        except DxAssistError:
            continue
        if spec is not None:
            limits[ref] = spec.threshold
    return limits


def content_gate_summary(
    results: list[ScreeningResult],
) -> tuple[Counter[str], dict[str, list[float]], dict[str, list[float]]]:
    """Image refusals by content reason, and OOD distances of accepted / refused images per model."""
    refusals: Counter[str] = Counter()
    accepted: dict[str, list[float]] = {}
    refused: dict[str, list[float]] = {}
    for r in results:
        for image in r.images:
            if image.reason in CONTENT_REASONS:
                refusals[image.reason.value] += 1
            if image.ood_distance is not None and image.model_ref:
                side = accepted if image.outcome == OutcomeValues.SCREENED else refused
                side.setdefault(image.model_ref, []).append(image.ood_distance)
    return refusals, accepted, refused


def _plot_ood(
    plt: object, accepted: dict[str, list[float]], refused: dict[str, list[float]], limits: dict[str, float], path: Path
) -> None:
    refs = sorted(set(accepted) | set(refused))
    fig, axes = plt.subplots(len(refs), 1, figsize=(7, 1.9 * len(refs)), squeeze=False)  # type: ignore[attr-defined]
    for ax, ref in zip(axes[:, 0], refs, strict=True):
        values = accepted.get(ref, []) + refused.get(ref, [])
        top = max([*values, limits.get(ref, 1.0)]) * 1.1
        bins = np.geomspace(max(min([*values, limits.get(ref, 1.0)]) * 0.8, 1e-3), top, 41)
        ax.hist(
            [accepted.get(ref, []), refused.get(ref, [])],
            bins=bins,
            stacked=True,
            color=["#66aa55", "#cc3311"],
            label=["screened", "refused (OOD)"],
        )
        if ref in limits:
            ax.axvline(limits[ref], color="k", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_ylabel(ref, fontsize=8)
        ax.legend(fontsize=7)
    axes[-1, 0].set_xlabel("out-of-distribution distance (dashed: the model's limit)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)  # type: ignore[attr-defined]


def write_report(
    results: list[ScreeningResult],
    out_dir: Path,
    *,
    inputs: list[Path],
    seconds: float,
    screened_now: int,
    skipped: int,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = Counter(
        r.outcome.value if r.outcome == OutcomeValues.SCREENED else f"NOT_SCREENED: {r.reason}" for r in results
    )
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = sorted(outcomes)
    ax.barh(names, [outcomes[n] for n in names], color="#4477aa")
    ax.set_xlabel("studies")
    ax.set_title("Outcome and reason")
    fig.tight_layout()
    fig.savefig(out_dir / "outcomes.png", dpi=100)
    plt.close(fig)

    scores: dict[tuple[str, str], list[float]] = {}
    thresholds: dict[tuple[str, str], float] = {}
    for r in results:
        for f in r.findings:
            scores.setdefault((f.model_id, f.key), []).append(f.score)
            thresholds[(f.model_id, f.key)] = f.threshold
    plots = []
    if scores:
        keys = sorted(scores)
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 1.6 * len(keys)), squeeze=False)
        for ax, model_key in zip(axes[:, 0], keys, strict=True):
            ax.hist(scores[model_key], bins=np.linspace(0, 1, 41), color="#66aa55")
            ax.axvline(thresholds[model_key], color="#cc3311", ls="--", lw=1)
            ax.set_ylabel(model_key[1], fontsize=8)
        axes[-1, 0].set_xlabel("score (dashed: operating threshold)")
        fig.tight_layout()
        fig.savefig(out_dir / "scores.png", dpi=100)
        plt.close(fig)
        plots.append("scores.png")

    refusals, ood_accepted, ood_refused = content_gate_summary(results)
    ood_limits = _ood_limits(set(ood_accepted) | set(ood_refused))
    if ood_accepted or ood_refused:
        _plot_ood(plt, ood_accepted, ood_refused, ood_limits, out_dir / "ood.png")
        plots.append("ood.png")

    auroc_rows = []
    truth = _labels_for(results, inputs)
    if truth:
        from sklearn.metrics import roc_auc_score, roc_curve

        fig, ax = plt.subplots(figsize=(5, 5))
        for model, key in sorted(scores):
            y, p = [], []
            for r in results:
                name = Path(r.images[0].label).name if r.images else ""
                finding = next((f for f in r.findings if f.key == key and f.model_id == model), None)
                if name in truth and finding is not None and key in truth[name]:
                    y.append(truth[name][key])
                    p.append(finding.score)
            if 0 < sum(y) < len(y):
                auc = float(roc_auc_score(y, p))
                fpr, tpr, _ = roc_curve(y, p)
                ax.plot(fpr, tpr, label=f"{key} ({auc:.3f})")
                auroc_rows.append((key, auc, sum(y), len(y) - sum(y)))
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC on labelled studies")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "roc.png", dpi=100)
        plt.close(fig)
        plots.append("roc.png")

    flagged = [r for r in results if r.priority in (TriagePriorityValues.URGENT, TriagePriorityValues.ABNORMAL)]
    flagged.sort(key=lambda r: 0 if r.priority == TriagePriorityValues.URGENT else 1)
    rate = screened_now / seconds if seconds > 0 else 0.0
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>dxassist batch report</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 8px;font-size:90%}.urgent{color:#b00;font-weight:bold}</style>",
        "</head><body><h1>dxassist batch screening report</h1>",
        "<p><b>Decision support only; every study is read by a clinician. Reference models are trained on "
        "synthetic data and are not for clinical use.</b></p>",
        f"<p>{len(results)} studies in this job: {outcomes.get('SCREENED', 0)} screened, "
        f"{len(results) - outcomes.get('SCREENED', 0)} not screened. This run: {screened_now} studies in "
        f"{seconds:.1f} s ({rate:.2f} studies/s); {skipped} already done (resumed).</p>",
        "<h2>Outcomes</h2><table><tr><th>outcome / reason</th><th>studies</th></tr>",
        *[f"<tr><td>{esc(n)}</td><td>{outcomes[n]}</td></tr>" for n in names],
        "</table><img src='outcomes.png' alt='outcomes'>",
    ]
    parts += [
        "<h2>Content gate: images refused before any score</h2>",
        "<p>CONTENT_MISMATCH: the file or its pixels disagree with the header (another modality, a mask, "
        "no colour, mostly blank). OUT_OF_DISTRIBUTION: the image does not look like the images the model was "
        "trained on (distance above the model's limit). Neither gets a finding.</p>",
        "<table><tr><th>reason</th><th>images</th></tr>",
        *[f"<tr><td>{reason.value}</td><td>{refusals.get(reason.value, 0)}</td></tr>" for reason in CONTENT_REASONS],
        "</table>",
    ]
    if ood_accepted or ood_refused:
        parts += [
            "<table><tr><th>model</th><th>screened</th><th>refused (OOD)</th>"
            "<th>median distance, screened</th><th>limit</th></tr>"
        ]
        for ref in sorted(set(ood_accepted) | set(ood_refused)):
            acc, ref_d = ood_accepted.get(ref, []), ood_refused.get(ref, [])
            median = f"{float(np.median(acc)):.1f}" if acc else "-"
            limit = f"{ood_limits[ref]:.1f}" if ref in ood_limits else "-"
            parts.append(
                f"<tr><td>{esc(ref)}</td><td>{len(acc)}</td><td>{len(ref_d)}</td><td>{median}</td><td>{limit}</td></tr>"
            )
        parts += ["</table><img src='ood.png' alt='out-of-distribution distances'>"]
    if scores:
        parts += ["<h2>Score distributions</h2><img src='scores.png' alt='scores'>"]
    if auroc_rows:
        parts += ["<h2>Labelled studies</h2><table><tr><th>label</th><th>AUROC</th><th>pos</th><th>neg</th></tr>"]
        parts += [f"<tr><td>{esc(k)}</td><td>{a:.3f}</td><td>{p}</td><td>{n}</td></tr>" for k, a, p, n in auroc_rows]
        parts += ["</table><img src='roc.png' alt='ROC'>"]
    parts += [
        f"<h2>Flagged studies ({len(flagged)})</h2><table><tr><th>priority</th><th>file</th><th>study ref</th><th>positive findings</th></tr>"
    ]
    for r in flagged:
        cls = " class='urgent'" if r.priority == TriagePriorityValues.URGENT else ""
        findings = ", ".join(f"{f.display} {f.score:.2f}" for f in r.positive_findings)
        parts.append(
            f"<tr><td{cls}>{r.priority}</td><td>{esc(r.images[0].label if r.images else '')}</td>"
            f"<td>{r.study_ref}</td><td>{esc(findings)}</td></tr>"
        )
    parts += ["</table></body></html>"]
    path = out_dir / "report.html"
    path.write_text("\n".join(parts))
    return path
