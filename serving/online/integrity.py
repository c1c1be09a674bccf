"""Result integrity at admission: which study an upload claims, what a request's idempotency hash
is, and the provenance a request's screening will carry.

The rules themselves (a store copy's result is the study's record, one dedupe key, idempotency
keys) are kept in the results store's transactions (``serving.persistence.results``); this module
only derives their inputs from a request.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from io import BytesIO

from pydicom import dcmread

from models.errors import InvalidIdentifier
from serving.core.uids import is_dicom_uid
from serving.online.pipeline import StudyRequest
from serving.persistence.results import Provenance
from serving.persistence.schema import SourceValues, TriggerValues


def upload_study_uid(files: Sequence[bytes]) -> str | None:
    """The Study Instance UID the uploaded files claim (None when none says).

    Only the header up to the UID is parsed (nothing converted, no pixels). A file that is not
    DICOM is left to input QA (it becomes NOT_SCREENED); a UID that is not a DICOM UID, or two
    files naming different studies, is refused: ``InvalidIdentifier`` (HTTP 422), naming no value.
    """
    found: str | None = None
    for data in files:
        try:
            with warnings.catch_warnings():  # pydicom's validation warnings quote the value
                warnings.simplefilter("ignore")
                header = dcmread(BytesIO(data), stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
                value = header.get("StudyInstanceUID")
        except Exception:  # not DICOM or truncated: input QA gives the precise reason later  # noqa: S112
            continue
        if value is None:
            continue
        uid = str(value)
        if not is_dicom_uid(uid):
            raise InvalidIdentifier("an uploaded file's StudyInstanceUID is not a valid DICOM UID")
        if found is not None and uid != found:
            raise InvalidIdentifier("uploaded files name more than one StudyInstanceUID (one study per upload)")
        found = uid
    return found


def request_hash(*parts: str) -> str:
    """The hash an ``Idempotency-Key`` is bound to, over the request's meaning."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def upload_hash(files: Sequence[bytes], priority: str) -> str:
    """``request_hash`` of an upload: its priority and every file's bytes, in order."""
    digest = hashlib.sha256(priority.encode() + b"\x00")
    for data in files:
        digest.update(data)
        digest.update(b"\x00")
    return digest.hexdigest()


def default_provenance(request: StudyRequest, requested_by: str) -> Provenance:
    """An API request: a PACS fetch when it names a study and spooled nothing, else an upload."""
    source = SourceValues.UPLOAD if request.spool_dir or request.files else SourceValues.PACS_FETCH
    return Provenance(source, TriggerValues.API, requested_by)
