"""``dxassist models validate``: local acceptance testing of one model version on the site's own
labelled studies, before it screens a single live patient.

Labels come as a ChestX-ray14-style CSV (``Image Index``, ``Finding Labels`` with ``|``-joined
names, optional ``Patient Age``/``Patient Gender``/``View Position``; or a
``Study Instance UID`` column to fetch studies from the configured store), a CheXpert-style CSV
(one column per finding, ``1`` positive, ``0`` negative, anything else left out), or a
Kvasir-style folder of masks (``masks/<name>.png`` beside ``images/<name>.dcm``: positive when the
mask has any foreground pixel).

Every labelled image is screened by the version exactly as serving would (QA, preprocessing,
OOD gate). The report gives per finding AUROC with a 95 % bootstrap CI, sensitivity /
specificity / PPV / NPV at the manifest threshold, calibration (reliability bins, ECE), the OOD
refusal rate, the same per subgroup (manufacturer, view, sex, age band), and the *proposed*
local operating point for the target sensitivity. JSON and HTML (with plots) are written to the
output folder; ``dxassist models register --from-validation`` turns accepted proposals into a
new version with the report kept beside it. Studies appear in the report by study ref only.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from models.errors import ManifestError, ReasonCode
from models.manifest import LoadedManifest
from models.predictor import OnnxPredictor
from models.results import OutcomeValues
from models.validation import (
    auroc_ci,
    confusion_at,
    expected_calibration_error,
    reliability,
    threshold_for_sensitivity,
)
from serving.core.screening import InstanceInput, StudyScreener
from serving.dicom.sources import StudySource
from serving.observability.drift import Observation, observation_of, save_observations

logger = logging.getLogger(__name__)

#: ChestX-ray14 / CheXpert names per manifest label key (besides the label's own display text)
LABEL_SYNONYMS: Final[dict[str, tuple[str, ...]]] = {
    "pleural_effusion": ("Effusion", "Pleural Effusion"),
    "nodule_mass": ("Nodule", "Mass"),
    "nodule": ("Nodule",),
    "mass": ("Mass",),
    "cardiomegaly": ("Cardiomegaly",),
    "pneumothorax": ("Pneumothorax",),
    "consolidation": ("Consolidation",),
    "atelectasis": ("Atelectasis",),
    "edema": ("Edema",),
    "lung_opacity": ("Lung Opacity",),
    "enlarged_cardiomediastinum": ("Enlarged Cardiomediastinum",),
    "fracture": ("Fracture",),
    "pneumonia": ("Pneumonia",),
    "polyp": ("polyp", "Polyp"),
}
MAX_LABEL_ROWS: Final = 200_000


@dataclass
class LabelledItem:
    """One labelled image (or study) to screen; ``labels`` maps label key -> 0/1 (absent: unknown)."""

    name: str
    labels: dict[str, int]
    path: Path | None = None
    study_instance_uid: str | None = None
    facts: dict[str, str] = field(default_factory=dict)


def _names_for(loaded: LoadedManifest, key: str) -> set[str]:
    label = next(lab for lab in loaded.manifest.labels if lab.key == key)
    return {label.display, key, *LABEL_SYNONYMS.get(key, ())}


def age_band(age: str) -> str:
    digits = "".join(ch for ch in age if ch.isdigit())
    if not digits:
        return "unknown"
    years = int(digits)
    if age.strip().upper().endswith(("M", "W", "D")):
        years = 0
    return "<18" if years < 18 else "18-39" if years < 40 else "40-64" if years < 65 else "65+"


def read_labels(labels: Path, loaded: LoadedManifest, images: Path | None) -> list[LabelledItem]:
    """Labelled items from a ChestX-ray14/CheXpert CSV or a Kvasir masks folder.

    Raises:
        ManifestError: the file names none of the version's findings, or cannot be read.
    """
    keys = [lab.key for lab in loaded.manifest.labels]
    if labels.is_dir():
        return _kvasir(labels, keys, images)
    try:
        with labels.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))[:MAX_LABEL_ROWS]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ManifestError(f"labels file cannot be read ({type(exc).__name__})") from exc
    if not rows:
        raise ManifestError("labels file has no rows")
    columns = set(rows[0])
    items = []
    for row in rows:
        name = (row.get("Image Index") or row.get("Path") or row.get("image") or "").strip()
        uid = (row.get("Study Instance UID") or row.get("StudyInstanceUID") or "").strip() or None
        found: dict[str, int] = {}
        if "Finding Labels" in columns:
            present = {s.strip() for s in (row.get("Finding Labels") or "").split("|")}
            for key in keys:
                found[key] = int(bool(present & _names_for(loaded, key)))
        else:
            for key in keys:
                column = next((c for c in _names_for(loaded, key) if c in columns), None)
                value = (row.get(column) or "").strip() if column else ""
                if value in ("1", "1.0", "0", "0.0"):
                    found[key] = int(float(value))
        facts = {
            "view": (row.get("View Position") or row.get("AP/PA") or "").strip(),
            "sex": (row.get("Patient Gender") or row.get("Sex") or "").strip()[:1].upper(),
            "age_band": age_band(row.get("Patient Age") or row.get("Age") or ""),
        }
        path = images / name if images is not None and name else None
        items.append(LabelledItem(name or (uid or ""), found, path, uid, {k: v for k, v in facts.items() if v}))
    if not any(item.labels for item in items):
        raise ManifestError(f"labels file names none of {loaded.manifest.ref}'s findings {keys}")
    return items


def _kvasir(masks_root: Path, keys: list[str], images: Path | None) -> list[LabelledItem]:
    import cv2

    if len(keys) != 1:
        raise ManifestError("masks label a single finding; this version reports several")
    masks = masks_root / "masks" if (masks_root / "masks").is_dir() else masks_root
    image_dir = images if images is not None else masks_root / "images"
    items = []
    for mask_path in sorted(masks.glob("*.png"))[:MAX_LABEL_ROWS]:
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            continue
        items.append(
            LabelledItem(mask_path.stem, {keys[0]: int(bool((mask > 127).any()))}, image_dir / f"{mask_path.stem}.dcm")
        )
    if not items:
        raise ManifestError("no readable masks in the labels folder")
    return items


def _header(path: Path) -> Dataset | None:
    try:
        return dcmread(path, stop_before_pixels=True)
    except Exception:  # the screening reports what is wrong with the file
        return None


def _header_facts(path: Path) -> dict[str, str]:
    ds = _header(path)
    if ds is None:
        return {}
    return {
        "manufacturer": str(ds.get("Manufacturer", "") or "unknown")[:64],
        "view": str(ds.get("ViewPosition", "") or ""),
        "sex": str(ds.get("PatientSex", "") or "")[:1],
        "age_band": age_band(str(ds.get("PatientAge", "") or "")),
    }


@dataclass
class Scored:
    item: LabelledItem
    study_ref: str
    outcome: str
    reason: str | None
    scores: dict[str, float]
    observation: Observation | None = None


def screen_labelled(
    loaded: LoadedManifest,
    items: Sequence[LabelledItem],
    *,
    study_ref_key: bytes,
    source: StudySource | None = None,
    batch_size: int = 4,
) -> list[Scored]:
    """Screen every labelled item with this version alone, as serving would."""
    screener = StudyScreener(
        [OnnxPredictor(loaded, providers="cpu")], study_ref_key=study_ref_key, batch_size=batch_size
    )
    out = []
    for item in items:
        if item.path is not None:
            inputs = [InstanceInput(item.path, item.name)]
            item.facts = {**_header_facts(item.path), **item.facts}
        elif item.study_instance_uid and source is not None:
            inputs = source.instances(item.study_instance_uid)
        else:
            continue
        result = screener.screen(inputs, group_by_study=True)[0]
        scores = {f.key: f.score for f in result.findings if f.model_id == loaded.manifest.id}
        reason = result.reason.value if result.reason else None
        header = _header(item.path) if item.path is not None else None
        observation = observation_of(result, loaded.manifest.ref, "baseline", header)
        out.append(Scored(item, result.study_ref, result.outcome.value, reason, scores, observation))
    return out


def _finding_metrics(y: np.ndarray, p: np.ndarray, threshold: float, target: float) -> dict[str, Any]:
    auc, low, high = auroc_ci(y, p, n_boot=500)
    at = confusion_at(y, p, threshold)
    out: dict[str, Any] = {
        "n": len(y),
        "positives": int(y.sum()),
        "auroc": round(auc, 4),
        "auroc_ci95": [round(low, 4), round(high, 4)],
        "threshold": threshold,
        "sensitivity": round(at.sensitivity, 4),
        "specificity": round(at.specificity, 4),
        "ppv": round(at.ppv, 4),
        "npv": round(at.npv, 4),
        "ece": round(expected_calibration_error(y, p), 4),
        "reliability": [[round(m, 4), round(o, 4), c] for m, o, c in reliability(y, p)],
    }
    if y.sum() > 0:
        proposed = threshold_for_sensitivity(y, p, target)
        at_p = confusion_at(y, p, proposed)
        out["proposed"] = {
            "threshold": round(proposed, 6),
            "target_sensitivity": target,
            "sensitivity": round(at_p.sensitivity, 4),
            "specificity": round(at_p.specificity, 4),
            "ppv": round(at_p.ppv, 4),
            "npv": round(at_p.npv, 4),
        }
    return out


def build_report(loaded: LoadedManifest, scored: Sequence[Scored], *, target_sensitivity: float) -> dict[str, Any]:
    """The validation report as a JSON-able mapping."""
    m = loaded.manifest
    screened = [s for s in scored if s.outcome == OutcomeValues.SCREENED.value]
    ood = sum(s.reason == ReasonCode.OUT_OF_DISTRIBUTION.value for s in scored)
    findings: dict[str, Any] = {}
    subgroups: dict[str, dict[str, Any]] = {}
    for label in m.labels:
        rows = [s for s in screened if label.key in s.item.labels and label.key in s.scores]
        if not rows:
            continue
        y = np.array([s.item.labels[label.key] for s in rows], dtype=np.float64)
        p = np.array([s.scores[label.key] for s in rows], dtype=np.float64)
        findings[label.key] = _finding_metrics(y, p, label.threshold, target_sensitivity)
        for fact in ("manufacturer", "view", "sex", "age_band"):
            for value in sorted({s.item.facts.get(fact, "unknown") or "unknown" for s in rows}):
                idx = np.array([(s.item.facts.get(fact, "unknown") or "unknown") == value for s in rows])
                ys, ps = y[idx], p[idx]
                at = confusion_at(ys, ps, label.threshold)
                entry = subgroups.setdefault(f"{fact}={value}", {})
                auc = auroc_ci(ys, ps, n_boot=200) if 0 < ys.sum() < len(ys) else (float("nan"),) * 3
                entry[label.key] = {
                    "n": len(ys),
                    "positives": int(ys.sum()),
                    "auroc": None if auc[0] != auc[0] else round(auc[0], 4),
                    "auroc_ci95": None if auc[1] != auc[1] else [round(auc[1], 4), round(auc[2], 4)],
                    "sensitivity": None if at.sensitivity != at.sensitivity else round(at.sensitivity, 4),
                    "specificity": None if at.specificity != at.specificity else round(at.specificity, 4),
                }
    for value in sorted({s.item.facts.get("manufacturer", "unknown") or "unknown" for s in scored}):
        group = [s for s in scored if (s.item.facts.get("manufacturer", "unknown") or "unknown") == value]
        refused = sum(s.reason == ReasonCode.OUT_OF_DISTRIBUTION.value for s in group)
        subgroups.setdefault(f"manufacturer={value}", {})["ood_refusal_rate"] = round(refused / len(group), 4)
    return {
        "model": m.ref,
        "manifest_sha256": loaded.manifest_sha256,
        "studies": len(scored),
        "screened": len(screened),
        "not_screened": {
            reason: sum(s.reason == reason for s in scored) for reason in sorted({s.reason for s in scored if s.reason})
        },
        "ood_refusal_rate": round(ood / len(scored), 4) if scored else None,
        "target_sensitivity": target_sensitivity,
        "findings": findings,
        "subgroups": subgroups,
        "proposed_thresholds": {
            key: {
                "threshold": f["proposed"]["threshold"],
                "basis": (
                    f"site validation of {m.ref} (n={f['n']}, {f['positives']} positive): highest threshold "
                    f"with sensitivity >= {target_sensitivity}"
                ),
            }
            for key, f in findings.items()
            if "proposed" in f
        },
        "disagreements_at_manifest_threshold": [
            {"study_ref": s.study_ref, "finding": key, "label": s.item.labels[key], "score": round(s.scores[key], 4)}
            for s in screened
            for key in s.scores
            if key in s.item.labels
            and (s.scores[key] >= next(lab.threshold for lab in m.labels if lab.key == key)) != bool(s.item.labels[key])
        ][:500],
    }


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_html(report: dict[str, Any], scored: Sequence[Scored]) -> str:
    """A self-contained HTML page: tables, ROC curves and reliability diagrams (inline PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [
        f"<html><head><meta charset='utf-8'><title>Site validation {html.escape(report['model'])}</title></head><body>",
        f"<h1>Site validation: {html.escape(report['model'])}</h1>",
        f"<p>{report['studies']} labelled studies, {report['screened']} screened; OOD refusal rate "
        f"{report['ood_refusal_rate']}; not screened: {html.escape(json.dumps(report['not_screened']))}</p>",
        "<table border=1 cellpadding=4><tr><th>finding</th><th>n (pos)</th><th>AUROC (95% CI)</th><th>threshold</th>"
        "<th>sens</th><th>spec</th><th>PPV</th><th>NPV</th><th>ECE</th><th>proposed threshold (sens/spec)</th></tr>",
    ]
    for key, f in report["findings"].items():
        prop = f.get("proposed")
        proposed = f"{prop['threshold']:.4f} ({prop['sensitivity']:.3f}/{prop['specificity']:.3f})" if prop else "-"
        parts.append(
            f"<tr><td>{html.escape(key)}</td><td>{f['n']} ({f['positives']})</td><td>{f['auroc']:.3f} "
            f"({f['auroc_ci95'][0]:.3f}-{f['auroc_ci95'][1]:.3f})</td><td>{f['threshold']:.4f}</td>"
            f"<td>{f['sensitivity']:.3f}</td><td>{f['specificity']:.3f}</td><td>{f['ppv']:.3f}</td>"
            f"<td>{f['npv']:.3f}</td><td>{f['ece']:.3f}</td><td>{proposed}</td></tr>"
        )
    parts.append("</table>")
    for key, f in report["findings"].items():
        fig, (ax_roc, ax_rel) = plt.subplots(1, 2, figsize=(8, 3.6))
        rows = [s for s in scored if key in s.scores and key in s.item.labels]
        y = np.array([s.item.labels[key] for s in rows])
        p = np.array([s.scores[key] for s in rows])
        thresholds = np.unique(np.concatenate([[np.inf], np.sort(p)[::-1]]))[::-1]
        tpr = [float(((p >= t) & (y == 1)).sum() / max(1, (y == 1).sum())) for t in thresholds]
        fpr = [float(((p >= t) & (y == 0)).sum() / max(1, (y == 0).sum())) for t in thresholds]
        ax_roc.plot(fpr, tpr)
        ax_roc.plot([0, 1], [0, 1], ":", color="grey")
        ax_roc.set(title=f"ROC {key}", xlabel="1 - specificity", ylabel="sensitivity")
        rel = f["reliability"]
        ax_rel.plot([r[0] for r in rel], [r[1] for r in rel], "o-")
        ax_rel.plot([0, 1], [0, 1], ":", color="grey")
        ax_rel.set(title=f"reliability (ECE {f['ece']:.3f})", xlabel="mean score", ylabel="observed rate")
        parts.append(f"<h2>{html.escape(key)}</h2><img src='data:image/png;base64,{_png(fig)}'/>")
        plt.close(fig)
    parts.append("<h2>Subgroups</h2><pre>" + html.escape(json.dumps(report["subgroups"], indent=1)) + "</pre>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _clean(value: Any) -> Any:
    """NaN (an undefined rate: no predicted positives, one class only) becomes null in JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def write_report(out_dir: Path, report: dict[str, Any], scored: Sequence[Scored]) -> tuple[Path, Path]:
    """``validation.json`` and ``validation.html`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "validation.json"
    html_path = out_dir / "validation.html"
    json_path.write_text(json.dumps(_clean(report), indent=2, allow_nan=False, default=str))
    html_path.write_text(render_html(report, scored))
    # the drift baseline of this version: what its inputs and scores looked like at validation
    save_observations(out_dir / "baseline.json", [s.observation for s in scored if s.observation is not None])
    return json_path, html_path
