"""The Ray Serve application: thin deployments around the plain classes, in two topologies.

    staged:  ingress (FastAPI, ScreeningService)
                 --> fetcher (StudySource + QA/routing + decode + preprocess)
                 --> model-<id> (OnnxPredictor per version, @serve.batch), one per model
    inline:  ingress alone: it runs the StudyScreener in its own worker threads

Both run model versions the same way (``serving.online.versions``): the active version of each
model read per job, shadows never delivered; staged sends each image to its model's deployment
with its ``id@version`` (``serving.rayserve.versions``).

``staged`` scales decode and inference apart and keeps a GPU fed (``configs/serve/gpu.yaml``).
On a CPU-only node decode and inference share the same cores and every handle call costs CPU and
time, so ``inline`` makes no call at all (ADR 0011 has the measurements). ``auto`` (the default,
``serve.topology`` in the settings) picks ``staged`` with a CUDA device, else ``inline``.

Composition uses ``.bind()`` and ``DeploymentHandle`` (no deprecated DAG API). Every application
knob comes from the settings (``AppArgs``); a Serve config file holds only Serve's own resource
knobs (replicas, CPUs, GPUs). Start it with ``serve run configs/serve/dev.yaml`` / ``serve deploy``,
or ``dxassist serve [--address ...]``.

Nothing is read twice on different nodes (ADR 0024): the process that builds the application
(``dxassist serve``, or the build task of ``serve deploy``) resolves the settings once (file and
``DXASSIST_*`` environment), pins every model to the exact version it resolves ``latest`` to,
with its manifest's and artifact's sha256, and binds that ``Settings`` object to every
deployment. A replica never reads a settings file or its own environment for settings; it
resolves relative paths against its own install, and refuses to start (``PinnedVersionMismatch``)
when its registry does not hold the pinned version byte for byte.

Under the staged topology the ingress also watches its application (``AppStatus``): ``/readyz``
reports the fetcher's and every model deployment's state, the in-flight limit follows the
running fetcher replicas, and a handle call whose replica died is sent again (``ServePipeline``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, ConfigDict, model_validator
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from models.errors import DxAssistError, ReplicaUnavailable
from models.predictor import OnnxPredictor
from models.registry import REGISTRY_ROOT, Pin, pin, resolve_pinned
from serving.core.screening import ModelOutputs
from serving.observability.phi import install_logging
from serving.online.api import LazyService, create_api
from serving.online.factory import build_local_pipeline, build_predictor, build_service, build_source
from serving.online.pipeline import (
    LocalPipeline,
    PreparedStudy,
    StudyRequest,
    model_status,
)
from serving.online.service import ScreeningService
from serving.online.versions import VersionedPipeline
from serving.rayserve.versions import VersionedModels, VersionedPreparer, build_staged_pipeline
from serving.settings import REPO_ROOT, ModelSettings, Settings

logger = logging.getLogger(__name__)


T = TypeVar("T")


class AppArgs(BaseModel):
    """Arguments of ``build_app`` (the ``args:`` of a Serve config file): where the settings are,
    or the settings themselves.

    ``settings_path``: a settings file, absolute or relative to the dxassist install (never to
    the working directory of whichever node builds the app), read with the ``DXASSIST_*``
    environment of the building process. ``settings``: the whole settings as a mapping, taken as
    they are (no environment override). Neither: ``DXASSIST_SETTINGS`` or the embedded default.
    Either way the result travels to every replica (module doc)."""

    model_config = ConfigDict(extra="forbid")
    settings_path: str | None = None
    settings: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> AppArgs:
        if self.settings_path is not None and self.settings is not None:
            raise ValueError("settings_path or settings, not both")
        return self

    def load(self) -> Settings:
        """The settings as the builder resolves them (relative paths kept: each node resolves
        them against its own install)."""
        if self.settings is not None:
            return Settings.from_mapping(self.settings)
        path = Path(self.settings_path) if self.settings_path else None
        if path is not None and not path.is_absolute():
            path = REPO_ROOT / path
        return Settings.load(path, resolve_paths=False)


def pin_models(settings: Settings, root: Path = REGISTRY_ROOT) -> Settings:
    """Every configured model named exactly: ``latest`` (or any version) resolved in ``root``,
    the artifact verified there, its version and digests written into the settings that travel.
    A model that already carries digests must still match them (``PinnedVersionMismatch``)."""
    pinned = []
    for m in settings.models:
        found = pin(m.id, m.version, root)
        if m.manifest_sha256 is not None or m.artifact_sha256 is not None:
            wanted = Pin(m.id, found.version, m.manifest_sha256 or "", m.artifact_sha256 or "")
            resolve_pinned(wanted, root)
        pinned.append(
            m.model_copy(
                update={
                    "version": found.version,
                    "manifest_sha256": found.manifest_sha256,
                    "artifact_sha256": found.artifact_sha256,
                }
            )
        )
    return settings.model_copy(update={"models": pinned})


def check_pins(models: Iterable[ModelSettings], root: Path | None = None) -> None:
    """Refuse (``PinnedVersionMismatch``) unless this node's registry holds every pinned model
    exactly as pinned. Unpinned models (no digests) are left to the registry as it is."""
    for m in models:
        if m.manifest_sha256 is not None and m.artifact_sha256 is not None:
            resolve_pinned(Pin(m.id, m.version, m.manifest_sha256, m.artifact_sha256), root or REGISTRY_ROOT)


def _replica_start(models: Iterable[ModelSettings]) -> None:
    """What every replica does first: PHI-safe logging, its Serve gRPC server bound to this
    node's address instead of every interface, and the pinned model versions checked here."""
    install_logging()
    _bind_replica_grpc_to_node()
    check_pins(models)


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


