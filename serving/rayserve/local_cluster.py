"""Start the Serve application on a local Ray instance (for ``dxassist serve``/``demo``, the
integration test and the benchmark), or deploy it onto a running Ray cluster
(``dxassist serve --address``: ``deploy_to_cluster``).

Either way this process is the driver: it resolves the settings (file and ``DXASSIST_*``
environment) and pins the models once, and the replicas get that result (``serving.rayserve.app``),
whatever their own node's environment or files say.

The local Ray is one node bound to loopback: its GCS, raylet, object manager, workers, agents
and metrics exporters listen on 127.0.0.1 only, and no dashboard runs. Ray 2.60's ``ray.init``
rewrites a loopback ``_node_ip_address`` to the host's routable address
(``resolve_ip_for_localhost``), after which its servers listen on every interface; for the
duration of the call that rewrite is turned off (``loopback_ray``). The test suite lists the
started cluster's listening sockets and fails on any non-loopback one.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.online.probe import wait_ready
from serving.settings import Settings

logger = logging.getLogger(__name__)


def init_loopback_ray(**kwargs: Any) -> None:
    """``ray.init`` of a fresh single-node Ray whose every server binds 127.0.0.1 only."""
    import ray
    import ray._private.services as services

    original = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host  # see module doc
    try:
        ray.init(
            address="local",  # never join a cluster `ray start` left on this host (ray.init's default does)
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            **kwargs,
        )
    finally:
        services.resolve_ip_for_localhost = original
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":
        ray.shutdown()
        raise RuntimeError("the local Ray did not bind loopback; refusing to serve on an exposed node")


@contextmanager
def _environ(overrides: Mapping[str, Any]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update({k: str(v) for k, v in overrides.items()})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def driver_settings(settings_path: str | Path | None, env: Mapping[str, Any] | None = None) -> Settings:
    """The settings every replica will run with, resolved in this process: the file (a relative
    path is this process's working directory's), this process's ``DXASSIST_*`` environment with
    ``env`` over it, every model pinned to an exact version and digests in this process's
    registry (``DXASSIST_REGISTRY`` of ``env`` when it names one)."""
    from models.registry import REGISTRY_ROOT
    from serving.rayserve.app import AppArgs, pin_models

    env = dict(env or {})
    path = str(Path(settings_path).resolve()) if settings_path else None
    with _environ(env):
        settings = AppArgs(settings_path=path).load()
    root = Path(env["DXASSIST_REGISTRY"]) if env.get("DXASSIST_REGISTRY") else REGISTRY_ROOT
    return pin_models(settings, root)


@dataclass(frozen=True)
class ServeConfig:
    """What ``dxassist serve --address`` takes from a Serve config file (``configs/serve/*.yaml``):
    the HTTP options, the first application's name, route prefix and settings path, and its
    deployments' options by name (replicas, CPUs, GPUs...)."""

    http_options: dict[str, Any]
    proxy_location: str | None
    name: str
    route_prefix: str
    settings_path: str | None
    deployments: dict[str, dict[str, Any]]


def read_serve_config(path: Path) -> ServeConfig:
    """Parse and validate a Serve config file with Ray's own schema."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    if len(schema.applications) != 1:
        raise ValueError(f"{path}: one application expected, found {len(schema.applications)}")
    app = schema.applications[0]
    options = {
        d.name: {k: v for k, v in d.model_dump(exclude_unset=True).items() if k != "name"} for d in app.deployments
    }
    args = dict(app.args or {})
    proxy = schema.proxy_location
    return ServeConfig(
        http_options=schema.http_options.model_dump(exclude_unset=True) if schema.http_options else {},
        proxy_location=str(getattr(proxy, "value", proxy)) if proxy is not None else None,
        name=app.name,
        route_prefix=app.route_prefix or "/",
        settings_path=args.get("settings_path"),
        deployments=options,
    )


def deploy_to_cluster(address: str, settings: Settings, config: ServeConfig | None = None) -> None:
    """Join the running Ray cluster at ``address`` (``ray://head:10001`` or the GCS ``host:port``)
    as a driver, start Serve there if it is not running (with the config's HTTP options), deploy
    the application built from ``settings`` (resolved and pinned here) with the config's
    deployment options, wait until it is running, and leave: the application stays up on the
    cluster (the Serve controller is detached) until ``serve delete``/``serve shutdown``."""
    import ray
    from ray import serve

    from serving.rayserve.app import build_application

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    try:
        start: dict[str, Any] = {"http_options": config.http_options} if config else {}
        if config is not None and config.proxy_location:
            start["proxy_location"] = config.proxy_location
        serve.start(**start)
        app = build_application(settings, config.deployments if config else None)
        serve.run(app, name=config.name if config else "dxassist", route_prefix=config.route_prefix if config else "/")
    finally:
        ray.shutdown()


def drain_app(timeout_s: float, app_name: str = "dxassist") -> bool:
    """Ask the running app's ingress to stop admitting (503 + Retry-After from then on) and
    wait up to ``timeout_s`` for its running screenings; True when none was left running."""
    from ray import serve

    handle = serve.get_app_handle(app_name)
    finished: bool = handle.drain.remote(timeout_s).result(timeout_s=timeout_s + 30)
    return finished


@contextmanager
def local_serve(
    settings_path: str | None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: int | None = None,
    api_token: str | None = None,
    env: dict[str, str] | None = None,
    topology: str = "auto",
    tls: tuple[Path, Path] | None = None,
    on_stop: Callable[[], None] | None = None,
    deployments: Mapping[str, Mapping[str, Any]] | None = None,
) -> Iterator[str]:
    """Run the app on a fresh local Ray; yields the base URL once ready; shuts everything down.
    ``tls`` (certificate and key PEM files): the Serve proxy speaks HTTPS. ``on_stop``: called on
    SIGTERM/SIGINT from the moment Ray is up (``ray.init`` installs its own handler, which aborts
    the process: a signal that came between Ray's start and readiness ended it with status -6).
    ``deployments``: Serve options by deployment name (replicas, CPUs), as a Serve config gives them."""
    import ray
    from ray import serve

    from serving.rayserve.app import build_application

    env_vars: dict[str, Any] = dict(env or {})
    overrides: dict[str, str] = {}  # settings for this run: resolved here, never put in the replicas' environment
    if api_token:
        overrides["DXASSIST_API__TOKENS"] = api_token
    if topology != "auto":
        overrides["DXASSIST_SERVE__TOPOLOGY"] = topology
    # ``env``: the replicas' processes get it too (e.g. DXASSIST_REGISTRY); settings they take from here
    init_loopback_ray(num_cpus=num_cpus, runtime_env={"env_vars": env_vars})
    if on_stop is not None:
        signal.signal(signal.SIGTERM, lambda *_: on_stop())
        signal.signal(signal.SIGINT, lambda *_: on_stop())
    try:
        ssl = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
        serve.start(http_options={"host": host, "port": port, **ssl})
        app = build_application(driver_settings(settings_path, {**env_vars, **overrides}), deployments)
        serve.run(app, name="dxassist", route_prefix="/")
        base = f"{'https' if tls else 'http'}://{host}:{port}"
        wait_ready(
            base,
            verify=tls is None,
            hint="; check `serve status`: a replica that cannot be scheduled (CPU/GPU reservations above "
            "the machine) keeps the app DEPLOYING",
        )
        yield base
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
