"""Screening ids: time-ordered UUIDs (version 7, RFC 9562), monotonic within a process.

The first 48 bits are the Unix time in milliseconds, so ids sort by creation time across
processes and databases; within one millisecond a 12-bit counter (``rand_a``, RFC 9562 method 1)
keeps the ids of one process strictly increasing. Written as 32 hex digits (the API's form).
"""

from __future__ import annotations

import secrets
import threading
import time
import uuid

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def new_screening_uuid(at_ms: int | None = None) -> str:
    """A new id; ``at_ms`` (Unix ms) dates it explicitly (backfilling old rows), never going back."""
    global _last_ms, _counter
    with _lock:
        now = time.time_ns() // 1_000_000 if at_ms is None else at_ms
        if now <= _last_ms:
            now, _counter = _last_ms, _counter + 1
            if _counter > 0xFFF:  # 4096 ids in one millisecond: borrow the next one
                now, _counter = now + 1, 0
        else:
            _counter = secrets.randbits(10)  # random start, room to count up within the ms
        _last_ms = now
        value = (now & ((1 << 48) - 1)) << 80 | 0x7 << 76 | _counter << 64 | 0b10 << 62 | secrets.randbits(62)
    return uuid.UUID(int=value).hex
