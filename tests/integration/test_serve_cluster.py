"""The online service on a real multi-node Ray cluster on this machine, with nothing shared
(issue #19, ADRs 0021 and 0024): the online counterpart of ``test_batch_cluster.py``.

A head and two worker nodes (``ray start``, one CPU each; ``tests/integration/ray_cluster.py``);
each worker runs in its own mount namespace with tmpfs over the upload spool folder, so it sees
none of the head's spooled files. The application is deployed the way ``dxassist serve --address``
does it (``deploy_to_cluster`` with ``configs/serve/cluster.yaml``'s deployment options), with
two ingress replicas on one PostgreSQL results database, and real receivers: an MLLP listener
(HL7 ORU), the FHIR server (DiagnosticReport and Observations) and Orthanc (the DICOM SR).
Uploads are POSTed through the Serve proxy (spread over both ingresses), and the worker node that
holds the most replicas is killed mid-run. Every job must end DONE, each study screened exactly
once (one result row) by the version its result names, and delivered exactly once, counted at
each receiver (one ORU and one MSH-10 per study at the listener, one DiagnosticReport write per
study at the FHIR server, one SR per study in Orthanc), none lost.

The default run (CI) uploads 8 studies; ``DXASSIST_SERVE_CLUSTER_UPLOADS=40`` uploads more, e.g.
``DXASSIST_SERVE_CLUSTER_UPLOADS=40 scripts/run_tests.sh tests/integration/test_serve_cluster.py``.
Needs root and ``unshare``; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
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
from serving.persistence.outbox import Outbox
from serving.persistence.results import ResultsStore
from tests.conformance.receivers import fhir_search, fhir_server, mllp_listener
from tests.integration.conftest import OrthancServer, PostgresServer, free_port
from tests.integration.ray_cluster import LocalCluster, cluster_root
from tests.integration.test_pacs_flows import _sr_count

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.own_process]

UPLOADS = int(os.environ.get("DXASSIST_SERVE_CLUSTER_UPLOADS", "8"))
TOKEN = "ris:integration:cluster-serve-token"
SINKS = ("hl7", "fhir", "dicom-sr")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def root() -> Iterator[Path]:
    yield from cluster_root("dxs-")


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


def _fhir_writes(base: str) -> int:
    """DiagnosticReports the FHIR server accepted (a re-sent one counts again)."""
    return int(httpx.get(f"{base}/__control/writes").json().get("DiagnosticReport", 0))


def _wait(what: str, check: Any, deadline: float, every: float = 0.5) -> None:
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def test_online_service_on_three_nodes_with_two_ingresses_and_a_node_killed(
    root: Path, postgres: PostgresServer, orthanc: OrthancServer
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

    with mllp_listener() as listener, fhir_server() as fhir:
        settings_file = root / "settings.yaml"
        dicomweb = {"url": orthanc.dicomweb, "username": orthanc.user, "password": orthanc.password}
        settings_file.write_text(
            yaml.safe_dump(
                {
                    "environment": "test",
                    "models": [{"id": "cxr-triage", "providers": "cpu", "intra_op_threads": 1}],
                    "store": {
                        "kind": "dicomweb",
                        "dicomweb": dicomweb,
                        "write_results": True,
                        "write_objects": ["sr"],
                    },
                    "emr": {
                        "hl7": {"host": "127.0.0.1", "port": listener.port},
                        "fhir": {"url": f"{fhir}/fhir/R4"},
                    },
                    "api": {"spool_dir": str(spool), "job_lease_s": 10.0, "drain_timeout_s": 5.0},
                    "results": {"url": database, "delivery_lease_s": 10.0},
                    "screening": {"batch_size": 1, "decode_workers": 1},
                    "serve": {"runtime": "ray", "topology": "staged", "replica_retries": 8},
                    "drift": {"interval_s": 0},
                }
            )
        )
        settings = driver_settings(settings_file, {"DXASSIST_API__TOKENS": TOKEN})
        pinned = settings.models[0].version
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
                outbox = Outbox(database)
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
                    # every delivery DONE in the outbox: the killed ingress's claimed rows too,
                    # taken over once their lease (10 s here) ran out
                    _wait("every delivery done", lambda: outbox.status().pending == 0, deadline)
                    time.sleep(2.0)  # a stray delivery would have been sent by now (the outbox polls at 0.2 s)
                    status = outbox.status()
                    delivered_audits = outbox.audit_count("DELIVERED")
                    counts = {uid: len(results.screenings_for(uid)) for uid in uids}
                    outcomes = {uid: [r.result.outcome for r in results.screenings_for(uid)] for uid in uids}
                    versions = {uid: [r.result.models for r in results.screenings_for(uid)] for uid in uids}
                    fhir_writes = _fhir_writes(fhir)
                    reports = fhir_search(fhir, "DiagnosticReport")
                    srs = {uid: _sr_count(orthanc, uid) for uid in uids}
                finally:
                    results.close()
                    outbox.close()
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
    # inside: every delivery completed once (one DELIVERED audit row each), none pending or dead.
    # A send the killed node made before it could record it is made again by a live worker with
    # the same ids (at-least-once on the wire): the receivers below keep it once
    assert (status.pending, status.dead) == (0, 0) and status.done >= len(SINKS) * UPLOADS, status
    assert all(status.by_sink[sink] == {"DONE": UPLOADS} for sink in SINKS), status.by_sink
    assert delivered_audits == status.done
    resent = {
        "hl7": len(listener.received) - len(set(listener.received)),
        "fhir DiagnosticReport writes": fhir_writes - len(reports),
    }
    print(f"re-sent after the node kill (same ids, kept once by the receivers): {resent}")
    # at the MLLP listener: one MSH-10 per study (the job-derived id), each acknowledged; a
    # second screening would have carried another MSH-10
    per_control = Counter(listener.received)
    assert len(per_control) == UPLOADS and listener.accepted == set(per_control), per_control
    assert len({m.split("|")[9] for m in listener.messages if "ORU^R01" in m}) == UPLOADS
    assert max(per_control.values()) <= 2, per_control  # at most the one send the kill interrupted
    # at the FHIR server: one DiagnosticReport per study, naming that study
    assert len(reports) == UPLOADS and fhir_writes >= UPLOADS
    assert sorted(next(u for u in uids if u in json.dumps(r)) for r in reports) == sorted(uids)
    # at the PACS: one SR per study
    assert srs == dict.fromkeys(uids, 1), srs
    # screened by the version each result names: the one version the driver pinned
    assert all(v == [[f"cxr-triage@{pinned}"]] for v in versions.values()), versions
