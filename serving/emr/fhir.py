"""FHIR R4 result sinks: the report (Device, Observations, DiagnosticReport) and the priority
proposal (Task), built by ``serving.emr.fhir_resources`` and written with PUT on stable ids.

Idempotency comes from stable keys, not from the transport: resource ids derive from the study,
model and finding, written with ``PUT`` (update-as-create), so a retry rewrites the same
resources and never adds a report. With ``fhir_references: resolve`` the sink first searches
the server for the Patient, the order (ServiceRequest by accession) and the ImagingStudy and
references each literally when exactly one matches; none found (or a search the server refuses)
leaves a reference by identifier, several found is refused (a human must say which). Bodies are
never logged.
"""

from __future__ import annotations

from typing import Any

import httpx
from fhir.resources.R4B.identifier import Identifier
from fhir.resources.R4B.reference import Reference
from fhir.resources.R4B.resource import Resource
from pydicom.dataset import Dataset

from models.errors import DeliveryFailed, DeliveryRejected
from models.results import ScreeningResult
from serving.emr.fhir_resources import (
    References,
    as_json,
    fhir_resources,
    fhir_triage_task,
    identifier_references,
)
from serving.emr.priority import raises_priority
from serving.settings import SiteIdentity


class FhirSink:
    """DiagnosticReport + Observations + Device to a FHIR R4 server, idempotent by PUT on stable
    ids; NOT_SCREENED studies get a report that says so (no observations)."""

    name = "fhir"
    #: the outbox gives this sink NOT_SCREENED results too
    reports_not_screened = True

    def __init__(
        self,
        base_url: str,
        *,
        identity: SiteIdentity | None = None,
        token: str | None = None,
        timeout_s: float = 10.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.identity = identity or SiteIdentity()
        self.client = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s, transport=transport
        )

    def deliver(self, delivery_id: int, result: ScreeningResult, evidence: list[Dataset]) -> None:
        if not result.study_instance_uid:
            return  # not even a study (a file that is not DICOM): nothing the EMR could file it under
        self._put(fhir_resources(result, self.identity, self.references(result)))

    def references(self, result: ScreeningResult) -> References:
        """Literal references where the server holds the target (``resolve``), else identifiers."""
        logical = identifier_references(result, self.identity)
        if self.identity.fhir_references == "identifier":
            return logical
        return References(
            patient=self._resolve(logical.patient),
            order=self._resolve(logical.order),
            study=self._resolve(logical.study) or logical.study,
        )

    def _resolve(self, reference: Reference | None) -> Reference | None:
        if reference is None or reference.identifier is None or reference.type is None:
            return reference
        identifier: Identifier = reference.identifier
        try:
            bundle = self._request(
                "GET", f"/{reference.type}", params={"identifier": f"{identifier.system}|{identifier.value}"}
            )
        except DeliveryRejected:
            return reference  # the server does not search this type for us: the logical reference stands
        ids = [
            e["resource"]["id"] for e in bundle.get("entry", []) if e.get("search", {}).get("mode", "match") == "match"
        ]
        if not ids:
            return reference
        if len(ids) > 1:
            raise DeliveryRejected(f"{len(ids)} {reference.type} resources carry the identifier: ambiguous")
        return Reference(reference=f"{reference.type}/{ids[0]}", identifier=identifier)

    def _put(self, resources: list[Resource]) -> None:
        for resource in resources:
            self._request("PUT", f"/{resource.get_resource_type()}/{resource.id}", json=as_json(resource))

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        what = path.split("/")[1]
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"FHIR server unreachable ({type(exc).__name__})") from exc
        if response.status_code in (200, 201):
            body: dict[str, Any] = response.json() if response.content else {}
            return body
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise DeliveryFailed(f"FHIR server answered HTTP {response.status_code}")
        raise DeliveryRejected(f"FHIR server refused {method} {what}: HTTP {response.status_code}")

    def close(self) -> None:
        self.client.close()


class FhirTriageSink(FhirSink):
    """The worklist priority update as a FHIR ``Task`` (``emr.fhir.priority_updates``); sends
    only when the AI raised the priority."""

    name = "fhir-triage"
    reports_not_screened = False

    def deliver(self, delivery_id: int, result: ScreeningResult, evidence: list[Dataset]) -> None:
        if raises_priority(result):
            self._put([fhir_triage_task(result, self.identity, self.references(result))])
