"""Model versions in the staged Serve topology: shadow and promotion as in the in-process pipeline.

The staged topology (``serving.rayserve.app``) has one model deployment per model id; these
plain classes make each of them serve any version of its model, so any number of versions run
at once, and let the ingress run the one versioned pipeline (``serving.online.versions``):

- ``VersionedModels`` (inside ``model-<id>``): a verified ``OnnxPredictor`` per version,
  the configured one opened at start, the settings' shadow versions warmed at start, any other
  (a version shadowed or promoted at run time) opened on its first request and kept. A batch of
  requests is grouped by version, one ORT pass per version; a version that cannot be opened
  fails its own requests only.
- ``VersionedPreparer`` (inside ``fetcher``): prepares a study with the QA and preprocessing of
  the versions the ingress read as active for that job (screeners without sessions, one per set
  of versions).
- ``StagedVersionedPipeline`` (inside ``ingress``): ``VersionedPipeline`` with its work sent
  through the deployment handles. The ingress reads the active versions for each job from the
  results database, names every prepared image ``id@version`` and sends each image to its
  model's deployment with that ref, so a job is inferred and assembled with the version it was
  prepared with whatever ``promote`` does meanwhile; shadow versions run on the same tensors
  through the same deployments, and their results go to ``shadow_results`` only, never to the
  outbox (the ingress, not a model replica, stores them).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry

from models.errors import DxAssistError, InferenceFailed, ManifestError
from models.predictor import OnnxPredictor
from models.registry import REGISTRY_ROOT, resolve
from serving.core.screening import ModelOutputs, StudyScreener, run_model
from serving.dicom.sources import StudySource
from serving.online.pipeline import PreparedStudy, StudyRequest, prepare_request, screener_options
from serving.online.versions import VersionedPipeline, VersionRouter, split_ref
from serving.persistence.lifecycle import LifecycleStore
from serving.settings import ModelSettings, Settings


class VersionedModels:
    """The predictors of one model by ``id@version`` (a model deployment's plain class)."""

    def __init__(self, model: ModelSettings, default: OnnxPredictor, *, root: Path = REGISTRY_ROOT) -> None:
        self.model = model
        self.root = root
        self.default_ref = default.manifest.ref
        self._predictors: dict[str, OnnxPredictor] = {self.default_ref: default}
        self._lock = threading.Lock()

    def predictor(self, ref: str | None = None) -> OnnxPredictor:
        """The session of ``ref`` (``None``: the configured version), opened once."""
        ref = ref or self.default_ref
        with self._lock:
            found = self._predictors.get(ref)
        if found is not None:
            return found
        model_id, version = split_ref(ref)
        if model_id != self.model.id:
            raise ManifestError(f"{ref} is not a version of {self.model.id}")
        predictor = OnnxPredictor(resolve(model_id, version, self.root), **self.model.session_options(lone_runs=False))
        with self._lock:
            return self._predictors.setdefault(ref, predictor)

    def warm(self, versions: Sequence[str]) -> list[str]:
        """Open these versions now (the settings' shadows); returns those that could not be."""
        failed = []
        for version in versions:
            try:
                self.predictor(f"{self.model.id}@{version}")
            except (DxAssistError, OSError) as exc:
                failed.append(f"{self.model.id}@{version} ({type(exc).__name__})")
        return failed

    def loaded(self) -> list[OnnxPredictor]:
        with self._lock:
            return list(self._predictors.values())

    def run_batch(
        self, items: Sequence[tuple[str | None, NDArray[np.float32]]], batch_size: int
    ) -> list[ModelOutputs | DxAssistError]:
        """One ORT pass per version over the frames of that version's requests, split back per
        request in their order; a version that cannot be opened or run answers its own requests
        with the error."""
        out: list[ModelOutputs | DxAssistError | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, (ref, _tensors) in enumerate(items):
            groups.setdefault(ref or self.default_ref, []).append(i)
        for ref, indices in groups.items():
            results: list[ModelOutputs | DxAssistError]
            try:
                results = list[ModelOutputs | DxAssistError](
                    run_joined(self.predictor(ref), [items[i][1] for i in indices], batch_size)
                )
            except DxAssistError as exc:
                results = [exc] * len(indices)
            except OSError as exc:
                results = [InferenceFailed(f"{ref} could not be opened ({type(exc).__name__})")] * len(indices)
            for i, result in zip(indices, results, strict=True):
                out[i] = result
        return [r for r in out if r is not None]


def run_joined(predictor: OnnxPredictor, items: list[NDArray[np.float32]], batch_size: int) -> list[ModelOutputs]:
    """One ORT pass over several images' frames, split back per image."""
    sizes = [len(t) for t in items]
    joined = np.concatenate(items) if len(items) > 1 else items[0]
    out = run_model(predictor, joined, max(batch_size, len(joined)))
    results, start = [], 0
    for n in sizes:
        results.append(out.rows(start, n, batch_size=len(joined)))
        start += n
    return results


class VersionedPreparer:
    """Prepares studies with the rules of a given set of versions (the fetcher's plain class);
    screeners hold manifests only, no session, one per set of versions."""

    def __init__(self, settings: Settings, source: StudySource, *, root: Path = REGISTRY_ROOT) -> None:
        self.settings = settings
        self.source = source
        self.root = root
        self._screeners: dict[tuple[str, ...], StudyScreener] = {}
        self._lock = threading.Lock()

    def screener(self, active: Mapping[str, str] | None) -> StudyScreener:
        versions = dict(active or {})
        key = tuple(sorted(f"{m.id}@{versions.get(m.id, m.version)}" for m in self.settings.models))
        with self._lock:
            found = self._screeners.get(key)
        if found is not None:
            return found
        manifests = [resolve(*split_ref(ref), self.root) for ref in key]
        screener = StudyScreener([], manifests=manifests, **screener_options(self.settings))
        with self._lock:
            return self._screeners.setdefault(key, screener)

    def prepare(self, request: StudyRequest, active: Mapping[str, str] | None = None) -> PreparedStudy:
        return prepare_request(self.screener(active), self.source, request)


class _Handles(Protocol):
    """The staged app's calls to its deployments (``serving.rayserve.app.ServePipeline``)."""

    async def prepare_study(self, request: StudyRequest, active: Mapping[str, str] | None = None) -> PreparedStudy: ...

    async def infer(self, model_id: str, tensors: NDArray[np.float32]) -> ModelOutputs: ...

    async def version_info(self, ref: str) -> dict[str, object]: ...


class StagedVersionedPipeline(VersionedPipeline):
    """The versioned pipeline of the staged ingress: preparation on the fetcher, inference of
    every version (active and shadow) on its model's deployment."""

    def __init__(self, router: VersionRouter, handles: _Handles) -> None:
        super().__init__(router, None)
        self.handles = handles

    async def _prepare(self, active: dict[str, str], request: StudyRequest) -> PreparedStudy:
        return await self.handles.prepare_study(request, active)

    async def _run(self, ref: str, tensors: NDArray[np.float32]) -> ModelOutputs:
        return await self.handles.infer(ref, tensors)

    async def _info(self, ref: str) -> dict[str, object]:
        return await self.handles.version_info(ref)

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        super().bind_metrics(registry)
        bind = getattr(self.handles, "bind_metrics", None)
        if bind is not None:
            bind(registry)

    async def readiness(self) -> dict[str, str]:
        """The downstream deployments' checks, where the handles know them."""
        checks = getattr(self.handles, "readiness", None)
        return dict(await checks()) if checks is not None else {}


def build_staged_pipeline(settings: Settings, handles: _Handles) -> StagedVersionedPipeline:
    """The staged ingress's pipeline: active versions from the results database, per job."""
    return StagedVersionedPipeline(VersionRouter(settings, LifecycleStore(settings.results.target)), handles)
