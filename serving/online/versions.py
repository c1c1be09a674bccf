"""Model versions side by side: the active version per model (re-read for every job, so
``dxassist models promote``/``rollback`` take effect without a restart), and shadow versions
that screen the same studies without any of their results being delivered.

``VersionRouter`` holds predictors by ``id@version`` (each loaded once and kept: a version being
promoted is usually already warm as a shadow). ``VersionedPipeline`` is the in-process
``Pipeline`` of the service over it:

- ``prepare_study`` reads the active versions for this job, prepares the study with their QA and
  preprocessing, and names every prepared image by its version's ref (``cxr-triage@1.0.0``), so
  inference and assembly of that job use that one version even if a promotion lands meanwhile:
  a switch between jobs loses and mixes nothing;
- it then hands the prepared images to the shadow versions of the same model, in a background
  task bounded to one at a time: their inference runs on the same tensors, the result is
  assembled with the shadow version's own thresholds and written to ``shadow_results``
  (``serving.persistence.lifecycle``) only. Shadow work never blocks, fails or slows the job
  beyond sharing the CPU, and a full shadow backlog drops (and counts) shadow work, never jobs.

Where the work runs is three methods (``_prepare``, ``_run``, ``_info``): in this process's
threads here; on the fetcher and model deployments in the staged Serve topology
(``serving.rayserve.versions``), with everything else, shadows included, the same.

``VersionedScreener`` is the screener the service assembles with: it looks versions up by ref.
A shadow version must use the active version's preprocessing and acceptance rules (it sees the
same tensors); ``check_shadow`` refuses anything else with a ``ManifestError``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter

from models.errors import DxAssistError, InferenceFailed, ManifestError
from models.manifest import LoadedManifest
from models.predictor import OnnxPredictor
from models.registry import REGISTRY_ROOT, resolve
from models.validation import Agreement, agreement
from serving.core.screening import ModelOutputs, PreparedImage, StudyScreener, run_model
from serving.core.uids import is_dicom_uid
from serving.dicom.sources import StudySource
from serving.online.pipeline import PreparedStudy, StudyRequest, model_status, prepare_request, screener_options
from serving.persistence.lifecycle import LifecycleStore
from serving.persistence.results import ResultsStore
from serving.settings import ModelSettings, Settings

logger = logging.getLogger(__name__)

#: shadow studies waiting at most; beyond, shadow work is dropped (and counted), never a job
MAX_SHADOW_BACKLOG: Final = 64


def split_ref(ref: str) -> tuple[str, str]:
    """``id@version`` -> (id, version); ``ManifestError`` when it is not one."""
    model_id, sep, version = ref.partition("@")
    if not sep or not model_id or not version:
        raise ManifestError(f"{ref!r} is not MODEL@VERSION")
    return model_id, version


def check_shadow(active: LoadedManifest, shadow: LoadedManifest) -> None:
    """A shadow version sees the active version's tensors: same preprocessing, input and rules."""
    a, s = active.manifest, shadow.manifest
    if a.id != s.id:
        raise ManifestError(f"{s.ref} is not a version of {a.id}")
    if (a.input.preprocessing, a.input.shape) != (s.input.preprocessing, s.input.shape) or a.accepts != s.accepts:
        raise ManifestError(
            f"{s.ref} needs other preprocessing or acceptance rules than {a.ref}: it cannot shadow it "
            "(validate it on labelled studies instead)"
        )


