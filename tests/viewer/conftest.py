"""Real browser tests: Debian's chromium driven by Playwright (never a downloaded browser build),
against real servers (Orthanc from Debian, the dxassist service, the pinned OHIF dist)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import OrthancServer, start_orthanc

CHROMIUM = "/usr/bin/chromium"
#: SwiftShader gives WebGL2 without a GPU (OHIF's viewport needs it)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-sync",
    "--no-first-run",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian chromium is required (scripts/install_servers.sh installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    server, proc = start_orthanc(tmp_path / "orthanc")
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
