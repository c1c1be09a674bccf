"""The one error tree of dxassist, shared by models/, serving/ and training/.

::

    DxAssistError
    ├── InputRejected            expected outcome: NOT_SCREENED with a ReasonCode, never a score
    │   ├── InvalidDicom         not DICOM, truncated, corrupt header
    │   ├── UnsupportedStudy     readable, but not what any model accepts (modality, body part, view...)
    │   └── InvalidPixelData     no pixel data, undecodable, blank, too large, NaN after scaling
    ├── SourceError
    │   ├── StudyNotFound
    │   └── SourceUnavailable    retriable
    │       └── InputUnreadable  a batch job's input file could not be read (retried by the next run)
    ├── ModelError
    │   ├── ModelIntegrityError  checksum or signature mismatch: fatal before any session exists
    │   │   └── PinnedVersionMismatch this node lacks the version a deployment pinned, or its digests differ
    │   ├── ManifestError        manifest malformed or inconsistent with the artifact
    │   │   └── SignatureMismatch an imported graph's inputs/outputs disagree with its import spec
    │   ├── VersionExists        a registered version is immutable: register a new one
    │   ├── ParityError          exported ONNX disagrees with the PyTorch model: nothing written
    │   └── InferenceFailed      runtime failure or non-finite output (never read as "negative")
    ├── ReplicaUnavailable       a Serve replica stayed unreachable through every retry
    ├── SinkError
    │   └── DeliveryFailed       retriable; the outbox keeps the result
    │       └── DeliveryRejected the receiver refused it for good: dead letter, no retry
    ├── AdmissionRefused         the service takes no new work now (HTTP 503 + Retry-After)
    │   ├── QueueFull            the queue for this priority is full
    │   └── ServiceDraining      the service is shutting down
    ├── RequestRejected          a request refused for what it says (HTTP 4xx, never retried as is)
    │   ├── InvalidIdentifier    a UID in a request field or inside an uploaded file is not a DICOM UID
    │   ├── IdempotencyKeyReused an Idempotency-Key already used for a different request
    │   └── InvalidOrderMessage  an inbound order (HL7 v2, FHIR) refused: HL7 ACK AE/AR with ERR, HTTP 422
    └── ResultsDatabaseError     the results database (SQLite/PostgreSQL) is unreachable or failed
        ├── ResultsSchemaError   the schema is newer than this code or cannot be migrated
        └── ResultsConflict      a write broke a constraint (duplicate key, append-only row)

Where an error stops, it becomes data in exactly one place each: an ``InputRejected`` becomes a
NOT_SCREENED image with its ``ReasonCode`` (``serving.core.screening``); a failed screening job
records a ``JobFailureValues`` code (``serving.online.service``); HTTP answers come from the
exception handlers registered in ``serving.online.api``.

Messages never carry patient values (names, IDs, accession numbers, UIDs). They name the
parameter or attribute and the reason; callers add their own request id.
"""

from __future__ import annotations

from enum import StrEnum


class ReasonCode(StrEnum):
    """Why a study (or one image of it) was not screened. Stable strings: they reach the EMR."""

    NOT_DICOM = "NOT_DICOM"
    CORRUPT_FILE = "CORRUPT_FILE"
    NO_PIXEL_DATA = "NO_PIXEL_DATA"
    UNSUPPORTED_TRANSFER_SYNTAX = "UNSUPPORTED_TRANSFER_SYNTAX"
    DECODE_FAILED = "DECODE_FAILED"
    IMAGE_TOO_LARGE = "IMAGE_TOO_LARGE"
    IMAGE_TOO_SMALL = "IMAGE_TOO_SMALL"
    BLANK_IMAGE = "BLANK_IMAGE"
    UNSUPPORTED_SOP_CLASS = "UNSUPPORTED_SOP_CLASS"
    UNSUPPORTED_MODALITY = "UNSUPPORTED_MODALITY"
    UNSUPPORTED_BODY_PART = "UNSUPPORTED_BODY_PART"
    UNSUPPORTED_VIEW = "UNSUPPORTED_VIEW"
    UNSUPPORTED_PHOTOMETRIC = "UNSUPPORTED_PHOTOMETRIC"
    NO_USABLE_IMAGE = "NO_USABLE_IMAGE"
    #: the pixels (or the header's own technical facts) disagree with what the header claims:
    #: a mask, an MR/CT/ultrasound image or a colour picture labelled as a radiograph
    CONTENT_MISMATCH = "CONTENT_MISMATCH"
    #: the image looks like nothing the model was trained on (its OOD gate refused it)
    OUT_OF_DISTRIBUTION = "OUT_OF_DISTRIBUTION"
    INFERENCE_FAILED = "INFERENCE_FAILED"


class JobFailureValues(StrEnum):
    """Why a screening job ended FAILED (no result): stable codes for API clients."""

    TIMEOUT = "TIMEOUT"
    STUDY_NOT_FOUND = "STUDY_NOT_FOUND"
    SOURCE_UNAVAILABLE = "SOURCE_UNAVAILABLE"
    INTERNAL_ERROR = "INTERNAL_ERROR"
    #: the uploaded instances could not be read on any attempt (never a NOT_SCREENED result)
    UPLOAD_UNAVAILABLE = "UPLOAD_UNAVAILABLE"


