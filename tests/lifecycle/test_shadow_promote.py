"""Versions side by side through the real service: a shadow version screens every study and its
results are stored marked shadow while the real FHIR server and MLLP listener receive only the
active version's results (counted at the receivers); ``compare`` reports agreement per finding;
``promote`` while jobs are running loses and duplicates nothing, and later jobs use the new
version without a restart; ``rollback`` switches back; every switch is audited."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from models.importing import derive_version
from models.registry import REGISTRY_ROOT
from models.results import OutcomeValues, ScreeningResult
from models.synthetic.cxr import generate_cxr_dataset
from serving.dicom.sources.local import LocalFolderSource
from serving.emr.fhir import FhirSink
from serving.emr.hl7 import Hl7MllpSink
from serving.online.api import LazyService, create_api
from serving.online.factory import build_service
from serving.online.versions import VersionedPipeline, VersionRouter, compare_shadow
from serving.persistence.lifecycle import LifecycleStore
from serving.persistence.outbox import Outbox
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings, ModelSettings, ResultsSettings, SecuritySettings, Settings, SiteIdentity
from tests.conformance.receivers import fhir_search, fhir_server, mllp_listener

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cxr-triage@1.0.0 (shipped) and 1.0.1: the same artifact with every threshold at 0.5."""
    root = tmp_path_factory.mktemp("registry")
    shutil.copytree(REGISTRY_ROOT / "cxr-triage" / "1.0.0", root / "cxr-triage" / "1.0.0")
    keys = ["cardiomegaly", "pleural_effusion", "pneumothorax", "nodule_mass", "consolidation"]
    derive_version(
        "cxr-triage", "1.0.0", "1.0.1", dict.fromkeys(keys, (0.5, "test: every threshold at 0.5")), root=root
    )
    return root


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("studies")
    generate_cxr_dataset(folder, 12, seed=23, size=(320, 320), prevalence=0.4)
    return sorted(folder.glob("*.dcm"))


@dataclass
class Run:
    results: list[ScreeningResult]
    hl7_messages: list[str]
    fhir_reports: list[dict]
    fhir_devices: list[dict]
    lifecycle: LifecycleStore
    store: ResultsStore
    pipeline: VersionedPipeline


def _settings(tmp: Path) -> Settings:
    return Settings(
        models=[ModelSettings(id="cxr-triage", version="1.0.0", providers="cpu", shadow=["1.0.1"])],
        results=ResultsSettings(sqlite_path=tmp / "results.sqlite3"),
        security=SecuritySettings(study_ref_key=SecretStr("lifecycle-test-key-0123456789")),
        api=ApiSettings(spool_dir=tmp / "spool"),
    )


def _upload_all(client: TestClient, files: list[Path]) -> list[str]:
    ids = []
    for path in files:
        answer = client.post(
            "/v1/screenings/upload", files=[("files", (path.name, path.read_bytes(), "application/dicom"))]
        )
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["screening_id"])
    return ids


def _wait_done(client: TestClient, ids: list[str]) -> list[ScreeningResult]:
    deadline = time.monotonic() + 300
    while any(client.get(f"/v1/screenings/{j}").json()["status"] not in ("DONE", "FAILED") for j in ids):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    answers = [client.get(f"/v1/screenings/{j}").json() for j in ids]
    assert [a["status"] for a in answers] == ["DONE"] * len(ids)
    return [ScreeningResult.model_validate(a["result"]) for a in answers]


@pytest.fixture(scope="module")
def shadow_run(tmp_path_factory: pytest.TempPathFactory, registry: Path, studies: list[Path]) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("shadow")
    settings = _settings(tmp)
    identity = SiteIdentity()
    lifecycle = LifecycleStore(settings.results.target)
    with fhir_server() as base, mllp_listener() as listener:
        sinks = {
            "fhir": FhirSink(f"{base}/fhir/R4", identity=identity, timeout_s=5),
            "hl7": Hl7MllpSink("127.0.0.1", listener.port, identity=identity, timeout_s=5),
        }
        pipeline = VersionedPipeline(VersionRouter(settings, lifecycle, root=registry), LocalFolderSource(tmp))
        service = build_service(settings, pipeline)
        service.sinks = sinks  # the real receivers (build_service reads emr.* settings; here: test ports)
        service.outbox = Outbox(settings.results.target)
        lazy = LazyService(lambda: service)
        with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:
            client.get("/readyz")
            results = _wait_done(client, _upload_all(client, studies))
            client.portal.call(pipeline.shadow_idle)
            outbox = Outbox(settings.results.target)
            deadline = time.monotonic() + 120
            while outbox.status().pending and time.monotonic() < deadline:
                time.sleep(0.2)
            status = outbox.status()
            outbox.close()
            assert (status.pending, status.dead) == (0, 0)
            client.portal.call(lazy.started.drain, 5.0)  # type: ignore[union-attr]
        reports = fhir_search(base, "DiagnosticReport")
        devices = fhir_search(base, "Device")
        for sink in sinks.values():
            sink.close()
        service.close()
        store = ResultsStore(settings.results.target)
        yield Run(results, list(listener.messages), reports, devices, lifecycle, store, pipeline)
        store.close()
        lifecycle.close()


