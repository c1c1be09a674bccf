"""The online service on a real multi-node Ray cluster on this machine, with nothing shared
(issue #19, ADRs 0021 and 0024): the online counterpart of ``test_batch_cluster.py``.

A head and two worker nodes (``ray start``, one CPU each; ``tests/integration/ray_cluster.py``);
each worker runs in its own mount namespace with tmpfs over the upload spool folder, so it sees
none of the head's spooled files. The application is deployed the way ``dxassist serve --address``
does it (``deploy_to_cluster`` with ``configs/serve/cluster.yaml``'s deployment options), with
two ingress replicas on one PostgreSQL results database and a real MLLP listener as the EMR.
Uploads are POSTed through the Serve proxy (spread over both ingresses), and the worker node that
holds the most replicas is killed mid-run. Every job must end DONE, each study screened exactly
once (one result row), each delivered exactly once at the MLLP listener (one ORU, one MSH-10),
none lost.

Not part of the default suite yet (on the loaded 2-core host it takes 8-10 minutes, and starting
three Ray nodes there sometimes fails: Ray's fixed 30 s raylet registration): it runs only with
``DXASSIST_SERVE_CLUSTER_TEST=1``, e.g.
``DXASSIST_SERVE_CLUSTER_TEST=1 scripts/run_tests.sh tests/integration/test_serve_cluster.py``
(``DXASSIST_SERVE_CLUSTER_UPLOADS=40`` for more uploads). Needs root and ``unshare``; skipped with
the reason otherwise.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import yaml

from models.synthetic.cxr import generate_cxr_dataset
from serving.persistence.results import ResultsStore
from tests.conformance.receivers import mllp_listener
from tests.integration.conftest import PostgresServer, free_port
from tests.integration.ray_cluster import LocalCluster, mount_namespace_unavailable

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.own_process]

UPLOADS = int(os.environ.get("DXASSIST_SERVE_CLUSTER_UPLOADS", "12"))
TOKEN = "ris:integration:cluster-serve-token"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def root() -> Iterator[Path]:
    """A short folder (Ray's socket paths must stay under the Unix limit)."""
    if os.environ.get("DXASSIST_SERVE_CLUSTER_TEST") != "1":
        pytest.skip("opt-in: DXASSIST_SERVE_CLUSTER_TEST=1 (not yet reliably green on a loaded 2-core host)")
    why = mount_namespace_unavailable()
    if why:
        pytest.skip(f"multi-node test needs private mount namespaces: {why}")
    path = Path(tempfile.mkdtemp(prefix="dxs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _replica_nodes() -> dict[str, list[str]]:
    """Node id -> the deployments whose running replicas are there (the Serve controller's view)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    where: dict[str, list[str]] = {}
    for app in details.get("applications", {}).values():
        for name, deployment in app.get("deployments", {}).items():
            for replica in deployment.get("replicas", []):
                if replica.get("state") == "RUNNING" and replica.get("node_id"):
                    where.setdefault(str(replica["node_id"]), []).append(str(name))
    return where


def _ray_connected() -> bool:
    import ray

    return bool(ray.is_initialized())


def _wait(what: str, check: Any, deadline: float, every: float = 0.5) -> None:
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def test_online_service_on_three_nodes_with_two_ingresses_and_a_node_killed(
    root: Path, postgres: PostgresServer
) -> None:
    from ray import serve

    from serving.rayserve.local_cluster import deploy_to_cluster, driver_settings, read_serve_config

    store = root / "studies"
    generate_cxr_dataset(store, UPLOADS, seed=919, size=(320, 320), prevalence=0.4)
    files = sorted(store.glob("cxr_*.dcm"))
    assert len(files) == UPLOADS
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in files]
    spool = root / "spool"
    spool.mkdir()
    database = postgres.new_database()
    port = free_port()

    with mllp_listener() as listener:
        settings_file = root / "settings.yaml"
        settings_file.write_text(
            yaml.safe_dump(
                {
                    "environment": "test",
                    "models": [{"id": "cxr-triage", "providers": "cpu", "intra_op_threads": 1}],
                    "results": {"url": database},
                    "emr": {"hl7": {"host": "127.0.0.1", "port": listener.port}},
                    "api": {"spool_dir": str(spool), "job_lease_s": 10.0, "drain_timeout_s": 5.0},
                    "screening": {"batch_size": 1, "decode_workers": 1},
                    "serve": {"runtime": "ray", "topology": "staged", "replica_retries": 8},
                    "drift": {"interval_s": 0},
                }
            )
        )
        settings = driver_settings(settings_file, {"DXASSIST_API__TOKENS": TOKEN})
        config = read_serve_config(REPO / "configs" / "serve" / "cluster.yaml")
        deployments = {k: dict(v) for k, v in config.deployments.items()}
        deployments["ingress"] = {**deployments["ingress"], "num_replicas": 2}
        config = replace(
            config,
            http_options={**config.http_options, "host": "127.0.0.1", "port": port},
            proxy_location="HeadOnly",
            settings_path=None,
            deployments=deployments,
        )

        cluster = LocalCluster(root)
        killed: list[str] = []
        try:
            cluster.start_head()
            head = cluster.connect()
            workers = {name: cluster.add_worker(name, hidden=[spool]) for name in ("w1", "w2")}
            assert head not in workers.values()
            import ray

            # as `dxassist serve --address` does: join, deploy, leave (the app stays on the cluster)
            ray.shutdown()
            deploy_to_cluster(cluster.address, settings, config)
            cluster.connect()  # back as a driver, to read where the replicas run
            where = _replica_nodes()
            assert sum(len(v) for v in where.values()) >= 6, where  # 2 ingresses, 2 fetchers, 2 models
            assert set(where) & set(workers.values()), where  # replicas on the workers too
            victim = max(workers, key=lambda n: len(where.get(workers[n], [])))

            base = f"http://127.0.0.1:{port}"
            with httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {TOKEN.split(':')[-1]}"}, timeout=60
            ) as client:
                deadline = time.monotonic() + 600
                _wait("readiness", lambda: client.get("/readyz").status_code == 200, deadline, 1.0)
                job_ids: list[str] = []
                for path in files:
                    answer = client.post(
                        "/v1/screenings/upload", files=[("files", (path.name, path.read_bytes(), "application/dicom"))]
                    )
                    assert answer.status_code == 202, answer.text
                    job_ids.append(answer.json()["screening_id"])
                results = ResultsStore(database)
                try:
                    # kill the worker with the most replicas once a few results are in
                    _wait("the first results", lambda: results.count() >= 3, deadline)
                    cluster.node(victim).kill()
                    killed.append(victim)
                    done = 0
                    while done < len(job_ids):
                        assert time.monotonic() < deadline, "not every job ended"
                        statuses = [client.get(f"/v1/screenings/{j}") for j in job_ids]
                        done = sum(r.status_code == 200 and r.json()["status"] in ("DONE", "FAILED") for r in statuses)
                        time.sleep(1.0)
                    bodies = [client.get(f"/v1/screenings/{j}").json() for j in job_ids]
                    _wait("every delivery", lambda: len(listener.accepted) >= UPLOADS, deadline)
                    time.sleep(2.0)  # a duplicate would have been sent by now (the outbox polls at 0.2 s)
                    counts = {uid: len(results.screenings_for(uid)) for uid in uids}
                    outcomes = {uid: [r.result.outcome for r in results.screenings_for(uid)] for uid in uids}
                finally:
                    results.close()
        finally:
            try:
                if cluster.nodes and _ray_connected():
                    serve.shutdown()
            except Exception:  # the cluster goes anyway
                pass
            cluster.stop()

    assert killed
    assert [b["status"] for b in bodies] == ["DONE"] * UPLOADS, [(b["status"], b.get("error")) for b in bodies]
    assert all(b["result"]["outcome"] == "SCREENED" for b in bodies), outcomes
    assert counts == dict.fromkeys(uids, 1), "each study screened exactly once"
    # delivered exactly once, counted at the MLLP listener: one ORU^R01 per study, one MSH-10 each
    orus = [m for m in listener.messages if "ORU^R01" in m]
    per_control = Counter(listener.received)
    assert len(per_control) == UPLOADS and set(per_control.values()) == {1}, per_control
    assert len(orus) == UPLOADS
