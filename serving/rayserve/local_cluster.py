"""Start the Serve application on a local Ray instance (for ``dxassist serve``/``demo``, the
integration test and the benchmark). A cluster deployment uses ``serve deploy`` instead."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

logger = logging.getLogger(__name__)


def wait_ready(base_url: str, timeout_s: float = 180.0) -> None:
    """Poll ``/readyz`` until the models have loaded and passed their self-test."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{base_url}/readyz", timeout=5.0)
            if response.status_code == 200:
                return
            last = str(response.status_code)
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise TimeoutError(
        f"service not ready after {timeout_s:.0f} s (last: {last}); check `serve status`: a replica that "
        "cannot be scheduled (CPU/GPU reservations above the machine) keeps the app DEPLOYING"
    )


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
) -> Iterator[str]:
    """Run the app on a fresh local Ray; yields the base URL once ready; shuts everything down."""
    import ray
    from ray import serve

    from serving.rayserve.app import AppArgs, build_app

    env_vars: dict[str, Any] = dict(env or {})
    if api_token:
        env_vars["DXASSIST_API__TOKENS"] = api_token
    if topology != "auto":  # a settings override (the builder and every replica read the same)
        env_vars["DXASSIST_SERVE__TOPOLOGY"] = topology
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        runtime_env={"env_vars": env_vars},
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    try:
        serve.start(http_options={"host": host, "port": port})
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
        base = f"http://{host}:{port}"
        wait_ready(base)
        yield base
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
