"""The staged Serve ingress's plain classes under the real service and API, without Ray: the
handles are stand-ins over the in-process pipeline (the same calls a ``DeploymentHandle`` takes),
so a replica's death, the application's state and its replica counts can be set by the test.
``test_serve_app.py`` runs the same paths on a real local Ray Serve."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi.testclient import TestClient
from numpy.typing import NDArray
from ray.exceptions import ActorDiedError

from models.predictor import OnnxPredictor
from serving.core.screening import StudyScreener
from serving.dicom.sources.local import LocalFolderSource
from serving.online.api import LazyService, create_api
from serving.online.pipeline import LocalPipeline, StudyRequest
from serving.online.service import ScreeningService
from serving.persistence.results import ResultsStore
from serving.rayserve.app import AppStatus, ServePipeline, follow_capacity
from serving.settings import ApiSettings
from tests.conftest import write_synthetic_cxr
from tests.serving.test_api import uid_of, wait_for


class _FetcherHandle:
    """``fetcher``: ``prepare.remote(request, versions)``; the first ``die`` calls fail as if the
    replica holding them had been killed; each call waits for ``gate`` when one is set."""

    def __init__(self, local: LocalPipeline, die: int = 0) -> None:
        self.local = local
        self.die = die
        self.gate: asyncio.Event | None = None
        self.running = 0
        self.most = 0
        self.prepare = self

    def remote(self, request: StudyRequest, versions: Any = None) -> Any:
        async def call() -> Any:
            if self.die > 0:
                self.die -= 1
                await asyncio.sleep(0.01)  # in flight, then the replica is gone
                raise ActorDiedError()
            self.running += 1
            self.most = max(self.most, self.running)
            try:
                if self.gate is not None:
                    await self.gate.wait()
                return await self.local.prepare_study(request)
            finally:
                self.running -= 1

        return call()


class _ModelHandle:
    def __init__(self, local: LocalPipeline, model_id: str) -> None:
        self.local = local
        self.model_id = model_id

    def remote(self, tensors: NDArray[np.float32], ref: str | None = None) -> Any:
        return self.local.infer(self.model_id, tensors)

    @property
    def info(self) -> Any:
        local = self.local

        class _Info:
            def remote(self, ref: str | None = None) -> Any:
                async def call() -> dict[str, object]:
                    return (await local.model_info())[0]

                return call()

        return _Info()


def _details(fetchers: int, per_replica: int, model_status: str = "HEALTHY") -> dict[str, Any]:
    def deployment(status: str, n: int, config: dict[str, Any]) -> dict[str, Any]:
        return {"status": status, "deployment_config": config, "replicas": [{"state": "RUNNING"}] * n}

    return {
        "applications": {
            "dxassist": {
                "deployments": {
                    "fetcher": deployment("HEALTHY", fetchers, {"max_ongoing_requests": per_replica}),
                    "model-tiny-test": deployment(model_status, 1, {}),
                }
            }
        }
    }


@contextmanager
def staged_ingress(
    tmp_path: Path, predictor: OnnxPredictor, store: Path, details: list[dict[str, Any]], *, die: int = 0, **api: Any
) -> Iterator[tuple[TestClient, _FetcherHandle, ServePipeline]]:
    """The service over a ``ServePipeline`` as the staged ingress builds it (retries, status, the
    in-flight limit following the fetchers), behind the real API."""
    screener = StudyScreener([predictor], study_ref_key=b"k")
    local = LocalPipeline(screener, LocalFolderSource(store))
    fetcher = _FetcherHandle(local, die=die)
    status = AppStatus("dxassist", ["fetcher", "model-tiny-test"], 0.01, read=lambda: details[0])
    handles = ServePipeline(
        fetcher, {"tiny-test": _ModelHandle(local, "tiny-test")}, retries=3, backoff_s=0.01, status=status
    )

    def factory() -> ScreeningService:
        service = ScreeningService(
            handles,
            screener,
            ResultsStore(tmp_path / "results.sqlite3"),
            ApiSettings(spool_dir=tmp_path / "spool", **api),
        )
        handles.bind_metrics(service.metrics.registry)
        service.periodic.append(lambda: follow_capacity(status, service.set_max_inflight))
        return service

    lazy = LazyService(factory)
    with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:
        client.get("/readyz")  # starts the service
        yield client, fetcher, handles
        if lazy.started is not None:
            if fetcher.gate is not None:
                client.portal.call(fetcher.gate.set)  # type: ignore[union-attr]
            client.portal.call(lazy.started.drain, 5.0)  # type: ignore[union-attr]


def test_a_study_whose_fetcher_replica_died_is_screened_by_another(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Finding: a study running on a killed node ended FAILED for good (ActorUnavailableError)."""
    with staged_ingress(tmp_path, predictor, store_dir, [_details(1, 8)], die=2) as (client, _, handles):
        job = client.post("/v1/screenings", json={"study_instance_uid": uid_of(store_dir / "s41.dcm")}).json()
        body = wait_for(client, job["screening_id"])
        assert body["status"] == "DONE" and body["result"]["outcome"] == "SCREENED"
        assert handles.retried == {"fetcher": 2}
        assert 'dxassist_replica_retries_total{deployment="fetcher"} 2.0' in client.get("/metrics").text


def test_readyz_says_not_ready_while_a_model_deployment_is_unhealthy(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Finding: `serve status` said UNHEALTHY while /readyz said ready."""
    details = [_details(1, 8)]
    with staged_ingress(tmp_path, predictor, store_dir, details) as (client, _, _):
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"]["deployment:model-tiny-test"] == "ok"
        details[0] = _details(1, 8, model_status="UNHEALTHY")
        deadline = time.monotonic() + 10
        while (answer := client.get("/readyz")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert answer.status_code == 503
        assert answer.json()["checks"]["deployment:model-tiny-test"] == "UNHEALTHY: 1 of ? replicas running"


def test_studies_in_flight_grow_with_the_fetcher_replicas(tmp_path: Path, predictor: OnnxPredictor) -> None:
    """Finding: one ingress never had more than 3 studies in flight, whatever the number of
    screener replicas. Here one fetcher replica of 2 slots, then 3 of them: the ingress
    admits 2 + 1 (stat), then 6 + 1 studies at once; routine work fills all but the stat slot."""
    store = tmp_path / "store"
    uids = [uid_of(write_synthetic_cxr(store / f"s{seed}.dcm", seed=seed)) for seed in range(100, 110)]
    details = [_details(1, 2)]
    with staged_ingress(tmp_path, predictor, store, details) as (client, fetcher, _):
        fetcher.gate = client.portal.call(asyncio.Event)  # type: ignore[union-attr]
        ids = [client.post("/v1/screenings", json={"study_instance_uid": u}).json()["screening_id"] for u in uids]

        def settle(expected: int) -> None:
            deadline = time.monotonic() + 10
            while fetcher.running < expected:
                assert time.monotonic() < deadline, (fetcher.running, expected)
                time.sleep(0.02)
            time.sleep(0.2)  # and no more than that
            assert fetcher.running == expected

        settle(2)  # limit 3 = 2 fetcher slots + the stat slot; routine takes 2
        details[0] = _details(3, 2)
        settle(6)  # limit 7: routine takes 6
        client.portal.call(fetcher.gate.set)  # type: ignore[union-attr]
        assert all(wait_for(client, j)["status"] == "DONE" for j in ids)
        assert fetcher.most == 6
