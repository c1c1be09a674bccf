"""PHI stays at the edges: pseudonymous study references and a logging safety net.

The primary control is that no code logs identifiers: modules log ``study_ref`` (an HMAC of the
Study Instance UID with a deployment secret), reason codes and timings. ``PhiRedactionFilter``
is the safety net: it refuses datasets in log arguments and masks anything shaped like a DICOM
UID. ``install_logging`` also keeps pydicom's own logger (which can echo element values) quiet
and routes Python warnings (pydicom's quote element values) through the filter, text withheld.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
from typing import Final

_UID_LIKE: Final = re.compile(r"\b[0-2](?:\.(?:0|[1-9]\d*)){4,}\b")
_FIELDS: Final = ("request_id", "study_ref", "model", "stage", "duration_ms", "outcome", "reason")


def study_ref(study_instance_uid: str, key: bytes) -> str:
    """A stable pseudonym for a study: first 16 hex digits of HMAC-SHA256(key, UID)."""
    return hmac.new(key, study_instance_uid.encode("utf-8"), hashlib.sha256).hexdigest()[:16]


class PhiRedactionFilter(logging.Filter):
    """Masks UID-shaped strings and drops dataset arguments from every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == _WARNINGS_LOGGER:
            if not getattr(record, "_text_withheld", False):  # the logger's filter and the handler's
                record.msg, record.args = _withheld_warning(record.getMessage()), None
                record._text_withheld = True
            return True
        args = record.args
        if args:
            items = args if isinstance(args, tuple) else (args,)
            if any(type(a).__name__ in {"Dataset", "FileDataset", "DataElement"} for a in items):
                record.msg, record.args = "[log record dropped: it carried a DICOM dataset]", None
                return True
        message = record.getMessage()
        redacted = _UID_LIKE.sub("[uid]", message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


_WARNINGS_LOGGER: Final = "py.warnings"
_WARNING_HEAD: Final = re.compile(r"^(?P<file>.*?):\d+: (?P<category>\w+): ")


def _withheld_warning(text: str) -> str:
    """A captured Python warning without its text: library warnings quote element values
    (pydicom's "Invalid value for VR UI: '1.2...'"), so only the category and the file name of
    the code that warned are kept."""
    match = _WARNING_HEAD.match(text)
    if match is None:
        return "Python warning (text withheld: warnings can quote header values)"
    where = match.group("file").replace("\\", "/").rsplit("/", 1)[-1]
    return f"{match.group('category')} from {where} (text withheld: warnings can quote header values)"


def capture_warnings() -> None:
    """Route Python warnings into logging, through ``PhiRedactionFilter`` on their own logger
    (so that the text is withheld whatever handler prints them, Ray's included). Idempotent."""
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger(_WARNINGS_LOGGER)
    if not any(isinstance(f, PhiRedactionFilter) for f in warnings_logger.filters):
        warnings_logger.addFilter(PhiRedactionFilter())


class JsonFormatter(logging.Formatter):
    """One JSON object per line with a fixed set of allowed extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for field in _FIELDS:
            if hasattr(record, field):
                out[field] = getattr(record, field)
        return json.dumps(out, default=str)


def install_logging(level: int = logging.INFO, *, json_lines: bool = True) -> None:
    """Configure the root handler once: JSON lines to stderr, with the redaction filter;
    Python warnings go through the same filter (``capture_warnings``)."""
    capture_warnings()
    root = logging.getLogger()
    for handler in root.handlers:
        if getattr(handler, "_dxassist", False):
            return
    handler = logging.StreamHandler()
    handler._dxassist = True  # type: ignore[attr-defined]
    handler.addFilter(PhiRedactionFilter())
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    # these log request URLs / association details: DICOMweb paths carry Study Instance UIDs
    for noisy in ("httpx", "httpcore", "pynetdicom", "uvicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
