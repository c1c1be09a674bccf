"""The Ray Serve application: thin deployments around the plain classes.

    ingress (FastAPI, ScreeningService) --> fetcher (StudySource + QA/routing + decode + preprocess)
                                        --> model-<id> (OnnxPredictor, @serve.batch), one per model

Composition uses ``.bind()`` and ``DeploymentHandle`` (no deprecated DAG API). Start it with
``serve run configs/serve/dev.yaml`` / ``serve deploy``, or ``dxassist serve``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.handle import DeploymentHandle

from models.registry import resolve
from serving.api import LazyService, create_api
from serving.factory import build_predictor, build_sinks, build_source
from serving.phi import install_logging
from serving.results_store import ResultsStore
from serving.screening import ModelOutputs, StudyScreener, run_model
from serving.service import PreparedStudy, ScreeningService, StudyRequest, prepare_request
from serving.settings import ModelSettings, Settings
from serving.sources.dicomweb import DicomWebSource

logger = logging.getLogger(__name__)


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args:`` of a Serve config file)."""

    model_config = ConfigDict(extra="forbid")
    settings_path: str | None = None


def _screener_without_sessions(settings: Settings) -> StudyScreener:
    return StudyScreener(
        [],
        manifests=[resolve(m.id, m.version) for m in settings.models],
        study_ref_key=settings.security.study_ref_key.get_secret_value().encode(),
        max_frames_per_image=settings.screening.max_frames_per_image,
        batch_size=settings.screening.batch_size,
    )


@serve.deployment(name="fetcher", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8)
class StudyFetcher:
    """Reads a study from the store (or an upload spool) and returns model-ready tensors."""

    def __init__(self, settings_path: str | None) -> None:
        install_logging()
        settings = Settings.load(settings_path)
        self.screener = _screener_without_sessions(settings)
        self.source = build_source(settings)

    async def prepare(self, request: StudyRequest) -> PreparedStudy:
        return await asyncio.to_thread(prepare_request, self.screener, self.source, request)


