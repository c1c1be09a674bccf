"""Start the Serve application on a local Ray instance (for ``dxassist serve``/``demo``, the
integration test and the benchmark). A cluster deployment uses ``serve deploy`` instead.

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from serving.online.probe import wait_ready

logger = logging.getLogger(__name__)


def init_loopback_ray(**kwargs: Any) -> None:
    """``ray.init`` of a fresh single-node Ray whose every server binds 127.0.0.1 only."""
    import ray
    import ray._private.services as services

    original = services.resolve_ip_for_localhost
    services.resolve_ip_for_localhost = lambda host: host  # see module doc
    try:
        ray.init(
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
) -> Iterator[str]:
    """Run the app on a fresh local Ray; yields the base URL once ready; shuts everything down.
    ``tls`` (certificate and key PEM files): the Serve proxy speaks HTTPS. ``on_stop``: called on
    SIGTERM/SIGINT from the moment Ray is up (``ray.init`` installs its own handler, which aborts
    the process: a signal that came between Ray's start and readiness ended it with status -6)."""
    import ray
    from ray import serve

    from serving.rayserve.app import AppArgs, build_app

    env_vars: dict[str, Any] = dict(env or {})
    if api_token:
        env_vars["DXASSIST_API__TOKENS"] = api_token
    if topology != "auto":  # a settings override (the builder and every replica read the same)
        env_vars["DXASSIST_SERVE__TOPOLOGY"] = topology
    init_loopback_ray(num_cpus=num_cpus, runtime_env={"env_vars": env_vars})
    if on_stop is not None:
        signal.signal(signal.SIGTERM, lambda *_: on_stop())
        signal.signal(signal.SIGINT, lambda *_: on_stop())
    try:
        ssl = {"ssl_certfile": str(tls[0]), "ssl_keyfile": str(tls[1])} if tls else {}
        serve.start(http_options={"host": host, "port": port, **ssl})
        saved = {k: os.environ.get(k) for k in env_vars}
        os.environ.update({k: str(v) for k, v in env_vars.items()})
        try:
            app = build_app(AppArgs(settings_path=settings_path))
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
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
