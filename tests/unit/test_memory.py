"""The heap kept for reuse while work flows and given back when it goes idle (models.heap)."""

from __future__ import annotations

import psutil
import pytest

from models.heap import _libc, trim_heap


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 1e6


def test_freed_heap_memory_goes_back_to_the_os_only_after_a_trim() -> None:
    if _libc() is None:
        pytest.skip("the C library has no malloc_trim (not glibc)")
    blocks = [bytes(4096) for _ in range(40_000)]  # about 160 MB from malloc's heap
    above = bytes(4096)  # allocated after them: free() alone cannot give the heap back
    grown = _rss_mb()
    del blocks
    freed = _rss_mb()
    trim_heap()
    trimmed = _rss_mb()
    assert freed > grown - 40, (grown, freed)  # freed but still resident: what a burst leaves
    assert trimmed < freed - 100, (freed, trimmed)
    assert above  # kept alive until here


def test_the_service_opens_model_sessions_without_the_cpu_memory_arena() -> None:
    """ORT's arena would keep the largest concurrent peak of inference buffers for good; the
    setting turns it back on where a site wants it."""
    from serving.online.factory import build_predictor
    from serving.settings import ModelSettings

    default = build_predictor(ModelSettings(id="cxr-triage", providers="cpu"))
    assert default.session.get_session_options().enable_cpu_mem_arena is False
    wanted = build_predictor(ModelSettings(id="cxr-triage", providers="cpu", cpu_mem_arena=True))
    assert wanted.session.get_session_options().enable_cpu_mem_arena is True


_REUSE_PROBE = """
import sys
import psutil
from models.heap import keep_heap_for_reuse, trim_heap

def rss():
    return psutil.Process().memory_info().rss / 1e6

if sys.argv[1] == "keep":
    assert keep_heap_for_reuse()
before = rss()
block = bytearray(16_000_000)  # a frame-sized buffer, touched
del block
freed = rss()
trim_heap()
print(before, freed, rss())
"""


def _probe(mode: str) -> tuple[float, float, float]:
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _REUSE_PROBE, mode], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split()
    before, freed, trimmed = (float(v) for v in out)
    return before, freed, trimmed


def test_kept_heap_holds_a_freed_frame_buffer_for_reuse_until_trimmed() -> None:
    """With the thresholds fixed, a freed 16 MB buffer stays in the heap for the next image (no
    fresh pages to fault in) and goes back on ``trim_heap``; glibc's defaults unmap it at once."""
    if _libc() is None:
        pytest.skip("the C library has no mallopt/malloc_trim (not glibc)")
    before, freed, trimmed = _probe("keep")
    assert freed - before > 12, (before, freed)
    assert trimmed - before < 4, (before, trimmed)
    before, freed, _ = _probe("default")
    assert freed - before < 4, (before, freed)