class DxAssistError(Exception):
    """Root of every error dxassist raises on purpose."""


class InputRejected(DxAssistError):
    """The input is not screened; ``reason`` says why (goes to the result, not only the log)."""

    def __init__(self, reason: ReasonCode, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class InvalidDicom(InputRejected):
    """Not a DICOM file, or a DICOM file that cannot be parsed."""


class UnsupportedStudy(InputRejected):
    """A readable DICOM image that no configured model accepts."""


class InvalidPixelData(InputRejected):
    """Pixel data missing, undecodable, or unusable after decoding."""


class SourceError(DxAssistError):
    """The DICOM store could not provide a study."""


class StudyNotFound(SourceError):
    """The study is not in the store."""


class SourceUnavailable(SourceError):
    """The store is down or too slow; the caller may retry."""


class InputUnreadable(SourceUnavailable):
    """A batch job could not read an input file (gone, unreadable, I/O error): the study is
    recorded as not read, never as a finished NOT_SCREENED result, and the next run retries it."""


class UploadUnavailable(SourceError):
    """The instances of an upload (or of a pushed study) cannot be read here now: their rows are
    gone from the results database, or an older job's spool folder is not on this node. The job
    is retried (by this or another ingress), never finished as NOT_SCREENED."""


class ModelError(DxAssistError):
    """A model could not be loaded or run."""


class ModelIntegrityError(ModelError):
    """The artifact's checksum does not match its manifest."""


class PinnedVersionMismatch(ModelIntegrityError):
    """A Serve replica was deployed with a model version pinned by the driver (exact version,
    manifest and artifact sha256) that this node's registry does not hold as pinned: missing,
    or with other digests. The replica refuses to start; it never screens with another version."""


class ReplicaUnavailable(DxAssistError):
    """The Serve replicas of one stage (fetcher, model) stayed unreachable (died, node lost)
    through every bounded retry of a call; the study was not screened."""


class ManifestError(ModelError):
    """The manifest is malformed, or does not match the artifact's signature."""


class SignatureMismatch(ManifestError):
    """``dxassist models import``: the ONNX graph's inputs/outputs (names, rank, channels, size,
    dtype) disagree with the import spec (labels, preprocessing). Nothing is staged."""


class VersionExists(ModelError):
    """The model version is already registered; registered versions never change."""


class ParityError(ModelError):
    """The exported ONNX model does not reproduce the PyTorch model within tolerance."""


class InferenceFailed(ModelError):
    """The model failed at run time or produced non-finite scores."""


class SinkError(DxAssistError):
    """A result could not be delivered."""


class DeliveryFailed(SinkError):
    """Delivery failed; the result stays in the outbox for a retry."""


class DeliveryRejected(DeliveryFailed):
    """The receiver refused the delivery for good (HL7 AR, FHIR 4xx): dead-lettered, not retried."""


class AdmissionRefused(DxAssistError):
    """The service admits no new work now; the caller may retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class QueueFull(AdmissionRefused):
    """The queue for the requested priority is full."""


class ServiceDraining(AdmissionRefused):
    """The service is shutting down and admits nothing new."""

    def __init__(self, message: str = "service is shutting down", retry_after_s: int = 30) -> None:
        super().__init__(message, retry_after_s)


class ResultsDatabaseError(DxAssistError):
    """The results database cannot be reached or failed a statement (never names the DSN)."""


class ResultsSchemaError(ResultsDatabaseError):
    """The database schema is not one this code can use: newer than its migrations, or a
    migration failed. The operator runs ``dxassist db upgrade`` with a matching dxassist."""


class ResultsConflict(ResultsDatabaseError):
    """A write broke a constraint (a duplicate key, an update of an append-only row); nothing
    of that transaction was written."""


class RequestRejected(DxAssistError):
    """The API refuses a request for what it says; ``status_code`` is the HTTP answer."""

    status_code = 422


class InvalidIdentifier(RequestRejected):
    """A UID (request field, or inside an uploaded file) is not ``[0-9]+(.[0-9]+)*`` of at most
    64 characters. The message names the field, never the value."""


class IdempotencyKeyReused(RequestRejected):
    """The ``Idempotency-Key`` was already used by this client for a different request body."""


class InvalidOrderMessage(RequestRejected):
    """An inbound order message (HL7 v2 over MLLP, a FHIR notification) refused for what it
    says: ``ack_code`` (``AE``/``AR``) and ``hl7_error`` (HL7 table 0357) are what the HL7
    listener answers in MSA-1 and ERR-3. The message names the field, never its value."""

    def __init__(self, message: str, ack_code: str = "AE", hl7_error: str = "207") -> None:
        super().__init__(message)
        self.ack_code = ack_code
        self.hl7_error = hl7_error
