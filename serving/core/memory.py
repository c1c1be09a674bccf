"""Give freed heap memory back to the operating system once a burst of work is over.

glibc's malloc keeps what Python frees in its arenas (one per thread that allocated) and, after
a large buffer was freed, raises its mmap threshold so that later buffers of that size come from
those arenas too: after a burst of multi-megabyte uploads the process stays at its peak although
nothing holds the memory any more. ``malloc_trim(0)`` returns the free pages of every arena.
Elsewhere than glibc (musl, macOS) there is nothing to call and ``trim_heap`` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
import time
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        function = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return function


def trim_heap() -> bool:
    """``malloc_trim(0)`` where the C library has it; True when it released something."""
    function = _malloc_trim()
    return bool(function(0)) if function is not None else False


class HeapTrimmer:
    """Calls ``trim_heap`` when work goes idle, at most once per ``min_interval_s``."""

    def __init__(self, min_interval_s: float = 5.0) -> None:
        self.min_interval_s = min_interval_s
        self._last = 0.0
        self._lock = threading.Lock()

    def due(self) -> bool:
        """True (and the interval restarts) when a trim may run now."""
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.min_interval_s:
                return False
            self._last = now
            return True
