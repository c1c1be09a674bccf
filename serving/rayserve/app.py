"""The Ray Serve application: thin deployments around the plain classes, in two topologies.

    staged:  ingress (FastAPI, ScreeningService)
                 --> fetcher (StudySource + QA/routing + decode + preprocess)
                 --> model-<id> (OnnxPredictor, @serve.batch), one per model
    inline:  ingress alone: it runs the StudyScreener in its own worker threads

``staged`` scales decode and inference apart and keeps a GPU fed (``configs/serve/gpu.yaml``).
On a CPU-only node decode and inference share the same cores and every handle call costs CPU and
time, so ``inline`` makes no call at all (ADR 0011 has the measurements). ``auto`` (the default,
``serve.topology`` in the settings) picks ``staged`` with a CUDA device, else ``inline``.

Composition uses ``.bind()`` and ``DeploymentHandle`` (no deprecated DAG API). Every application
knob comes from the settings file named by ``AppArgs.settings_path``; a Serve config file holds
only Serve's own resource knobs (replicas, CPUs, GPUs). Start it with
``serve run configs/serve/dev.yaml`` / ``serve deploy``, or ``dxassist serve``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict
from ray import serve
from ray.serve.handle import DeploymentHandle

from models.predictor import OnnxPredictor
from serving.core.screening import ModelOutputs, run_model
from serving.observability.phi import install_logging
from serving.online.api import LazyService, create_api
from serving.online.factory import build_local_pipeline, build_predictor, build_screener, build_service, build_source
from serving.online.pipeline import (
    LocalPipeline,
    PreparedStudy,
    StudyRequest,
    model_status,
    prepare_request,
)
from serving.online.service import ScreeningService
from serving.online.versions import VersionedPipeline
from serving.settings import ModelSettings, Settings

logger = logging.getLogger(__name__)


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args:`` of a Serve config file): only where the settings are."""

    model_config = ConfigDict(extra="forbid")
    settings_path: str | None = None


def _replica_start() -> None:
    """What every replica does first: PHI-safe logging, and its Serve gRPC server bound to
    this node's address instead of every interface."""
    install_logging()
    _bind_replica_grpc_to_node()


def _bind_replica_grpc_to_node() -> None:
    """Ray Serve 2.60 starts each replica's inter-deployment gRPC server on ``[::]:0`` (every
    interface) right after the constructor returns; rewrite that address to this node's own
    (127.0.0.1 on the loopback-bound local Ray, the private address on a cluster), where the
    other replicas reach it. A Ray without that hook is left as it is (the fault suite's
    socket check would say so)."""
    import ray
    from ray.serve._private import replica as replica_module

    original = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "dxassist_bound", False):
        return
    node_ip = ray.util.get_node_ip_address()
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def bound(server: Any, address: str) -> Any:
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    bound.dxassist_bound = True  # type: ignore[attr-defined]
    replica_module.add_port_to_grpc_server = bound


def _apply_batch_config(batched: Any, user_config: dict[str, Any]) -> int | None:
    """Apply the operational batching knobs of ``user_config`` to a ``@serve.batch`` method;
    returns the new max batch size, if given (thresholds never come this way: ADR 0003)."""
    if "batch_wait_timeout_s" in user_config:
        batched.set_batch_wait_timeout_s(float(user_config["batch_wait_timeout_s"]))
    if "max_batch_size" in user_config:
        size = int(user_config["max_batch_size"])
        batched.set_max_batch_size(size)
        return size
    return None


def _require_ready(predictors: list[OnnxPredictor], when: str) -> None:
    """Raise unless every model's self-test passes (warm-up at start, Serve health checks)."""
    for predictor in predictors:
        if not predictor.self_test().ok:
            raise RuntimeError(f"{predictor.manifest.ref}: self-test failed {when}")


@serve.deployment(name="fetcher", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=8)
class StudyFetcher:
    """Reads a study from the store (or an upload spool) and returns model-ready tensors."""

    def __init__(self, settings_path: str | None) -> None:
        _replica_start()
        settings = Settings.load(settings_path)
        self.screener = build_screener(settings, sessions=False)
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

    def __init__(self, model: dict[str, Any], batch_size: int, batch_wait_s: float) -> None:
        _replica_start()
        self.predictor = build_predictor(ModelSettings.model_validate(model))
        self.max_batch_images = batch_size
        self.infer_batch.set_max_batch_size(batch_size)
        self.infer_batch.set_batch_wait_timeout_s(batch_wait_s)
        _require_ready([self.predictor], "at start")  # warm-up before the replica reports healthy

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.max_batch_images = _apply_batch_config(self.infer_batch, user_config) or self.max_batch_images

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.0)
    async def infer_batch(self, items: list[NDArray[np.float32]]) -> list[ModelOutputs]:
        return await asyncio.to_thread(_run_joined, self.predictor, items, self.max_batch_images)

    async def __call__(self, tensors: NDArray[np.float32]) -> ModelOutputs:
        result: ModelOutputs = await self.infer_batch(tensors)
        return result

    def info(self) -> dict[str, object]:
        return model_status(self.predictor)

    def check_health(self) -> None:
        _require_ready([self.predictor], "in a health check")


