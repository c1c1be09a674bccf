"""The single-node runtime: the HTTP API and the screening service in one process, on uvicorn.

One machine needs no cluster: the service screens in worker threads of this process (the same
``LocalPipeline`` the Ray Serve ingress runs inline), so a request makes no proxy hop and no
Ray object transfer, the process holds no Ray runtime in memory, and it is ready as soon as the
models have passed their self-test. Ray Serve (``serving.rayserve``) is for a GPU node or a
cluster (ADR 0016). Behaviour is the same on both: the same API, admission, durable jobs,
outbox and readiness.

Lifecycle: the service starts with the application (unfinished jobs resume at once). SIGTERM or
SIGINT first drains the service - admission closes at once (503 with Retry-After), running
screenings finish up to ``api.drain_timeout_s``, queued ones stay persisted - and only then
stops the HTTP server, so no client sees a dropped connection; a second signal stops at once.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

from fastapi import FastAPI

from serving.online.api import create_api
from serving.online.factory import build_local_pipeline, build_service
from serving.online.probe import wait_ready
from serving.online.service import ScreeningService
from serving.settings import Settings

logger = logging.getLogger(__name__)


def build_asgi_app(settings: Settings, started: dict[str, ScreeningService] | None = None) -> FastAPI:
    """The API with its service started in the application's lifespan (``started`` receives it)."""
    started = {} if started is None else started

    async def get_service() -> ScreeningService:
        service = started.get("service")
        if service is None:
            raise RuntimeError("the service is not started")
        return service

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        service = build_service(settings, build_local_pipeline(settings))
        await service.start()
        started["service"] = service
        try:
            yield
        finally:
            await service.drain(settings.api.drain_timeout_s)
            service.close()

    api = create_api(get_service)
    api.router.lifespan_context = lifespan
    return api


def run(settings: Settings, *, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT (uvloop and httptools when installed)."""
    import asyncio

    import uvicorn

    started: dict[str, ScreeningService] = {}

    class DrainingServer(uvicorn.Server):
        """Drains the service before uvicorn's own graceful shutdown."""

        draining = False

        def handle_exit(self, sig: int, frame: object) -> None:
            service = started.get("service")
            if self.draining or service is None:
                super().handle_exit(sig, frame)  # type: ignore[arg-type]
                return
            self.draining = True
            logger.info("stopping: admission closed, draining running screenings")

            async def drain_then_exit() -> None:
                finished = await service.drain(settings.api.drain_timeout_s)
                logger.info("drained" if finished else "drain timed out: unfinished screenings resume at next start")
                self.should_exit = True

            asyncio.get_running_loop().create_task(drain_then_exit())

    config = uvicorn.Config(
        build_asgi_app(settings, started),
        host=host,
        port=port,
        loop="auto",
        http="auto",
        access_log=False,  # access lines carry paths and client addresses, never needed here
        log_level="warning",
        timeout_graceful_shutdown=int(settings.api.drain_timeout_s),
        lifespan="on",
        ssl_certfile=str(settings.api.tls_certfile) if settings.api.tls_certfile else None,
        ssl_keyfile=str(settings.api.tls_keyfile) if settings.api.tls_keyfile else None,
    )
    DrainingServer(config).run()


@contextmanager
def local_asgi(settings: Settings, *, host: str = "127.0.0.1", port: int) -> Iterator[str]:
    """Run the single-node service in a background thread of this process (the demo, tests);
    yields the base URL once ready, then drains and stops it."""
    import threading

    import uvicorn

    started: dict[str, ScreeningService] = {}
    config = uvicorn.Config(
        build_asgi_app(settings, started), host=host, port=port, access_log=False, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="dxassist-asgi", daemon=True)
    thread.start()
    base = f"http://{host}:{port}"
    try:
        wait_ready(base)
        yield base
    finally:
        server.should_exit = True  # uvicorn's shutdown runs the lifespan exit: the service drains
        thread.join(timeout=settings.api.drain_timeout_s + 30)
