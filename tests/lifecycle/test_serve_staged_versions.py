"""Shadow and promotion in the staged Serve topology (the GPU layout: ingress -> fetcher ->
model-<id>), forced on a CPU-only local Ray. The model deployment serves both versions; a
shadow version's results are stored in ``shadow_results`` and never reach the outbox (counted
in the deliveries table and at a real MLLP listener); ``dxassist models promote`` while jobs
are running loses and duplicates nothing, and the jobs submitted after it use the promoted
version, without a restart."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import yaml

from models.importing import derive_version
from models.registry import REGISTRY_ROOT
from models.synthetic.cxr import generate_cxr_dataset
from serving.persistence.lifecycle import LifecycleStore
from serving.persistence.results import ResultsStore
from tests.conformance.receivers import mllp_listener
from tests.integration.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.own_process]

KEYS = ["cardiomegaly", "pleural_effusion", "pneumothorax", "nodule_mass", "consolidation"]


def _wait_done(client: httpx.Client, ids: list[str], deadline: float) -> list[dict[str, Any]]:
    while any(client.get(f"/v1/screenings/{j}").json()["status"] not in ("DONE", "FAILED") for j in ids):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    return [client.get(f"/v1/screenings/{j}").json() for j in ids]


def _deliveries(db: Path) -> list[tuple[int, str]]:
    with sqlite3.connect(db) as conn:
        return [(int(r[0]), str(r[1])) for r in conn.execute("SELECT screening_id, sink FROM deliveries")]


def _screening_ids(db: Path) -> set[int]:
    with sqlite3.connect(db) as conn:
        return {int(r[0]) for r in conn.execute("SELECT id FROM screenings")}


def test_shadow_and_promote_on_the_staged_topology(tmp_path: Path) -> None:
    from serving.rayserve.local_cluster import local_serve

    registry = tmp_path / "registry"
    shutil.copytree(REGISTRY_ROOT / "cxr-triage" / "1.0.0", registry / "cxr-triage" / "1.0.0")
    derive_version(
        "cxr-triage", "1.0.0", "1.0.1", dict.fromkeys(KEYS, (0.5, "test: every threshold at 0.5")), root=registry
    )
    store = tmp_path / "store"
    generate_cxr_dataset(store, 12, seed=37, size=(320, 320), prevalence=0.4)
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in sorted(store.glob("*.dcm"))]
    shadow_phase, later = uids[:4], uids[4:]
    results_db = tmp_path / "results.sqlite3"
    with mllp_listener() as listener:
        settings = tmp_path / "settings.yaml"
        settings.write_text(
            yaml.safe_dump(
                {
                    "environment": "test",
                    "models": [{"id": "cxr-triage", "version": "1.0.0", "providers": "cpu", "shadow": ["1.0.1"]}],
                    "store": {"path": str(store)},
                    "emr": {"hl7": {"host": "127.0.0.1", "port": listener.port}},
                    "results": {"sqlite_path": str(results_db)},
                    "api": {"spool_dir": str(tmp_path / "spool")},
                    "drift": {"interval_s": 0},
                }
            )
        )
        env = {"DXASSIST_REGISTRY": str(registry)}
        with (
            local_serve(
                str(settings), port=free_port(), num_cpus=2, api_token="tok", topology="staged", env=env
            ) as base,
            httpx.Client(base_url=base, headers={"Authorization": "Bearer tok"}, timeout=30) as client,
        ):

            def submit(batch: list[str]) -> list[str]:
                return [
                    client.post("/v1/screenings", json={"study_instance_uid": u, "priority": "routine"}).json()[
                        "screening_id"
                    ]
                    for u in batch
                ]

            deadline = time.monotonic() + 300
            bodies = _wait_done(client, submit(shadow_phase), deadline)
            assert [b["status"] for b in bodies] == ["DONE"] * len(shadow_phase)
            screened = [b["result"] for b in bodies if b["result"]["outcome"] == "SCREENED"]
            assert len(screened) == len(shadow_phase)
            assert all(r["models"] == ["cxr-triage@1.0.0"] for r in screened)
            lifecycle = LifecycleStore(results_db)
            while len(lifecycle.shadow_results("cxr-triage", "1.0.1")) < len(screened):
                assert time.monotonic() < deadline
                time.sleep(0.3)
            shadows = lifecycle.shadow_results("cxr-triage", "1.0.1")
            lifecycle.close()
            stored = f'dxassist_shadow_screenings_total{{model="cxr-triage@1.0.1",outcome="stored"}} {len(screened)}.0'
            while stored not in client.get("/metrics").text:
                assert time.monotonic() < deadline
                time.sleep(0.3)
            while len(listener.accepted) < len(screened):
                assert time.monotonic() < deadline
                time.sleep(0.3)
            time.sleep(1.0)  # a stray shadow delivery would have been sent by now (the outbox polls at 0.2 s)
            deliveries_before = _deliveries(results_db)
            messages_before = list(listener.messages)

            # promote while jobs are queued and running, from the command line, no restart
            first = submit(later[:4])
            promote = subprocess.run(
                [
                    *(sys.executable, "-m", "serving.cli.main", "models", "promote", "cxr-triage@1.0.1"),
                    *("--reason", "shadow agreement reviewed", "--actor", "ml-lead", "--settings", str(settings)),
                ],
                capture_output=True,
                text=True,
                env={**os.environ, "DXASSIST_REGISTRY": str(registry)},
                timeout=120,
            )
            assert promote.returncode == 0, promote.stdout + promote.stderr
            second = submit(later[4:])
            after = _wait_done(client, first + second, deadline + 120)

    # the shadow phase: one delivery per screening of the active version, none for the shadow
    assert len(shadows) == len(screened)
    assert all(f["model_version"] == "1.0.1" for s in shadows for f in s.result.model_dump()["findings"])
    assert sorted(sink for _s, sink in deliveries_before) == ["hl7"] * len(screened)
    assert {s for s, _sink in deliveries_before} <= _screening_ids(results_db)
    assert sum("ORU^R01" in m for m in messages_before) == len(screened)
    assert not any("cxr-triage@1.0.1" in m for m in messages_before)

    # promotion under load: every job done, once, each with one version, the later ones with 1.0.1
    assert [b["status"] for b in after] == ["DONE"] * len(later)
    results = ResultsStore(results_db)
    assert results.count() == len(uids)
    assert all(len(results.screenings_for(u)) == 1 for u in uids)
    results.close()
    for body in after:
        assert len({f["model_version"] for f in body["result"]["findings"]}) <= 1
    assert all(b["result"]["models"] == ["cxr-triage@1.0.1"] for b in after[4:] if b["result"]["outcome"] == "SCREENED")
    assert {s for s, _sink in _deliveries(results_db)} == _screening_ids(results_db)
