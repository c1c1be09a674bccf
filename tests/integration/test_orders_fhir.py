"""Orders in over FHIR R4, against the real FHIR server the EMR tests use (Medplum's router,
validating every write): ServiceRequest and ImagingStudy delivered to the Subscription rest-hook
endpoint as the server stores them, and read by the poller for sites without Subscriptions."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient

from models.predictor import OnnxPredictor
from serving.core.screening import StudyScreener
from serving.dicom.sources.local import LocalFolderSource
from serving.online.api import LazyService, create_api
from serving.online.orders import FhirOrderPoller
from serving.online.pipeline import LocalPipeline
from serving.online.service import ScreeningService
from serving.persistence.orders import OrderBook, OrderPriorityValues, OrderStatusValues
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings, OrdersFhirSettings, OrdersSettings
from tests.conformance.receivers import fhir_server
from tests.conftest import write_synthetic_cxr

pytestmark = pytest.mark.integration
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def _identifier(code: str, value: str) -> dict[str, Any]:
    return {"type": {"coding": [{"system": V2_0203, "code": code}]}, "system": f"urn:example:{code}", "value": value}


def service_request(rid: str, priority: str, placer: str, accession: str) -> dict[str, Any]:
    return {
        "resourceType": "ServiceRequest",
        "id": rid,
        "status": "active",
        "intent": "order",
        "priority": priority,
        "identifier": [_identifier("PLAC", placer), _identifier("FILL", f"F-{placer}"), _identifier("ACSN", accession)],
        "code": {"coding": [{"system": "http://loinc.org", "code": "36643-5", "display": "XR Chest 2 Views"}]},
        "subject": {"identifier": {"system": "urn:example:mrn", "value": "PAT-F1"}},
    }


def imaging_study(rid: str, uid: str, placer: str, accession: str) -> dict[str, Any]:
    return {
        "resourceType": "ImagingStudy",
        "id": rid,
        "status": "available",
        "identifier": [{"system": "urn:dicom:uid", "value": f"urn:oid:{uid}"}, _identifier("ACSN", accession)],
        "basedOn": [{"identifier": _identifier("PLAC", placer)}],
        "subject": {"identifier": {"system": "urn:example:mrn", "value": "PAT-F1"}},
    }


def put(base: str, resource: dict[str, Any]) -> dict[str, Any]:
    """Write through the real server (it validates) and return the resource as it stores it."""
    response = httpx.put(f"{base}/fhir/R4/{resource['resourceType']}/{resource['id']}", json=resource)
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


@contextmanager
def service_with_orders(tmp_path: Path) -> Iterator[tuple[TestClient, ResultsStore]]:
    store_dir = tmp_path / "store"
    store = ResultsStore(tmp_path / "results.sqlite3")
    from models.registry import resolve

    screener = StudyScreener([OnnxPredictor(resolve("cxr-triage"), providers="cpu")], study_ref_key=b"k")

    def factory() -> ScreeningService:
        return ScreeningService(
            LocalPipeline(screener, LocalFolderSource(store_dir)),
            screener,
            store,
            ApiSettings(spool_dir=tmp_path / "spool"),
            orders=OrdersSettings(),
        )

    lazy = LazyService(factory)
    with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:
        assert client.get("/readyz").status_code == 200
        yield client, store
        client.portal.call(lazy.started.drain, 5.0)  # type: ignore[union-attr]
        lazy.started.close()  # type: ignore[union-attr]


def test_rest_hook_stat_service_request_then_available_imaging_study_screens_at_stat(tmp_path: Path) -> None:
    path = write_synthetic_cxr(tmp_path / "store" / "a.dcm", seed=81)
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    with fhir_server() as base, service_with_orders(tmp_path) as (client, store):
        order = put(base, service_request("sr-1", "stat", "PL-F1", "ACC-F1"))
        assert client.post("/v1/fhir/notify", content=b"").json() == {"received": 0, "stored": 0}  # handshake
        first = client.post("/v1/fhir/notify", json=order, headers={"Content-Type": "application/fhir+json"})
        assert first.status_code == 200 and first.json() == {"received": 1, "stored": 1}
        again = client.post("/v1/fhir/notify", json=order)  # the same version resent: applied once
        assert again.json() == {"received": 1, "stored": 0}
        assert store.pending_jobs() == []  # an order alone screens nothing: no images yet
        study = put(base, imaging_study("is-1", uid, "PL-F1", "ACC-F1"))
        bundle = {"resourceType": "Bundle", "type": "history", "entry": [{"resource": study}]}
        assert client.post("/v1/fhir/notify", json=bundle).json() == {"received": 1, "stored": 1}
        deadline = time.monotonic() + 60
        while store.latest(uid) is None:
            assert time.monotonic() < deadline, "the available study was not screened"
            time.sleep(0.2)
        ((_, job_priority, result),) = store.latest_per_study()
        assert job_priority == "stat" and result.requested_priority == "stat"
        assert (result.placer_order_number, result.filler_order_number) == ("PL-F1", "F-PL-F1")
        assert client.get("/v1/worklist").json()[0]["rank"] == 0


def test_rest_hook_refuses_malformed_notifications_without_echoing_values(tmp_path: Path) -> None:
    with service_with_orders(tmp_path) as (client, _store):
        for body in (
            b"{not json",
            b"[" * 5000,
            b'{"resourceType": "ServiceRequest", "identifier": "PAT-SECRET-1"}',
            b'{"resourceType": "ServiceRequest", "status": "active"}',  # no order identifier
            b'{"resourceType": "ImagingStudy", "identifier": [{"system": "urn:dicom:uid", "value": "urn:oid:1.2.x"}],'
            b' "basedOn": [{"identifier": {"type": {"coding": [{"code": "PLAC"}]}, "value": "P1"}}]}',
        ):
            response = client.post("/v1/fhir/notify", content=body, headers={"Content-Type": "application/fhir+json"})
            assert response.status_code == 422, body[:40]
            assert response.json()["reason"] == "InvalidOrderMessage"
            assert "PAT-SECRET" not in response.text and "1.2.x" not in response.text
        ignored = client.post("/v1/fhir/notify", json={"resourceType": "Patient", "id": "p1"})
        assert ignored.json() == {"received": 1, "stored": 0}


def test_poller_reads_orders_changed_since_its_last_sweep(tmp_path: Path) -> None:
    with fhir_server() as base:
        settings = OrdersSettings(fhir=OrdersFhirSettings(poll=True, url=f"{base}/fhir/R4"))
        book = OrderBook(tmp_path / "results.sqlite3")
        heard: list[object] = []
        poller = FhirOrderPoller(book, settings, heard.extend)
        put(base, service_request("sr-a", "routine", "PL-A", "ACC-A"))
        put(base, service_request("sr-b", "stat", "PL-B", "ACC-B"))
        assert poller.poll_once() == 2
        assert book.get("P:PL-B").order.priority == OrderPriorityValues.STAT  # type: ignore[union-attr]
        assert poller.poll_once() == 0  # nothing changed since
        cancelled = service_request("sr-b", "stat", "PL-B", "ACC-B") | {"status": "revoked"}
        put(base, cancelled)
        assert poller.poll_once() == 1
        assert book.get("P:PL-B").order.status == OrderStatusValues.CANCELLED  # type: ignore[union-attr]
        assert len(heard) == 3
        book.close()