#: studies one fetcher replica prepares at once (a Serve config may change it per deployment)
FETCHER_MAX_ONGOING = 8


@serve.deployment(name="fetcher", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=FETCHER_MAX_ONGOING)
class StudyFetcher:
    """Reads a study from the store (or an upload spool) and returns model-ready tensors."""

    def __init__(self, settings: Settings) -> None:
        _replica_start(settings.models)
        settings = settings.resolved()
        self.source = build_source(settings)
        #: screeners (no session) for the versions the ingress names per job (serving.rayserve.versions)
        self.preparer = VersionedPreparer(settings, self.source)

    async def prepare(self, request: StudyRequest, active: Mapping[str, str] | None = None) -> PreparedStudy:
        """``active``: the version of each model for this job (``None``: the configured ones)."""
        return await asyncio.to_thread(self.preparer.prepare, request, active)


# Logical CPU reservations fit one 2-core machine (0.1 + 0.5 + 2 x 0.5): ORT sets its own
# threads; configs/serve/gpu.yaml reserves more on bigger nodes. Over-reserving leaves replicas
# unscheduled and the app DEPLOYING forever.
@serve.deployment(name="model", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=32, health_check_period_s=30)
class ModelDeployment:
    """One model, any of its versions: a verified ``OnnxPredictor`` per version behind ``@serve.batch``.

    Each request is one image's frames ``(F, C, H, W)`` and the ``id@version`` it is for (``None``:
    the configured version); a batch concatenates the frames of several requests (studies) of
    one version into one ORT call, run off the event loop so the next batch keeps filling while
    this one computes. Versions other than the configured one (shadow, promoted) open on their
    first request and stay (``serving.rayserve.versions``); the settings' shadows open at start.
    """

    def __init__(self, model: dict[str, Any], batch_size: int, batch_wait_s: float) -> None:
        settings = ModelSettings.model_validate(model)
        _replica_start([settings])
        self.predictor = build_predictor(settings, lone_runs=False)
        self.versions = VersionedModels(settings, self.predictor)
        for failed in self.versions.warm(settings.shadow):
            logger.warning("shadow version %s not loaded", failed)
        self.max_batch_images = batch_size
        self.infer_batch.set_max_batch_size(batch_size)
        self.infer_batch.set_batch_wait_timeout_s(batch_wait_s)
        _require_ready(self.versions.loaded(), "at start")  # warm-up before the replica reports healthy

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.max_batch_images = _apply_batch_config(self.infer_batch, user_config) or self.max_batch_images

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.0)
    async def infer_batch(
        self, items: list[tuple[str | None, NDArray[np.float32]]]
    ) -> list[ModelOutputs | DxAssistError]:
        return await asyncio.to_thread(self.versions.run_batch, items, self.max_batch_images)

    async def __call__(self, tensors: NDArray[np.float32], ref: str | None = None) -> ModelOutputs:
        result: ModelOutputs | DxAssistError = await self.infer_batch((ref, tensors))
        if isinstance(result, DxAssistError):
            raise result
        return result

    def info(self, ref: str | None = None) -> dict[str, object]:
        return model_status(self.versions.predictor(ref))

    def check_health(self) -> None:
        _require_ready(self.versions.loaded(), "in a health check")


