"""Run cases through the decode boundary in worker processes and count what went wrong.

Each case goes through ``DecodePool.prepare``, the call ``StudyScreener.prepare`` makes: read,
eager header, input QA, budget, decode, preprocess, in a worker process with an address-space
cap and a per-file timeout. Many cases share a worker (as in the service); the pool itself
accounts for isolation events. A run is clean when all of these are zero:

* ``crashes``: an exception escaped ``prepare`` (the boundary's promise is broken);
* ``hangs``: a file used 10 CPU seconds (or 60 s of wall clock) and its worker was killed;
* ``dead_workers``: a worker process died (native abort, segfault, OOM kill);
* ``memory``: a ``MemoryError`` inside the boundary (the estimate let through a file that hit
  the address-space cap), or a per-file peak RSS above the documented budget;
* ``recursion``: a ``RecursionError`` (nesting that the parser limits should have refused).

``unexpected`` counts failures the boundary caught with its last-resort handler (typed
``DECODE_FAILED``, but a check is missing somewhere); it is reported, with exception types,
for triage.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final

from models.decode import (
    FAULT_MEMORY,
    FAULT_RECURSION,
    FAULT_TIMEOUT,
    FAULT_UNEXPECTED,
    FAULT_WORKER_DIED,
    DecodedInstance,
    DecodeOutcome,
    FramePlan,
    RoutePlanner,
    sample_frames,
)
from models.decode_pool import DecodePool
from models.errors import UnsupportedStudy
from models.limits import GIB, DecodeLimits
from models.pixels import ImageHeader
from models.preprocessing import get_pipeline
from models.registry import resolve

#: The documented per-file peak RSS budget of a decode worker (docs/adr/0013).
RSS_BUDGET_BYTES: Final = int(1.5 * GIB)


@dataclass(frozen=True, slots=True)
class FuzzPlanner:
    """The service's routing first; an image no model accepts is still decoded (grayscale with
    the chest pipeline, colour with the endoscopy one) so that fuzzed files that QA would
    refuse exercise the codecs too."""

    route: RoutePlanner

    def __call__(self, header: ImageHeader) -> FramePlan:
        try:
            return self.route(header)
        except UnsupportedStudy:
            name = "endo_v1" if header.samples_per_pixel == 3 else "cxr_v1"
            return FramePlan("fuzz", get_pipeline(name), sample_frames(header.number_of_frames, 4))


def default_planner() -> FuzzPlanner:
    manifests = tuple(resolve(m).manifest for m in ("cxr-triage", "endoscopy-polyp"))
    return FuzzPlanner(RoutePlanner(manifests, max_frames=4))


@dataclass
class Report:
    cases: int = 0
    seconds: float = 0.0
    crashes: int = 0
    hangs: int = 0
    dead_workers: int = 0
    memory: int = 0
    recursion: int = 0
    unexpected: int = 0
    screened: int = 0
    peak_rss_bytes: int = 0
    address_space_cap: int = 0
    workers_started: int = 0
    recycled: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    failures: list[tuple[str, str]] = field(default_factory=list)  # (case, what)

    @property
    def clean(self) -> bool:
        return not (self.crashes or self.hangs or self.dead_workers or self.memory or self.recursion)

    def summary(self) -> dict[str, Any]:
        return {
            "cases": self.cases,
            "seconds": round(self.seconds, 1),
            "cases_per_s": round(self.cases / self.seconds, 1) if self.seconds else 0.0,
            "crashes": self.crashes,
            "hangs": self.hangs,
            "dead_workers": self.dead_workers,
            "memory": self.memory,
            "recursion": self.recursion,
            "unexpected": self.unexpected,
            "screened": self.screened,
            "peak_rss_mib": round(self.peak_rss_bytes / 2**20, 1),
            "address_space_cap_mib": round(self.address_space_cap / 2**20, 1),
            "workers_started": self.workers_started,
            "recycled": self.recycled,
            "reasons": dict(self.reasons.most_common()),
            "failures": self.failures[:50],
        }


def _count(report: Report, name: str, outcome: DecodeOutcome) -> None:
    report.cases += 1
    peak = int(outcome.stats.get("peak_rss", 0))
    report.peak_rss_bytes = max(report.peak_rss_bytes, peak)
    if peak > RSS_BUDGET_BYTES:
        report.memory += 1
        report.failures.append((name, f"peak RSS {peak >> 20} MiB"))
    if isinstance(outcome, DecodedInstance):
        report.screened += 1
        report.reasons["SCREENED"] += 1
    else:
        report.reasons[outcome.reason.value] += 1
        counter = {
            FAULT_TIMEOUT: "hangs",
            FAULT_WORKER_DIED: "dead_workers",
            FAULT_MEMORY: "memory",
            FAULT_RECURSION: "recursion",
            FAULT_UNEXPECTED: "unexpected",
        }.get(outcome.fault)
        if counter:
            setattr(report, counter, getattr(report, counter) + 1)
            report.failures.append((name, f"{outcome.fault}: {outcome.detail}"))


def run_cases(
    cases: Iterable[tuple[str, Callable[[], bytes]]],
    *,
    workers: int = 2,
    limits: DecodeLimits | None = None,
    progress: Callable[[int], None] | None = None,
) -> Report:
    """Run every case through ``DecodePool.prepare`` with ``workers`` workers and count."""
    limits = limits or DecodeLimits(file_timeout_s=10.0, file_wall_timeout_s=60.0)
    warnings.simplefilter("ignore")  # the mutators parse hostile bytes with pydicom here too
    planner = default_planner()
    report = Report()
    lock = threading.Lock()
    started = time.perf_counter()
    with DecodePool(workers, limits) as pool, ThreadPoolExecutor(workers) as threads:

        def one(case: tuple[str, Callable[[], bytes]]) -> None:
            name, build = case
            try:
                data = build()
            except Exception as exc:  # a mutator bug, not a finding: recorded, not counted
                report.failures.append((name, f"case could not be built ({type(exc).__name__})"))
                return
            try:
                outcome = pool.prepare(data, planner)
            except BaseException as exc:
                with lock:
                    report.crashes += 1
                    report.failures.append((name, f"crash {type(exc).__name__}"))
                return
            with lock:
                _count(report, name, outcome)
            if progress is not None:
                progress(report.cases)

        for _ in threads.map(one, cases):
            pass
        report.workers_started = pool.stats.workers_started
        report.recycled = pool.stats.recycled
        report.address_space_cap = pool.stats.address_space_cap
    report.seconds = time.perf_counter() - started
    return report
