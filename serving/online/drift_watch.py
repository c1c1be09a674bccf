"""Drift monitoring inside the running service: per active version, every ``drift.interval_s``
seconds, the drift figures of the last ``drift.window_h`` hours against the version's
validation baseline, as Prometheus gauges on the service's own ``/metrics``.

One implementation: the observations are read from the results database by ``observations``
(which ``dxassist models drift`` also uses, per day instead of per window) and judged by
``serving.observability.drift.drift_checks``; ``DriftMonitor`` sets the gauges
(``dxassist_drift_statistic``, ``dxassist_drift_crossed``) and logs one line per threshold
crossed, naming the model version, the quantity, the statistic, the value and the threshold,
never a study or a header value. A check that stays crossed is logged once, when it crosses,
not at every pass (the gauge stays at 1 meanwhile). The gauges of a version no longer active
(promoted or rolled back away from) are dropped, so a stale 1 keeps no alert firing.

The window is judged as one group: with fewer than ``drift.min_studies`` screenings of the
version in it nothing is crossed (the gauges still show the figures). A version without a
``baseline.json`` beside its manifest (not validated at the site) is not watched; the service
says so once. Reads run off the event loop and only the screenings new since the last pass are
parsed (the window's observations are kept, those older than the window dropped).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry

from models.errors import DxAssistError
from serving.observability.drift import (
    DriftCheck,
    DriftMonitor,
    Observation,
    drift_checks,
    load_observations,
    observation_of,
)
from serving.persistence.lifecycle import screenings_since
from serving.persistence.results import ResultsStore
from serving.settings import DriftSettings

logger = logging.getLogger(__name__)


def observations(
    results: ResultsStore, ref: str, since: str, *, label: str | None = None
) -> Iterator[tuple[int, str, str, Observation]]:
    """(screening row id, public screening id, created_at, observation) of every screening of
    ``ref`` created at or after ``since`` (ISO UTC), oldest first. Each observation's ``day`` is
    the screening's UTC date, or ``label`` for all of them (one window)."""
    for screening_id, public_id, created_at, result in screenings_since(results.target, since):
        if not any(f"{f.model_id}@{f.model_version}" == ref for f in result.findings):
            continue  # another version's screening: no evidence read
        delivery = results.for_delivery(screening_id)
        header = delivery[1][0] if delivery is not None and delivery[1] else None
        observation = observation_of(result, ref, label or created_at[:10], header)
        if observation is not None:
            yield screening_id, public_id, created_at, observation


#: how far before the newest screening seen each pass reads again (longer than any commit takes)
_COMMIT_MARGIN = timedelta(seconds=60)


@dataclass
class _Window:
    """The observations of one version within the window, by screening row id."""

    seen: dict[int, tuple[str, Observation]] = field(default_factory=dict)
    last_created: str = ""


class DriftWatch:
    """The service's drift monitor over its results database (``run`` is the periodic task)."""

    def __init__(
        self,
        settings: DriftSettings,
        results: ResultsStore,
        active: Callable[[], dict[str, str]],
        baseline_path: Callable[[str], Path],
        registry: CollectorRegistry,
    ) -> None:
        self.settings = settings
        self.results = results
        self.active = active
        self.baseline_path = baseline_path
        self.monitor = DriftMonitor(registry)
        self._baselines: dict[str, list[Observation] | None] = {}
        self._windows: dict[str, _Window] = {}
        self._alerting: set[tuple[str, str, str]] = set()
        #: the gauges' (quantity, statistic) set per version, to drop those no longer current
        self._published: dict[str, set[tuple[str, str]]] = {}

    @property
    def label(self) -> str:
        return f"last {self.settings.window_h:g} h"

    def _baseline(self, ref: str) -> list[Observation] | None:
        if ref not in self._baselines:
            try:
                path = self.baseline_path(ref)
                self._baselines[ref] = load_observations(path) if path.is_file() else None
            except (DxAssistError, OSError, ValueError, TypeError) as exc:
                logger.warning("drift baseline of %s unreadable (%s): not watched", ref, type(exc).__name__)
                self._baselines[ref] = None
            else:
                if self._baselines[ref] is None:
                    logger.info("%s has no drift baseline (validate it at the site): not watched", ref)
        return self._baselines[ref]

    def check(self, now: datetime | None = None) -> dict[str, list[DriftCheck]]:
        """One pass (blocking; the periodic task runs it in a thread): the checks per active
        version, gauges set, newly crossed thresholds logged."""
        start = ((now or datetime.now(UTC)) - timedelta(hours=self.settings.window_h)).isoformat(
            timespec="milliseconds"  # as the results database writes created_at
        )
        out: dict[str, list[DriftCheck]] = {}
        active = {f"{model_id}@{version}" for model_id, version in self.active().items()}
        for ref in sorted(set(self._published) - active):  # promoted or rolled back away from
            self.monitor.forget(ref, self._published.pop(ref))
            self._windows.pop(ref, None)
            self._alerting = {k for k in self._alerting if k[0] != ref}
        for ref in sorted(active):
            baseline = self._baseline(ref)
            if baseline is None:
                continue
            window = self._windows.setdefault(ref, _Window())
            # re-read a margin before the newest row seen: a row's created_at is taken before its
            # commit, so on PostgreSQL an older row may become visible after a newer one (rows
            # already seen are kept by id, not counted twice)
            resume = (
                (datetime.fromisoformat(window.last_created) - _COMMIT_MARGIN).isoformat(timespec="milliseconds")
                if window.last_created
                else ""
            )
            for row_id, _public, created, observation in observations(
                self.results, ref, max(start, resume), label=self.label
            ):
                window.seen.setdefault(row_id, (created, observation))
                window.last_created = max(window.last_created, created)
            window.seen = {k: v for k, v in window.seen.items() if v[0] >= start}
            d = self.settings
            checks = drift_checks(
                baseline,
                [o for _c, o in window.seen.values()],
                psi_alert=d.psi_alert,
                ks_alert=d.ks_alert,
                min_studies=d.min_studies,
            )
            self.monitor.publish(ref, checks, log=self._newly_crossed(ref, checks))
            published = {(c.quantity, c.statistic) for c in checks}
            self.monitor.forget(ref, self._published.get(ref, set()) - published)
            self._published[ref] = published
            out[ref] = checks
        return out

    def _newly_crossed(self, ref: str, checks: list[DriftCheck]) -> set[tuple[str, str]]:
        """The (quantity, statistic) crossed now and not at the previous pass."""
        crossed = {(ref, c.quantity, c.statistic) for c in checks if c.crossed}
        previous = {k for k in self._alerting if k[0] == ref}
        self._alerting = (self._alerting - previous) | crossed
        return {(q, s) for _r, q, s in crossed - previous}

    async def run(self) -> None:
        """Every ``interval_s`` seconds, one pass off the event loop; a failed pass is logged
        (its type only) and the next one runs."""
        while True:
            await asyncio.sleep(self.settings.interval_s)
            try:
                await asyncio.to_thread(self.check)
            except Exception as exc:  # the watch never stops the service
                logger.error("drift pass failed (%s)", type(exc).__name__)
