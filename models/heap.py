"""The C heap of a process that handles one multi-megabyte image after another.

glibc's malloc serves buffers above its mmap threshold (128 KiB at first, raised by itself after
such a buffer is freed) with fresh ``mmap`` pages and gives the top of its heap back whenever more
than its trim threshold is free there. For a loop that allocates and frees a few frame-sized
arrays per image, that means faulting the same megabytes in again for every image: a 1024 px
radiograph took 10 ms to decode in a decode worker instead of 6.

``keep_heap_for_reuse`` fixes both thresholds so that buffers up to ``REUSE_BELOW_BYTES`` come
from the heap and up to ``KEEP_FREE_BYTES`` of free heap stays between images, and caps the
arenas at ``MAX_ARENAS``: ``trim_heap`` (``malloc_trim(0)``) gives every free page back once the
work goes idle, except the free top of each extra arena (a thread's arena), which only shrinks
past the trim threshold (the service kept 90 MB after a 200-upload burst with glibc's arena per
thread, under 30 MB with two). Elsewhere than glibc (musl, macOS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any, Final

#: buffers up to this size are taken from the heap (and reused), not mapped for each image
REUSE_BELOW_BYTES: Final = 32 * 1024 * 1024
#: free heap kept between images (given back by ``trim_heap`` when the work goes idle)
KEEP_FREE_BYTES: Final = 64 * 1024 * 1024
#: malloc arenas (threads share them): each extra one keeps its free top after a trim
MAX_ARENAS: Final = 2

_M_TRIM_THRESHOLD: Final = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD: Final = -3
_M_ARENA_MAX: Final = -8


@functools.cache
def _libc() -> Any | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def keep_heap_for_reuse() -> bool:
    """Fix malloc's mmap and trim thresholds and its arena count (see the module docstring); True
    where it could. Call it early: arenas that threads created before stay."""
    libc = _libc()
    if libc is None:
        return False
    settings = (
        (_M_MMAP_THRESHOLD, REUSE_BELOW_BYTES),
        (_M_TRIM_THRESHOLD, KEEP_FREE_BYTES),
        (_M_ARENA_MAX, MAX_ARENAS),
    )
    applied = True
    for param, value in settings:  # every one, even after one failed
        applied = bool(libc.mallopt(param, value)) and applied
    return applied


def trim_heap() -> bool:
    """``malloc_trim(0)`` where the C library has it; True when it released something."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False