#: what a handle call raises when its replica is gone (killed, crashed, its node lost or
#: unreachable: ``ActorDiedError``, ``ActorUnavailableError``); an error the replica's own code
#: raised arrives as that error (``RayTaskError``), never as this, and is not retried
REPLICA_LOST: tuple[type[BaseException], ...] = (RayActorError,)
#: the longest wait between two attempts of one call
MAX_RETRY_WAIT_S = 10.0


class ServePipeline:
    """``serving.online.service.Pipeline`` over deployment handles.

    Both stages are pure functions of their input (prepare a study, infer a tensor), so a call
    whose replica died is sent again through the same handle, which routes it to a live replica
    (Serve drops a dead one from its routing): up to ``retries`` more times, waiting
    ``backoff_s`` doubling (at most ``MAX_RETRY_WAIT_S``) in between; then ``ReplicaUnavailable``.
    """

    def __init__(
        self,
        fetcher: Any,
        models: Mapping[str, Any],
        *,
        retries: int = 0,
        backoff_s: float = 0.5,
        status: AppStatus | None = None,
    ) -> None:
        self.fetcher = fetcher
        self.models = dict(models)
        self.retries = retries
        self.backoff_s = backoff_s
        self.status = status
        #: calls sent again after their replica was lost, by deployment (tests, metrics)
        self.retried: dict[str, int] = {}
        self._retry_metric: Counter | None = None
        self._limit_metric: Gauge | None = None

    def bind_metrics(self, registry: CollectorRegistry) -> None:
        """Count the retried calls on the service's registry (``/metrics``)."""
        self._retry_metric = Counter(
            "dxassist_replica_retries",
            "Handle calls sent again because the replica that had them died or became unreachable",
            ["deployment"],
            registry=registry,
        )
        self._limit_metric = Gauge(
            "dxassist_inflight_limit",
            "Studies the ingress screens at once: follows the running fetcher replicas (or api.max_inflight)",
            registry=registry,
        )

    def limit_changed(self, limit: int) -> None:
        if self._limit_metric is not None:
            self._limit_metric.set(limit)

    async def _call(self, deployment: str, send: Callable[[], Awaitable[T]]) -> T:
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            try:
                return await send()
            except REPLICA_LOST as exc:
                if attempt == self.retries:
                    raise ReplicaUnavailable(
                        f"{deployment}: no replica answered in {attempt + 1} attempts ({type(exc).__name__})"
                    ) from None
                self.retried[deployment] = self.retried.get(deployment, 0) + 1
                if self._retry_metric is not None:
                    self._retry_metric.labels(deployment).inc()
                logger.warning(
                    "a %s replica was lost (%s); sending the call again (retry %d of %d)",
                    deployment,
                    type(exc).__name__,
                    attempt + 1,
                    self.retries,
                    extra={"stage": deployment},
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_WAIT_S)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def prepare_study(self, request: StudyRequest, active: Mapping[str, str] | None = None) -> PreparedStudy:
        """``active``: the version of each model for this job (``None``: the configured ones)."""
        versions = dict(active) if active is not None else None
        return await self._call("fetcher", lambda: self.fetcher.prepare.remote(request, versions))

    async def infer(self, model_id: str, tensors: NDArray[np.float32]) -> ModelOutputs:
        """``model_id``: a model id (its configured version) or ``id@version``, sent to that
        model's deployment either way."""
        base, _, version = model_id.partition("@")
        handle, ref = self.models[base], model_id if version else None
        return await self._call(f"model-{base}", lambda: handle.remote(tensors, ref))

    async def version_info(self, ref: str) -> dict[str, object]:
        """Status of one version on its model's deployment (opens it there if needed)."""
        handle = self.models[ref.partition("@")[0]]
        return await self._call(f"model-{ref.partition('@')[0]}", lambda: handle.info.remote(ref))

    async def model_info(self) -> list[dict[str, object]]:
        return list(await asyncio.gather(*(h.info.remote() for h in self.models.values())))

    async def readiness(self) -> dict[str, str]:
        """The downstream deployments' state, one check each (merged into ``/readyz``)."""
        return await self.status.checks() if self.status is not None else {}