def test_shadow_results_are_stored_and_never_delivered(shadow_run: Run, studies: list[Path]) -> None:
    screened = [r for r in shadow_run.results if r.outcome == OutcomeValues.SCREENED]
    assert screened and all(r.models == ["cxr-triage@1.0.0"] for r in screened)
    shadows = shadow_run.lifecycle.shadow_results("cxr-triage", "1.0.1")
    assert len(shadows) == len(screened) and shadow_run.pipeline.shadow_counts["stored"] == len(screened)
    assert all(s.result.findings[0].model_version == "1.0.1" for s in shadows)
    # counted at the receivers: one report and one ORU per delivered (active) result, nothing of 1.0.1
    assert len(shadow_run.fhir_reports) == len(shadow_run.results)
    assert len([m for m in shadow_run.hl7_messages if "ORU^R01" in m]) == len(shadow_run.results)
    assert sum("cxr-triage@1.0.0" in m for m in shadow_run.hl7_messages) == len(shadow_run.results)
    assert not any("cxr-triage@1.0.1" in m for m in shadow_run.hl7_messages)
    assert [d["version"][0]["value"] for d in shadow_run.fhir_devices] == ["1.0.0"]
    # nor in the worklist / results: the results database holds only the active version's screenings
    assert shadow_run.store.count() == len(studies)


def test_compare_reports_agreement_per_finding_by_study_ref(shadow_run: Run) -> None:
    comparison = compare_shadow(shadow_run.lifecycle, shadow_run.store, "cxr-triage", "1.0.1")
    screened = [r for r in shadow_run.results if r.outcome == OutcomeValues.SCREENED]
    assert comparison.studies == len(screened) and comparison.unmatched == 0
    assert [f.key for f in comparison.findings] == sorted(
        ["cardiomegaly", "consolidation", "nodule_mass", "pleural_effusion", "pneumothorax"]
    )
    by_key = {f.key: f.agreement for f in comparison.findings}
    # same artifact, other thresholds: scores correlate perfectly; verdicts differ where a score
    # lies between the two thresholds, and those are exactly the listed disagreements
    for a in by_key.values():
        assert a.n == len(screened)
        assert a.score_correlation == pytest.approx(1.0) or a.score_correlation != a.score_correlation
    expected = sum(a.only_a + a.only_b for a in by_key.values())
    assert len(comparison.disagreements) == expected > 0
    refs = {r.study_ref for r in screened}
    assert {d[0] for d in comparison.disagreements} <= refs
    uids = {r.study_instance_uid for r in screened}
    assert not any(d[0] in uids for d in comparison.disagreements)


def test_promote_under_load_loses_and_duplicates_nothing_then_rollback(
    tmp_path: Path, registry: Path, studies: list[Path]
) -> None:
    settings = _settings(tmp_path).model_copy(
        update={"models": [ModelSettings(id="cxr-triage", version="1.0.0", providers="cpu")]}
    )
    lifecycle = LifecycleStore(settings.results.target)
    pipeline = VersionedPipeline(VersionRouter(settings, lifecycle, root=registry), LocalFolderSource(tmp_path))
    service = build_service(settings, pipeline)
    lazy = LazyService(lambda: service)
    with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:
        client.get("/readyz")
        first = _upload_all(client, studies)
        # promote while the first batch is queued/running
        lifecycle.switch(
            "cxr-triage", "1.0.1", action="promote", actor="ml-engineer", reason="site validation", current="1.0.0"
        )
        results_first = _wait_done(client, first)
        second = _upload_all(client, studies[:4])
        results_second = _wait_done(client, second)
        lifecycle.switch(
            "cxr-triage", "1.0.0", action="rollback", actor="ml-engineer", reason="test rollback", current="1.0.1"
        )
        third = _upload_all(client, studies[:2])
        results_third = _wait_done(client, third)
        client.portal.call(lazy.started.drain, 5.0)  # type: ignore[union-attr]
    service.close()
    # nothing lost: every job DONE (checked in _wait_done); nothing duplicated: one screening per job
    store = ResultsStore(settings.results.target)
    assert store.count() == len(first) + len(second) + len(third)
    store.close()
    # each job used one version throughout (all findings from the same version)
    for r in results_first + results_second + results_third:
        if r.outcome == OutcomeValues.SCREENED:
            assert len({f.model_version for f in r.findings}) == 1
    screened_second = [r for r in results_second if r.outcome == OutcomeValues.SCREENED]
    assert screened_second and all(r.models == ["cxr-triage@1.0.1"] for r in screened_second)
    assert all(r.models == ["cxr-triage@1.0.0"] for r in results_third if r.outcome == OutcomeValues.SCREENED)
    events = lifecycle.events("cxr-triage")
    assert [(e.action, e.from_version, e.to_version, e.actor) for e in events] == [
        ("promote", "1.0.0", "1.0.1", "ml-engineer"),
        ("rollback", "1.0.1", "1.0.0", "ml-engineer"),
    ]
    lifecycle.close()
