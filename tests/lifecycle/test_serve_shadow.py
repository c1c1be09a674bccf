"""A shadow version on live traffic through the real Serve app (inline topology on a local Ray):
the PACS is a real Orthanc (studies fetched by DICOMweb, results stored back), the EMR a real
FHIR server and MLLP listener. Counted at the receivers: every delivery comes from the active
version, none from the shadow version, whose results are all in ``shadow_results``. Then
``dxassist models promote`` while jobs are running: nothing lost or duplicated, later jobs use
the promoted version, no restart."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml

from models.importing import derive_version
from models.registry import REGISTRY_ROOT
from models.synthetic.cxr import generate_cxr_dataset
from serving.persistence.lifecycle import LifecycleStore
from serving.persistence.outbox import Outbox
from serving.persistence.results import ResultsStore
from tests.conformance.receivers import fhir_search, fhir_server, mllp_listener
from tests.integration.conftest import OrthancServer, free_port, orthanc  # noqa: F401  (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.own_process]


def _text_values(ds: pydicom.Dataset) -> list[str]:
    out = []
    for element in ds.iterall():
        if element.keyword in ("TextValue", "SoftwareVersions", "CodeMeaning") and element.value:
            out.append(str(element.value))
    return out


def test_shadow_version_on_the_serve_app_delivers_nothing(tmp_path: Path, orthanc: OrthancServer) -> None:  # noqa: F811
    from serving.rayserve.local_cluster import local_serve

    registry = tmp_path / "registry"
    shutil.copytree(REGISTRY_ROOT / "cxr-triage" / "1.0.0", registry / "cxr-triage" / "1.0.0")
    keys = ["cardiomegaly", "pleural_effusion", "pneumothorax", "nodule_mass", "consolidation"]
    derive_version(
        "cxr-triage", "1.0.0", "1.0.1", dict.fromkeys(keys, (0.5, "test: every threshold at 0.5")), root=registry
    )
    studies = tmp_path / "studies"
    generate_cxr_dataset(studies, 14, seed=31, size=(320, 320), prevalence=0.4)
    all_uids = []
    for path in sorted(studies.glob("*.dcm")):
        orthanc.upload(path)
        all_uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID))
    uids, later = all_uids[:6], all_uids[6:]  # the shadow phase; then the promotion under load
    results_db = tmp_path / "results.sqlite3"
    with fhir_server() as fhir, mllp_listener() as listener:
        settings = tmp_path / "settings.yaml"
        settings.write_text(
            yaml.safe_dump(
                {
                    "environment": "test",
                    "models": [{"id": "cxr-triage", "version": "1.0.0", "providers": "cpu", "shadow": ["1.0.1"]}],
                    "store": {
                        "kind": "dicomweb",
                        "dicomweb": {"url": orthanc.dicomweb, "username": orthanc.user, "password": orthanc.password},
                        "write_results": True,
                        "write_objects": ["sr"],
                    },
                    "emr": {"fhir": {"url": f"{fhir}/fhir/R4"}, "hl7": {"host": "127.0.0.1", "port": listener.port}},
                    "results": {"sqlite_path": str(results_db)},
                    "api": {"spool_dir": str(tmp_path / "spool")},
                }
            )
        )
        env = {"DXASSIST_REGISTRY": str(registry)}
        with local_serve(
            str(settings), port=free_port(), num_cpus=2, api_token="tok", topology="inline", env=env
        ) as base:
            with httpx.Client(base_url=base, headers={"Authorization": "Bearer tok"}, timeout=30) as client:
                ids = [
                    client.post("/v1/screenings", json={"study_instance_uid": uid, "priority": "routine"}).json()[
                        "screening_id"
                    ]
                    for uid in uids
                ]
                deadline = time.monotonic() + 240
                while any(client.get(f"/v1/screenings/{j}").json()["status"] not in ("DONE", "FAILED") for j in ids):
                    assert time.monotonic() < deadline
                    time.sleep(0.3)
                bodies = [client.get(f"/v1/screenings/{j}").json() for j in ids]
                assert [b["status"] for b in bodies] == ["DONE"] * len(ids)
                screened = [b["result"] for b in bodies if b["result"]["outcome"] == "SCREENED"]
                assert screened and all(r["models"] == ["cxr-triage@1.0.0"] for r in screened)
                lifecycle = LifecycleStore(results_db)
                while len(lifecycle.shadow_results("cxr-triage", "1.0.1")) < len(screened):
                    assert time.monotonic() < deadline
                    time.sleep(0.3)
                # the counter moves just after the row is written: poll, do not race
                stored = (
                    f'dxassist_shadow_screenings_total{{model="cxr-triage@1.0.1",outcome="stored"}} {len(screened)}.0'
                )
                while stored not in client.get("/metrics").text:
                    assert time.monotonic() < deadline
                    time.sleep(0.3)
                outbox = Outbox(results_db)
                while outbox.status().pending:
                    assert time.monotonic() < deadline
                    time.sleep(0.3)
                assert outbox.status().dead == 0
                outbox.close()
                shadows = lifecycle.shadow_results("cxr-triage", "1.0.1")
                lifecycle.close()
                reports = fhir_search(fhir, "DiagnosticReport")
                devices = fhir_search(fhir, "Device")
                messages = list(listener.messages)

                # promote under load, from the command line, while the service keeps screening
                def submit(batch: list[str]) -> list[str]:
                    return [
                        client.post("/v1/screenings", json={"study_instance_uid": u, "priority": "routine"}).json()[
                            "screening_id"
                        ]
                        for u in batch
                    ]

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
                while any(
                    client.get(f"/v1/screenings/{j}").json()["status"] not in ("DONE", "FAILED") for j in first + second
                ):
                    assert time.monotonic() < deadline + 120
                    time.sleep(0.3)
                after = [client.get(f"/v1/screenings/{j}").json() for j in first + second]

    # promotion under load: every job done, once, each with one version, the later ones with 1.0.1
    assert [b["status"] for b in after] == ["DONE"] * len(later)
    store = ResultsStore(results_db)
    assert store.count() == len(all_uids)
    assert all(len(store.screenings_for(u)) == 1 for u in all_uids)
    store.close()
    for body in after:
        assert len({f["model_version"] for f in body["result"]["findings"]}) <= 1
    assert all(b["result"]["models"] == ["cxr-triage@1.0.1"] for b in after[4:] if b["result"]["outcome"] == "SCREENED")

    assert len(shadows) == len(screened)
    assert all(f["model_version"] == "1.0.1" for s in shadows for f in s.result.model_dump()["findings"])
    # FHIR: one report per screened study, devices of the active version only
    assert len(reports) == len(screened)
    assert [d["version"][0]["value"] for d in devices] == ["1.0.0"]
    # HL7: one ORU per screened study, naming the active version, never the shadow
    assert sum("ORU^R01" in m for m in messages) == len(screened)
    assert not any("cxr-triage@1.0.1" in m for m in messages)
    # Orthanc: one SR per screened study, from the active version
    srs = []
    for uid in uids:
        for instance in orthanc.study_instances(uid):
            with orthanc.client() as c:
                raw = c.get(f"/instances/{instance['ID']}/file").content
            ds = pydicom.dcmread(io.BytesIO(raw))
            if ds.Modality == "SR":
                srs.append(_text_values(ds))
    assert len(srs) == len(screened)
    assert all("1.0.0" in values and "1.0.1" not in values for values in srs)