def _serve_details() -> Mapping[str, Any]:
    """What ``serve status``/the dashboard know of every application: deployment status and
    config, each replica's state (the controller's instance details; blocking)."""
    from ray.serve.context import _get_global_client

    details: Mapping[str, Any] = _get_global_client().get_serve_details()
    return details


def _deployments(details: Mapping[str, Any], app: str) -> Mapping[str, Any]:
    found: Mapping[str, Any] = (details.get("applications") or {}).get(app, {}).get("deployments") or {}
    return found


def _running(deployment: Mapping[str, Any]) -> int:
    return sum(1 for r in deployment.get("replicas") or [] if r.get("state") == "RUNNING")


def deployment_checks(details: Mapping[str, Any], app: str, names: Iterable[str]) -> dict[str, str]:
    """One readiness check per deployment: ``ok`` while it has a running replica and Serve does
    not call it UNHEALTHY or DEPLOY_FAILED (what ``serve status`` says), else why not."""
    deployments = _deployments(details, app)
    checks: dict[str, str] = {}
    for name in names:
        d = deployments.get(name)
        key = f"deployment:{name}"
        if d is None:
            checks[key] = "not deployed"
            continue
        status, running = str(d.get("status")), _running(d)
        target = d.get("target_num_replicas", "?")
        if running == 0:
            checks[key] = f"no running replica ({status})"
        elif status in ("UNHEALTHY", "DEPLOY_FAILED"):
            checks[key] = f"{status}: {running} of {target} replicas running"
        else:
            checks[key] = "ok"
    return checks


def fetcher_capacity(details: Mapping[str, Any], app: str, name: str = "fetcher") -> int:
    """Studies the fetcher deployment prepares at once: running replicas x ``max_ongoing_requests``."""
    d = _deployments(details, app).get(name)
    if d is None:
        return 0
    per_replica = int((d.get("deployment_config") or {}).get("max_ongoing_requests") or FETCHER_MAX_ONGOING)
    return _running(d) * per_replica