# Logical CPU reservations fit one 2-core machine (0.1 + 0.5 + 2 x 0.5): ORT sets its own
# threads; configs/serve/gpu.yaml reserves more on bigger nodes. Over-reserving leaves replicas
# unscheduled and the app DEPLOYING forever.
@serve.deployment(name="model", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32, health_check_period_s=30)
class ModelDeployment:
    """One model: a verified ``OnnxPredictor`` behind ``@serve.batch``.

    Each request is one image's frames ``(F, C, H, W)``; a batch concatenates the frames of
    several requests (studies) into one ORT call, run off the event loop so the next batch keeps
    filling while this one computes.
    """

    def __init__(self, model: dict[str, Any], batch_size: int = 4) -> None:
        install_logging()
        self.predictor = build_predictor(ModelSettings.model_validate(model))
        self.max_batch_images = batch_size
        warm = self.predictor.self_test()  # warm-up before the replica reports healthy
        if not warm.ok:
            raise RuntimeError(f"{self.predictor.manifest.ref}: self-test failed at start")

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Operational knobs only (thresholds live in the manifest)."""
        if "max_batch_size" in user_config:
            self.infer_batch.set_max_batch_size(int(user_config["max_batch_size"]))
            self.max_batch_images = int(user_config["max_batch_size"])
        if "batch_wait_timeout_s" in user_config:
            self.infer_batch.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.005)
    async def infer_batch(self, items: list[NDArray[np.float32]]) -> list[ModelOutputs]:
        sizes = [len(t) for t in items]
        joined = np.concatenate(items) if len(items) > 1 else items[0]
        out = await asyncio.to_thread(run_model, self.predictor, joined, max(self.max_batch_images, len(joined)))
        results, start = [], 0
        for n in sizes:
            results.append(
                ModelOutputs(
                    scores=out.scores[start : start + n],
                    maps=None if out.maps is None else out.maps[start : start + n],
                    map_role=out.map_role,
                    batch_size=len(joined),
                )
            )
            start += n
        return results

    async def __call__(self, tensors: NDArray[np.float32]) -> ModelOutputs:
        result: ModelOutputs = await self.infer_batch(tensors)
        return result

    def info(self) -> dict[str, object]:
        test = self.predictor.self_test()
        m = self.predictor.manifest
        return {"model": m.id, "version": m.version, "provider": self.predictor.provider, "ready": test.ok}

    def check_health(self) -> None:
        if not self.predictor.self_test().ok:
            raise RuntimeError(f"{self.predictor.manifest.ref}: self-test failed")


class ServePipeline:
    """``serving.service.Pipeline`` over deployment handles."""

    def __init__(self, fetcher: DeploymentHandle, models: dict[str, DeploymentHandle]) -> None:
        self.fetcher = fetcher
        self.models = models

    async def prepare_study(self, request: StudyRequest) -> PreparedStudy:
        result: PreparedStudy = await self.fetcher.prepare.remote(request)
        return result

    async def infer(self, model_id: str, tensors: NDArray[np.float32]) -> ModelOutputs:
        result: ModelOutputs = await self.models[model_id].remote(tensors)
        return result

    async def model_info(self) -> list[dict[str, object]]:
        return list(await asyncio.gather(*(h.info.remote() for h in self.models.values())))


_service: dict[str, LazyService] = {}


# The class that @serve.ingress builds is pickled by value (it is created at import time), so its
# methods would write into a pickled copy of ``_service``. Module-level functions travel by
# reference: every access to the replica's service goes through these three.
def _install_service(lazy: LazyService) -> None:
    _service["lazy"] = lazy


def _current_service() -> LazyService | None:
    return _service.get("lazy")


async def _get_service() -> ScreeningService:
    lazy = _current_service()
    if lazy is None:
        raise RuntimeError("ingress not initialised")
    return await lazy()


fastapi_app = create_api(_get_service)


@serve.deployment(
    name="ingress", ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=256, graceful_shutdown_timeout_s=60
)
@serve.ingress(fastapi_app)
class Ingress:
    """HTTP API + admission/priority/persistence; holds no model session."""

    def __init__(
        self, fetcher: DeploymentHandle, models: dict[str, DeploymentHandle], settings_path: str | None
    ) -> None:
        install_logging()
        settings = Settings.load(settings_path)
        store = ResultsStore(settings.results.target)
        pipeline = ServePipeline(fetcher, models)
        screener = _screener_without_sessions(settings)
        source = build_source(settings)
        poll_source = source if isinstance(source, DicomWebSource) else None
        _install_service(
            LazyService(
                lambda: ScreeningService(
                    pipeline,
                    screener,
                    store,
                    settings.api,
                    sinks=build_sinks(settings),
                    scp=settings.scp,
                    poller=settings.poller,
                    poll_source=poll_source,
                )
            )
        )

    async def check_health(self) -> None:
        lazy = _current_service()
        if lazy is not None and lazy.started is not None and lazy.started.dispatcher_failed():
            raise RuntimeError("dispatcher stopped")

    async def __del__(self) -> None:
        lazy = _current_service()
        if lazy is not None and lazy.started is not None:
            await lazy.started.drain(timeout_s=50)
            lazy.started.close()


def build_app(args: dict[str, Any]) -> Any:
    """Typed application builder (``import_path: serving.app:build_app``)."""
    parsed = AppArgs.model_validate(args)
    settings = Settings.load(parsed.settings_path)
    fetcher = StudyFetcher.bind(parsed.settings_path)  # type: ignore[attr-defined]  # Serve decorator
    models = {
        m.id: ModelDeployment.options(name=f"model-{m.id}").bind(  # type: ignore[attr-defined]
            m.model_dump(mode="json"), settings.screening.batch_size
        )
        for m in settings.models
    }
    return Ingress.bind(fetcher, models, parsed.settings_path)  # type: ignore[attr-defined]
