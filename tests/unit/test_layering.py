"""training -> models <- serving: serving and models never import torch, MONAI or training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import models

REPO = Path(__file__).resolve().parents[2]


def _modules_after_import(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    return set(out.split())


def test_serving_does_not_import_torch_monai_or_training() -> None:
    loaded = _modules_after_import(
        "import serving.cli.main, serving.core.screening, serving.cli.demo, serving.online.factory, models.predictor, models.registry"
    )
    for forbidden in ("torch", "monai", "training"):
        assert not any(m == forbidden or m.startswith(forbidden + ".") for m in loaded), forbidden


def test_models_package_is_this_repository() -> None:
    # a generic top-level name could collide with another installed "models" package
    assert Path(models.__file__).resolve().parent == REPO / "models"


def test_import_contracts_hold() -> None:
    """The import-linter contracts in pyproject.toml (models runtime-light, serving layers) are kept."""
    lint = Path(sys.executable).parent / "lint-imports"
    run = subprocess.run([str(lint), "--no-cache"], capture_output=True, text=True, cwd=REPO)
    assert run.returncode == 0, run.stdout[-4000:]
    assert "0 broken" in run.stdout