def _run_joined(predictor: OnnxPredictor, items: list[NDArray[np.float32]], batch_size: int) -> list[ModelOutputs]:
    """One ORT pass over several images' frames, split back per image."""
    sizes = [len(t) for t in items]
    joined = np.concatenate(items) if len(items) > 1 else items[0]
    out = run_model(predictor, joined, max(batch_size, len(joined)))
    results, start = [], 0
    for n in sizes:
        results.append(out.rows(start, n, batch_size=len(joined)))
        start += n
    return results


class ServePipeline:
    """``serving.online.service.Pipeline`` over deployment handles."""

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
    """HTTP API + admission/priority/persistence; holds no model session (staged) or screens in
    its own threads (inline).

    The service starts in the constructor, not at the first request: jobs a previous replica
    left unfinished resume at once, and the replica reports healthy only once started.
    ``drain`` (called by ``dxassist serve`` on SIGTERM) stops admission and waits for running
    work; ``__del__`` (Serve's shutdown) does the same if nobody asked before."""

    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor (serve.ingress)
        self,
        fetcher: DeploymentHandle | None,
        models: dict[str, DeploymentHandle],
        settings_path: str | None,
        inline: bool = False,
    ) -> None:
        """Staged: ``fetcher`` and ``models``; inline: neither."""
        _replica_start()
        settings = Settings.load(settings_path)
        pipeline: ServePipeline | LocalPipeline | VersionedPipeline
        if inline:
            pipeline = build_local_pipeline(settings)
        else:
            assert fetcher is not None
            pipeline = ServePipeline(fetcher, models)
        _install_service(LazyService(lambda: build_service(settings, pipeline)))
        if not settings.api.tokens:
            logger.warning(
                "DEV MODE: no API tokens configured; the API answers loopback clients only. "
                "Set DXASSIST_API__TOKENS before exposing it."
            )
        await _get_service()  # eager start: resume unfinished jobs now

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Stop admitting (503 + Retry-After from now on) and wait for the running screenings
        up to ``timeout_s`` (default ``api.drain_timeout_s``); True when none was left running."""
        lazy = _current_service()
        if lazy is None or lazy.started is None:
            return True
        service = lazy.started
        return await service.drain(service.settings.drain_timeout_s if timeout_s is None else timeout_s)

    async def check_health(self) -> None:
        lazy = _current_service()
        if lazy is not None and lazy.started is not None and lazy.started.dispatcher_failed():
            raise RuntimeError("dispatcher stopped")

    async def __del__(self) -> None:
        lazy = _current_service()
        if lazy is not None and lazy.started is not None:
            await lazy.started.drain(timeout_s=lazy.started.settings.drain_timeout_s)
            lazy.started.close()


def _auto_topology() -> Literal["staged", "inline"]:
    """staged with a GPU, inline on CPU (ADR 0011)."""
    from models.predictor import cuda_device_count

    return "staged" if cuda_device_count() > 0 else "inline"


def build_app(args: AppArgs) -> Any:
    """Typed application builder (``import_path: serving.rayserve.app:build_app``)."""
    settings = Settings.load(args.settings_path)
    topology = settings.serve.topology
    if topology == "auto":
        topology = _auto_topology()
    if topology == "inline":
        return Ingress.options(ray_actor_options={"num_cpus": 1.5}).bind(  # type: ignore[attr-defined]
            None, {}, args.settings_path, True
        )
    fetcher = StudyFetcher.bind(args.settings_path)  # type: ignore[attr-defined]  # Serve decorator
    models = {
        m.id: ModelDeployment.options(name=f"model-{m.id}").bind(  # type: ignore[attr-defined]
            m.model_dump(mode="json"), settings.screening.batch_size, settings.screening.batch_wait_s
        )
        for m in settings.models
    }
    return Ingress.bind(fetcher, models, args.settings_path)  # type: ignore[attr-defined]
