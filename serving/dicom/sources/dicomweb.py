"""DICOMweb study source (QIDO-RS, WADO-RS) and sink (STOW-RS), on httpx.

* Every request has a timeout; connection errors, timeouts, 429 and 5xx are retried (tenacity:
  exponential backoff with jitter, capped), then raised as ``SourceUnavailable``. 404 is
  ``StudyNotFound``. Messages carry no UIDs.
* ``instances`` asks QIDO-RS for the study's instances with the attributes input QA needs and
  retrieves, by WADO-RS, only those a configured model could accept (a CT localizer or an SR in
  the study is never downloaded).
* Basic or bearer authentication. Query URLs are never logged (they can carry patient data).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import httpx
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from models.errors import SourceUnavailable, StudyNotFound
from models.manifest import ModelManifest
from serving.core.screening import InstanceInput

logger = logging.getLogger(__name__)

# QIDO attributes used to decide what to retrieve
_TAGS = {
    "SOPInstanceUID": "00080018",
    "SeriesInstanceUID": "0020000E",
    "SOPClassUID": "00080016",
    "Modality": "00080060",
    "BodyPartExamined": "00180015",
    "ViewPosition": "00185101",
}


@dataclass(frozen=True)
class QidoInstance:
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    body_part_examined: str
    view_position: str


def _value(item: dict[str, Any], keyword: str) -> str:
    values = item.get(_TAGS[keyword], {}).get("Value") or [""]
    return (
        str(values[0]).strip().upper()
        if keyword not in ("SOPInstanceUID", "SeriesInstanceUID", "SOPClassUID")
        else str(values[0])
    )


def could_accept(instance: QidoInstance, manifests: Sequence[ModelManifest]) -> bool:
    """Pre-filter from QIDO attributes; full input QA still runs on the retrieved file."""
    for m in manifests:
        acc = m.accepts
        if instance.modality not in acc.modality:
            continue
        if acc.sop_class_uid and instance.sop_class_uid not in acc.sop_class_uid:
            continue
        return True
    return False


def parse_multipart(content_type: str, body: bytes) -> list[bytes]:
    """Parts of a ``multipart/related`` response (WADO-RS), as raw bytes."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    if not message.is_multipart():
        raise SourceUnavailable("WADO-RS response is not multipart")
    parts = []
    for part in message.iter_parts():
        payload = part.get_payload(decode=True)
        if isinstance(payload, bytes):
            parts.append(payload)
    return parts


class _Retryable(Exception):
    """A failure another attempt may not repeat (connection, timeout, 429, 5xx); names no URL."""

    def __init__(self, failure: str) -> None:
        super().__init__(failure)
        self.failure = failure


def _log_retry(state: RetryCallState) -> None:
    failure = state.outcome.exception() if state.outcome is not None else None
    delay = state.next_action.sleep if state.next_action is not None else 0.0
    why = failure.failure if isinstance(failure, _Retryable) else type(failure).__name__
    logger.warning("DICOMweb request failed (%s), retry %d in %.2fs", why, state.attempt_number, delay)