class AppStatus:
    """What a staged ingress knows of its application, read from the Serve controller at most
    every ``interval_s``: the checks of its downstream deployments, and how many studies they
    take at once (``fetcher_capacity``). ``read`` defaults to the controller's instance details."""

    def __init__(
        self,
        app: str,
        downstream: list[str],
        interval_s: float,
        read: Callable[[], Mapping[str, Any]] = _serve_details,
    ) -> None:
        self.app = app
        self.downstream = downstream
        self.interval_s = interval_s
        self._read = read
        self._checks: dict[str, str] = {}
        self.capacity = 0
        self._at = -float("inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            try:
                details = await asyncio.to_thread(self._read)
            except Exception as exc:  # the controller is away: not ready, capacity as last seen
                self._checks = {"serve": f"application state unavailable ({type(exc).__name__})"}
            else:
                self._checks = deployment_checks(details, self.app, self.downstream)
                self.capacity = fetcher_capacity(details, self.app)
            self._at = time.monotonic()

    async def checks(self) -> dict[str, str]:
        if time.monotonic() - self._at >= self.interval_s:
            await self.refresh()
        return dict(self._checks)


def inflight_limit(capacity: int) -> int:
    """The ingress's in-flight limit for a downstream capacity: enough to keep every running
    fetcher slot busy, plus the slot the service keeps for stat."""
    return capacity + 1


async def follow_capacity(status: AppStatus, set_limit: Callable[[int], None]) -> None:
    """Every ``status.interval_s``: the in-flight limit follows the running fetcher replicas
    (never down to nothing while none runs: the limit seen last stays)."""
    while True:
        await status.refresh()
        if status.capacity > 0:
            set_limit(inflight_limit(status.capacity))
        await asyncio.sleep(status.interval_s)


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
        settings: Settings,
        inline: bool = False,
    ) -> None:
        """Staged: ``fetcher`` and ``models``; inline: neither. ``settings``: as the builder
        resolved them (module doc)."""
        _replica_start(settings.models)
        settings = settings.resolved()
        pipeline: ServePipeline | LocalPipeline | VersionedPipeline
        status: AppStatus | None = None
        if inline:
            pipeline = build_local_pipeline(settings)
        else:
            assert fetcher is not None
            status = AppStatus(
                serve.get_replica_context().app_name,
                ["fetcher", *(f"model-{m}" for m in models)],
                settings.serve.status_interval_s,
            )
            handles = ServePipeline(
                fetcher,
                models,
                retries=settings.serve.replica_retries,
                backoff_s=settings.serve.retry_backoff_s,
                status=status,
            )
            # every version on its model's deployment, the active ones read per job, shadows
            # never delivered (serving.rayserve.versions); it binds the handles' metrics
            pipeline = build_staged_pipeline(settings, handles)

        def service() -> ScreeningService:
            built = build_service(settings, pipeline)
            if isinstance(pipeline, ServePipeline):  # a versioned pipeline binds its handles' metrics itself
                pipeline.bind_metrics(built.metrics.registry)
            if status is not None:
                handles.limit_changed(built.settings.max_inflight)
                if settings.serve.follow_replicas:
                    built.periodic.append(lambda: follow_capacity(status, follow(built)))
            return built

        def follow(built: ScreeningService) -> Callable[[int], None]:
            def set_limit(limit: int) -> None:
                built.set_max_inflight(limit)
                handles.limit_changed(limit)

            return set_limit

        _install_service(LazyService(service))
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
    """Typed application builder (``import_path: serving.rayserve.app:build_app``): the settings
    resolved and the models pinned here, once, for every replica on every node."""
    return build_application(pin_models(args.load()))


def build_application(settings: Settings, options: Mapping[str, Mapping[str, Any]] | None = None) -> Any:
    """The bound application for resolved, pinned ``settings``; ``options``: Serve deployment
    options by deployment name (``num_replicas``, ``ray_actor_options``... as a Serve config
    file's ``deployments`` entries give them), applied over the defaults here."""
    options = options or {}

    def bind(deployment: Any, name: str, *init: Any, **defaults: Any) -> Any:
        chosen = {**defaults, **options.get(name, {})}
        return deployment.options(name=name, **chosen).bind(*init)

    topology = settings.serve.topology
    if topology == "auto":
        topology = _auto_topology()
    if topology == "inline":
        return bind(Ingress, "ingress", None, {}, settings, True, ray_actor_options={"num_cpus": 1.5})
    fetcher = bind(StudyFetcher, "fetcher", settings)
    models = {
        m.id: bind(
            ModelDeployment,
            f"model-{m.id}",
            m.model_dump(mode="json"),
            settings.screening.batch_size,
            settings.screening.batch_wait_s,
        )
        for m in settings.models
    }
    return bind(Ingress, "ingress", fetcher, models, settings)
