"""DICOM UID syntax (PS3.5 9.1): digits and dots, no empty component, at most 64 characters.

``fullmatch`` on purpose: with ``re.match`` and ``$`` a value with a trailing newline passes
(``$`` also matches before a final ``\\n``), and such a UID would name a different study in every
system that compares bytes. Leading zeros inside a component are tolerated (real archives have
them); padding (a trailing space or NUL) is not: callers strip DICOM padding before asking.
"""

from __future__ import annotations

import re

MAX_UID_LENGTH = 64
_UID = re.compile(r"[0-9]+(?:\.[0-9]+)*")


def is_dicom_uid(value: object) -> bool:
    """True for a syntactically valid UID string (``str`` only, nothing after the last digit)."""
    return isinstance(value, str) and len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None