class DicomWebSource:
    """A DICOMweb server (Orthanc's DICOMweb plugin, dcm4chee, a cloud PACS) as study source."""

    def __init__(
        self,
        base_url: str,
        *,
        username: str | None = None,
        password: str | None = None,
        token: str | None = None,
        timeout_s: float = 10.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        manifests: Sequence[ModelManifest] = (),
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        auth = httpx.BasicAuth(username, password or "") if username else None
        self.client = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, auth=auth, timeout=timeout_s, transport=transport
        )
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.manifests = list(manifests)
        self._sleep = sleep

    def _attempt(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """One request: the response, ``StudyNotFound``/``SourceUnavailable`` for answers that a
        retry cannot change (404, other 4xx), ``_Retryable`` for those it can."""
        try:
            response = self.client.request(method, url, **kwargs)
        except (httpx.TransportError, httpx.TimeoutException) as exc:
            raise _Retryable(type(exc).__name__) from None
        if response.status_code == 404:
            raise StudyNotFound("study not found in the DICOMweb store")
        if response.status_code >= 500 or response.status_code == 429:
            raise _Retryable(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise SourceUnavailable(f"DICOMweb store answered HTTP {response.status_code}")
        return response

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        """``_attempt`` with up to ``retries`` retries (tenacity): exponential backoff from
        ``backoff_s``, plus up to ``backoff_s`` of random jitter (clients that failed together do
        not retry together), each wait capped at ``max_backoff_s``."""
        retrying = Retrying(
            stop=stop_after_attempt(self.retries + 1),
            wait=wait_exponential_jitter(multiplier=self.backoff_s, max=self.max_backoff_s, jitter=self.backoff_s),
            retry=retry_if_exception_type(_Retryable),
            sleep=self._sleep,
            before_sleep=_log_retry,
            reraise=True,
        )
        try:
            return retrying(self._attempt, method, url, **kwargs)
        except _Retryable as exc:
            raise SourceUnavailable(
                f"DICOMweb store unavailable after {self.retries + 1} attempts ({exc.failure})"
            ) from None

    # -- QIDO-RS ---------------------------------------------------------------------------

    def search_studies(
        self,
        *,
        modality: str | None = None,
        study_date: str | None = None,
        study_instance_uid: str = "",
        accession_number: str = "",
        page_size: int = 500,
    ) -> list[str]:
        """Every Study Instance UID matching modality and a date or range (``YYYYMMDD-YYYYMMDD``),
        read page by page (QIDO-RS ``limit``/``offset``) until a short page.

        The modality is matched here on the returned ModalitiesInStudy rather than sent as a
        filter: some stores (Orthanc 1.10) apply ``offset`` before filtering on that computed
        attribute and answer every page after the first with nothing."""
        found: list[str] = []
        offset = 0
        while True:
            params: dict[str, str | int] = {"limit": page_size, "offset": offset, "includefield": "0020000D,00080061"}
            if study_date:
                params["StudyDate"] = study_date
            if study_instance_uid:
                params["StudyInstanceUID"] = study_instance_uid
            if accession_number:  # an inbound order known by accession only (serving.online.orders)
                params["AccessionNumber"] = accession_number
            response = self._request("GET", "/studies", params=params, headers={"Accept": "application/dicom+json"})
            items = [] if response.status_code == 204 or not response.content else response.json()
            for item in items:
                if "0020000D" not in item:
                    continue
                modalities = {str(m).upper() for m in item.get("00080061", {}).get("Value", [])}
                if modality is None or modality.upper() in modalities:
                    found.append(str(item["0020000D"]["Value"][0]))
            if len(items) < page_size:
                return found
            offset += len(items)

    def list_instances(self, study_instance_uid: str) -> list[QidoInstance]:
        params = {"includefield": ",".join(_TAGS.values())}
        response = self._request(
            "GET",
            f"/studies/{study_instance_uid}/instances",
            params=params,
            headers={"Accept": "application/dicom+json"},
        )
        listed = response.json() if response.status_code != 204 and response.content else []
        if not listed:  # servers answer an unknown study with 204, 404 or an empty list
            raise StudyNotFound("study not found in the DICOMweb store")
        return [
            QidoInstance(
                series_instance_uid=_value(i, "SeriesInstanceUID"),
                sop_instance_uid=_value(i, "SOPInstanceUID"),
                sop_class_uid=_value(i, "SOPClassUID"),
                modality=_value(i, "Modality"),
                body_part_examined=_value(i, "BodyPartExamined"),
                view_position=_value(i, "ViewPosition"),
            )
            for i in listed
        ]

    # -- WADO-RS ---------------------------------------------------------------------------

    def retrieve(self, study_instance_uid: str, instance: QidoInstance) -> bytes:
        url = (
            f"/studies/{study_instance_uid}/series/{instance.series_instance_uid}/instances/{instance.sop_instance_uid}"
        )
        response = self._request(
            "GET", url, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
        )
        parts = parse_multipart(response.headers.get("content-type", ""), response.content)
        if len(parts) != 1:
            raise SourceUnavailable(f"WADO-RS returned {len(parts)} parts for one instance")
        return parts[0]

    def instances(self, study_instance_uid: str) -> list[InstanceInput]:
        """The study's instances that a configured model could accept, retrieved as stored."""
        listed = self.list_instances(study_instance_uid)
        wanted = [i for i in listed if not self.manifests or could_accept(i, self.manifests)]
        if not wanted:
            # nothing a model takes: retrieve one instance so input QA can give the precise reason
            wanted = [i for i in listed if i.modality not in ("SR", "KO", "PR")][:1] or listed[:1]
        return [InstanceInput(self.retrieve(study_instance_uid, i), f"instance {n + 1}") for n, i in enumerate(wanted)]

    # -- STOW-RS ---------------------------------------------------------------------------

    def store(self, datasets: Sequence[Dataset]) -> None:
        """Store instances (e.g. an SR) with STOW-RS. Raises ``SourceUnavailable`` on failure."""
        boundary = "dxassist-stow-boundary"
        chunks = []
        for ds in datasets:
            buffer = DicomBytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            chunks.append(
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + buffer.getvalue() + b"\r\n"
            )
        body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
        response = self._request(
            "POST",
            "/studies",
            content=body,
            headers={
                "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
                "Accept": "application/dicom+json",
            },
        )
        if response.content:
            reply = response.json()
            failed = reply.get("00081198", {}).get("Value") or []  # Failed SOP Sequence: check value
            if failed:
                raise SourceUnavailable(f"STOW-RS refused {len(failed)} instance(s)")

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> DicomWebSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
