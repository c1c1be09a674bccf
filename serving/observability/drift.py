"""Drift monitoring: do today's inputs and scores still look like the validation baseline?

For one model version, each screened study becomes an ``Observation``: input facts from its
header (modality, manufacturer, pixel spacing, bit depth, view), the OOD distance, and the score
and verdict of every finding. ``drift_checks`` compares each day's observations with the
baseline (the site validation's, kept beside the version as ``baseline.json``):

- categorical facts (modality, manufacturer, view, bit depth) and positive rates by the
  population stability index (PSI), continuous values (pixel spacing, OOD distance, scores) by
  PSI on the baseline's deciles and the two-sample Kolmogorov-Smirnov statistic;
- a check crosses when PSI > ``psi_alert`` or KS > ``ks_alert`` (``drift`` settings), and is
  judged only on days with at least ``min_studies`` studies.

``DriftMonitor`` exports the latest values as Prometheus gauges (the running service on its
``/metrics``, every ``drift.interval_s`` over the last ``drift.window_h`` hours:
``serving.online.drift_watch``; ``dxassist models drift --prom-file`` writes them for
node_exporter's textfile collector) and writes one log line per
crossed check that names the model, the quantity and the numbers: never a study, a UID or a
header value (a manufacturer's name is a header value; the quantity is named, not the value).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from pydicom.dataset import Dataset

from models.results import OutcomeValues, ScreeningResult
from models.validation import ks_statistic, psi_categorical, psi_continuous

logger = logging.getLogger(__name__)

CATEGORICAL: Final = ("modality", "manufacturer", "view", "bit_depth")
CONTINUOUS: Final = ("pixel_spacing",)


@dataclass
class Observation:
    """One screened study, as drift sees it (no identifiers)."""

    day: str
    facts: dict[str, str] = field(default_factory=dict)
    pixel_spacing: float | None = None
    ood_distance: float | None = None
    scores: dict[str, float] = field(default_factory=dict)
    positives: dict[str, bool] = field(default_factory=dict)


def header_facts(ds: Dataset | None) -> tuple[dict[str, str], float | None]:
    """Categorical input facts and the pixel spacing (mm) of one header."""
    if ds is None:
        return {}, None
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        mm = float(spacing[0]) if spacing else None
    except (TypeError, ValueError, IndexError):
        mm = None
    facts = {
        "modality": str(ds.get("Modality", "") or "unknown"),
        "manufacturer": str(ds.get("Manufacturer", "") or "unknown")[:64],
        "view": str(ds.get("ViewPosition", "") or "unknown"),
        "bit_depth": str(ds.get("BitsStored", "") or "unknown"),
    }
    return facts, mm


def observation_of(result: ScreeningResult, model_ref: str, day: str, header: Dataset | None) -> Observation | None:
    """The observation of one result for ``model_ref`` (``None`` when that version did not screen it)."""
    model_id, _, version = model_ref.partition("@")
    findings = [f for f in result.findings if f.model_id == model_id and f.model_version == version]
    if result.outcome != OutcomeValues.SCREENED or not findings:
        return None
    facts, spacing = header_facts(header)
    distances = [i.ood_distance for i in result.images if i.ood_distance is not None and i.model_ref == model_ref]
    return Observation(
        day=day,
        facts=facts,
        pixel_spacing=spacing,
        ood_distance=max(distances) if distances else None,
        scores={f.key: f.score for f in findings},
        positives={f.key: f.positive for f in findings},
    )


@dataclass(frozen=True)
class DriftCheck:
    day: str
    quantity: str  # e.g. "manufacturer", "score:pneumothorax", "positive_rate:pneumothorax"
    statistic: str  # "psi" or "ks"
    value: float
    threshold: float
    n: int
    crossed: bool


def _values(observations: Iterable[Observation], quantity: str) -> list[Any]:
    kind, _, key = quantity.partition(":")
    out: list[Any] = []
    for o in observations:
        if kind in CATEGORICAL:
            out.append(o.facts.get(kind, "unknown"))
        elif kind == "pixel_spacing" and o.pixel_spacing is not None:
            out.append(o.pixel_spacing)
        elif kind == "ood_distance" and o.ood_distance is not None:
            out.append(o.ood_distance)
        elif kind == "score" and key in o.scores:
            out.append(o.scores[key])
        elif kind == "positive_rate" and key in o.positives:
            out.append("positive" if o.positives[key] else "negative")
    return out


def quantities(baseline: Sequence[Observation]) -> list[str]:
    keys = sorted({k for o in baseline for k in o.scores})
    return [
        *CATEGORICAL,
        *CONTINUOUS,
        "ood_distance",
        *[f"score:{k}" for k in keys],
        *[f"positive_rate:{k}" for k in keys],
    ]


def drift_checks(
    baseline: Sequence[Observation],
    current: Sequence[Observation],
    *,
    psi_alert: float,
    ks_alert: float,
    min_studies: int,
) -> list[DriftCheck]:
    """Every quantity of every day of ``current`` against ``baseline`` (days with fewer than
    ``min_studies`` studies are reported, never crossed)."""
    checks = []
    for day in sorted({o.day for o in current}):
        today = [o for o in current if o.day == day]
        judged = len(today) >= min_studies
        for quantity in quantities(baseline):
            base, now = _values(baseline, quantity), _values(today, quantity)
            if not base or not now:
                continue
            kind = quantity.partition(":")[0]
            if kind in CATEGORICAL or kind == "positive_rate":
                value = psi_categorical([str(v) for v in base], [str(v) for v in now])
                checks.append(
                    DriftCheck(day, quantity, "psi", round(value, 4), psi_alert, len(now), judged and value > psi_alert)
                )
            else:
                psi = psi_continuous(base, now)
                ks = ks_statistic(base, now)
                checks.append(
                    DriftCheck(day, quantity, "psi", round(psi, 4), psi_alert, len(now), judged and psi > psi_alert)
                )
                checks.append(
                    DriftCheck(day, quantity, "ks", round(ks, 4), ks_alert, len(now), judged and ks > ks_alert)
                )
    return checks


class DriftMonitor:
    """Prometheus gauges of the latest day's drift statistics per model version, and the log
    line (no PHI) for each crossed threshold."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.value = Gauge(
            "dxassist_drift_statistic",
            "Drift of inputs/scores against the validation baseline (latest day)",
            ["model", "quantity", "statistic"],
            registry=self.registry,
        )
        self.crossed = Gauge(
            "dxassist_drift_crossed",
            "1 when the latest day's drift statistic is above its threshold",
            ["model", "quantity", "statistic"],
            registry=self.registry,
        )

    def publish(
        self, model_ref: str, checks: Sequence[DriftCheck], *, log: set[tuple[str, str]] | None = None
    ) -> list[DriftCheck]:
        """Set the gauges from the latest day and log every crossed check (only those whose
        ``(quantity, statistic)`` is in ``log`` when given: the service logs a crossing once);
        returns the crossed checks."""
        if not checks:
            return []
        latest = max(c.day for c in checks)
        crossed = []
        for c in checks:
            if c.day != latest:
                continue
            self.value.labels(model_ref, c.quantity, c.statistic).set(c.value)
            self.crossed.labels(model_ref, c.quantity, c.statistic).set(1.0 if c.crossed else 0.0)
            if c.crossed:
                crossed.append(c)
            if c.crossed and (log is None or (c.quantity, c.statistic) in log):
                logger.warning(
                    "drift threshold crossed: %s %s %s %.3f > %.3f over %d studies on %s",
                    model_ref,
                    c.quantity,
                    c.statistic,
                    c.value,
                    c.threshold,
                    c.n,
                    c.day,
                )
        return crossed

    def forget(self, model_ref: str, labels: Iterable[tuple[str, str]]) -> None:
        """Drop the gauges of these ``(quantity, statistic)`` of a version (no longer active, or
        a quantity no longer observed): a stale 1 would keep an alert firing."""
        for quantity, statistic in labels:
            for gauge in (self.value, self.crossed):
                try:
                    gauge.remove(model_ref, quantity, statistic)
                except KeyError:
                    pass

    def write_textfile(self, path: Path) -> None:
        """The gauges in Prometheus text format, for node_exporter's textfile collector (``dxassist
        models drift``; the service exports the same gauges on its own ``/metrics``)."""
        write_to_textfile(str(path), self.registry)


def save_observations(path: Path, observations: Sequence[Observation]) -> None:
    path.write_text(json.dumps([asdict(o) for o in observations]))


def load_observations(path: Path) -> list[Observation]:
    """A baseline written by ``save_observations`` (``ValueError`` when it is not one)."""
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError("a baseline is a JSON list of observations")
    return [Observation(**item) for item in data]