class VersionRouter:
    """Predictors by ``id@version``; the active and shadow versions per model, from the settings
    and, once switched, from the results database."""

    def __init__(self, settings: Settings, lifecycle: LifecycleStore | None, *, root: Path = REGISTRY_ROOT) -> None:
        self.settings = settings
        self.lifecycle = lifecycle
        self.root = root
        self._models: dict[str, ModelSettings] = {m.id: m for m in settings.models}
        #: the version each model starts with (``latest`` resolved once, at start)
        self.configured: dict[str, str] = {
            m.id: resolve(m.id, m.version, root).manifest.version for m in settings.models
        }
        self._predictors: dict[str, OnnxPredictor] = {}
        self._manifests: dict[str, LoadedManifest] = {}
        self._screeners: dict[tuple[str, ...], StudyScreener] = {}
        self._lock = threading.Lock()

    def manifest(self, ref: str) -> LoadedManifest:
        with self._lock:
            loaded = self._manifests.get(ref)
        if loaded is None:
            model_id, version = split_ref(ref)
            loaded = resolve(model_id, version, self.root)
            with self._lock:
                self._manifests.setdefault(ref, loaded)
        return loaded

    def predictor(self, ref: str) -> OnnxPredictor:
        """The verified session of ``ref``, opened once (checksum and signature first)."""
        with self._lock:
            found = self._predictors.get(ref)
        if found is not None:
            return found
        model_id, _ = split_ref(ref)
        cfg = self._models.get(model_id)
        if cfg is None:
            raise ManifestError(f"model {model_id!r} is not configured in this service")
        predictor = OnnxPredictor(self.manifest(ref), **cfg.session_options())
        with self._lock:
            return self._predictors.setdefault(ref, predictor)

    def active(self) -> dict[str, str]:
        """``model_id -> version`` for this job: the database's switch when there is one."""
        return self.routing()[0]

    def shadows(self, active: Mapping[str, str]) -> dict[str, list[str]]:
        """Shadow versions per model (settings and ``dxassist models shadow``), minus the active one;
        none without a lifecycle store (shadow results have nowhere else to go)."""
        switched = self.lifecycle.routing()[1] if self.lifecycle is not None else None
        return self._shadows(active, switched)

    def routing(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        """The active versions and the shadows of each model, from one read of the database."""
        if self.lifecycle is None:
            return dict(self.configured), {}
        switched_active, switched_shadows = self.lifecycle.routing()
        active = dict(self.configured)
        active.update({k: v for k, v in switched_active.items() if k in active})
        return active, self._shadows(active, switched_shadows)

    def _shadows(self, active: Mapping[str, str], switched: dict[str, list[str]] | None) -> dict[str, list[str]]:
        if switched is None:
            return {}
        found: dict[str, list[str]] = {m.id: list(m.shadow) for m in self.settings.models}
        for model_id, versions in switched.items():
            if model_id in found:
                found[model_id] += [v for v in versions if v not in found[model_id]]
        return {k: [v for v in vs if v != active.get(k)] for k, vs in found.items() if vs}

    def screener(self, active: Mapping[str, str]) -> StudyScreener:
        """A screener (sessions included) for this set of active versions, built once per set."""
        key = tuple(sorted(f"{k}@{v}" for k, v in active.items()))
        with self._lock:
            found = self._screeners.get(key)
        if found is not None:
            return found
        screener = StudyScreener([self.predictor(ref) for ref in key], **screener_options(self.settings))
        with self._lock:
            return self._screeners.setdefault(key, screener)


class _ByRef(dict[str, LoadedManifest]):
    """``loaded`` of the versioned screener: any ``id@version`` the router knows."""

    def __init__(self, router: VersionRouter) -> None:
        super().__init__()
        self._router = router

    def __missing__(self, ref: str) -> LoadedManifest:
        loaded = self._router.manifest(ref)
        self[ref] = loaded
        return loaded


class VersionedScreener(StudyScreener):
    """The service's screener: assembles images named by ``id@version`` with that version."""

    def __init__(self, router: VersionRouter) -> None:
        refs = [f"{k}@{v}" for k, v in router.configured.items()]
        super().__init__([], manifests=[router.manifest(r) for r in refs], **screener_options(router.settings))
        self.loaded = _ByRef(router)


class VersionedPipeline:
    """The in-process pipeline with versions: active per job, shadows in the background."""

    def __init__(self, router: VersionRouter, source: StudySource | None) -> None:
        self.router = router
        self.source = source  # None where ``_prepare`` runs elsewhere (the staged Serve topology)
        self.screener = VersionedScreener(router)
        self._shadow_gate = asyncio.Semaphore(1)
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        #: shadow screenings stored / dropped (backlog full) / failed, for tests and metrics
        self.shadow_counts: dict[str, int] = {"stored": 0, "dropped": 0, "failed": 0}
        self._shadow_metric: Counter | None = None

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        """Count shadow screenings on the service's registry (``/metrics``)."""
        self._shadow_metric = Counter(
            "dxassist_shadow_screenings",
            "Shadow screenings by outcome: stored (never delivered), dropped (backlog full), failed",
            ["model", "outcome"],
            registry=registry,
        )

    def _count(self, outcome: str, model: str = "") -> None:
        self.shadow_counts[outcome] += 1
        if self._shadow_metric is not None:
            self._shadow_metric.labels(model, outcome).inc()

    # -- where the work runs: in this process here; ``serving.rayserve.versions`` overrides these
    async def _prepare(self, active: dict[str, str], request: StudyRequest) -> PreparedStudy:
        """The study prepared with the QA and preprocessing of the ``active`` versions."""
        source = self.source
        assert source is not None
        # a version promoted since the last job opens its session here, off the event loop
        return await asyncio.to_thread(lambda: prepare_request(self.router.screener(active), source, request))

    async def _run(self, ref: str, tensors: NDArray[np.float32]) -> ModelOutputs:
        """One image's frames through version ``ref`` (``InferenceFailed`` when it fails)."""
        batch = self.router.settings.screening.batch_size
        return await asyncio.to_thread(lambda: run_model(self.router.predictor(ref), tensors, batch))

    async def _info(self, ref: str) -> dict[str, object]:
        return await asyncio.to_thread(model_status, self.router.predictor(ref))

    async def prepare_study(self, request: StudyRequest) -> PreparedStudy:
        active, shadows = await asyncio.to_thread(self.router.routing)
        prepared = await self._prepare(active, request)
        for image in prepared.prepared:
            image.model_id = f"{image.model_id}@{active[image.model_id]}"
        if shadows and prepared.prepared:
            if len(self._shadow_tasks) >= MAX_SHADOW_BACKLOG:
                self._count("dropped")
            else:
                task = asyncio.create_task(self._shadow(prepared, active, shadows, request))
                self._shadow_tasks.add(task)
                task.add_done_callback(self._shadow_tasks.discard)
        return prepared

    async def infer(self, model_id: str, tensors: NDArray[np.float32]) -> ModelOutputs:
        """``model_id`` is the image's ``id@version``, fixed when its job was prepared."""
        return await self._run(model_id, tensors)

    async def model_info(self) -> list[dict[str, object]]:
        active = await asyncio.to_thread(self.router.active)
        return [await self._info(f"{k}@{v}") for k, v in active.items()]

    async def shadow_idle(self) -> None:
        """Wait until every scheduled shadow screening has finished (tests, drain)."""
        while self._shadow_tasks:
            await asyncio.gather(*list(self._shadow_tasks), return_exceptions=True)

    async def _shadow(
        self, prepared: PreparedStudy, active: dict[str, str], shadows: dict[str, list[str]], request: StudyRequest
    ) -> None:
        async with self._shadow_gate:
            for model_id, versions in shadows.items():
                images = [i for i in prepared.prepared if i.model_id.partition("@")[0] == model_id]
                if not images:
                    continue
                for version in versions:
                    try:
                        await self._shadow_one(images, prepared, model_id, version, active, request)
                        self._count("stored", f"{model_id}@{version}")
                    except (DxAssistError, OSError, ValueError) as exc:
                        self._count("failed", f"{model_id}@{version}")
                        logger.warning("shadow screening failed (%s)", type(exc).__name__, extra={"stage": "shadow"})

    async def _shadow_one(
        self,
        images: list[PreparedImage],
        prepared: PreparedStudy,
        model_id: str,
        version: str,
        active: dict[str, str],
        request: StudyRequest,
    ) -> None:
        ref = f"{model_id}@{version}"
        active_ref = f"{model_id}@{active[model_id]}"
        await asyncio.to_thread(lambda: check_shadow(self.router.manifest(active_ref), self.router.manifest(ref)))
        paired: list[tuple[PreparedImage, ModelOutputs | InferenceFailed]] = []
        for image in images:
            named = dataclasses.replace(image, model_id=ref)  # assembled with the shadow's thresholds and gate
            try:
                paired.append((named, await self._run(ref, image.tensors)))
            except InferenceFailed as exc:
                paired.append((named, exc))
        uids = [i.study_instance_uid for i in images]
        uid = next((u for u in uids if is_dicom_uid(u)), request.study_instance_uid or "")
        result = await asyncio.to_thread(self.screener.assemble, uid, paired, prepared.rejected)
        assert self.router.lifecycle is not None  # ``shadows`` names none without a store
        await asyncio.to_thread(self.router.lifecycle.add_shadow_result, model_id, version, active[model_id], result)


@dataclass(frozen=True)
class FindingAgreement:
    key: str
    agreement: Agreement


@dataclass(frozen=True)
class Comparison:
    """A shadow version against the active version it ran beside, over the same studies."""

    model_id: str
    shadow_version: str
    studies: int
    unmatched: int
    findings: list[FindingAgreement]
    #: (study ref, finding key, active score, shadow score) where the verdicts differ
    disagreements: list[tuple[str, str, float, float]]


def compare_shadow(lifecycle: LifecycleStore, results: ResultsStore, model_id: str, shadow_version: str) -> Comparison:
    """Pair each shadow result with the delivered result of the same study from the version that
    was active then, and measure agreement per finding. Studies are named by study ref only."""
    scores: dict[str, list[tuple[bool, bool, float, float]]] = {}
    disagreements: list[tuple[str, str, float, float]] = []
    studies = unmatched = 0
    for record in lifecycle.shadow_results(model_id, shadow_version):
        active = results.latest(record.study_instance_uid) if record.study_instance_uid else None
        active_findings = {
            f.key: f
            for f in (active.findings if active is not None else [])
            if f.model_id == model_id and f.model_version == record.active_version
        }
        shadow_findings = {f.key: f for f in record.result.findings if f.model_id == model_id}
        if not active_findings or not shadow_findings:
            unmatched += 1
            continue
        studies += 1
        for key, s in shadow_findings.items():
            a = active_findings.get(key)
            if a is None:
                continue
            scores.setdefault(key, []).append((a.positive, s.positive, a.score, s.score))
            if a.positive != s.positive:
                disagreements.append((record.study_ref, key, a.score, s.score))
    findings = [
        FindingAgreement(
            key,
            agreement([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows]),
        )
        for key, rows in sorted(scores.items())
    ]
    return Comparison(model_id, shadow_version, studies, unmatched, findings, disagreements)
