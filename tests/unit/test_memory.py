"""The heap trim the online service runs when its work goes idle (serving.core.memory)."""

from __future__ import annotations

import psutil
import pytest

from serving.core.memory import HeapTrimmer, _malloc_trim, trim_heap


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 1e6


def test_freed_heap_memory_goes_back_to_the_os_only_after_a_trim() -> None:
    if _malloc_trim() is None:
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


def test_the_trimmer_runs_at_most_once_per_interval() -> None:
    trimmer = HeapTrimmer(min_interval_s=60.0)
    assert trimmer.due()
    assert not trimmer.due()
    assert HeapTrimmer(min_interval_s=0.0).due()


def test_the_service_opens_model_sessions_without_the_cpu_memory_arena() -> None:
    """ORT's arena would keep the largest concurrent peak of inference buffers for good; the
    setting turns it back on where a site wants it."""
    from serving.online.factory import build_predictor
    from serving.settings import ModelSettings

    default = build_predictor(ModelSettings(id="cxr-triage", providers="cpu"))
    assert default.session.get_session_options().enable_cpu_mem_arena is False
    wanted = build_predictor(ModelSettings(id="cxr-triage", providers="cpu", cpu_mem_arena=True))
    assert wanted.session.get_session_options().enable_cpu_mem_arena is True
