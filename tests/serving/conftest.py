"""Fixtures of the service tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_synthetic_cxr


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A local store of five synthetic chest radiographs (one study each)."""
    for seed in (41, 42, 43, 44, 45):
        write_synthetic_cxr(tmp_path / "store" / f"s{seed}.dcm", seed=seed)
    return tmp_path / "store"
