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
        "import serving.cli, serving.screening, serving.demo, serving.factory, models.predictor, models.registry"
    )
    for forbidden in ("torch", "monai", "training"):
        assert not any(m == forbidden or m.startswith(forbidden + ".") for m in loaded), forbidden


def test_models_package_is_this_repository() -> None:
    # a generic top-level name could collide with another installed "models" package
    assert Path(models.__file__).resolve().parent == REPO / "models"


def test_source_files_import_in_the_allowed_direction() -> None:
    for path in (REPO / "models").rglob("*.py"):
        text = path.read_text()
        assert "from serving" not in text and "import serving" not in text, path
        assert "from training" not in text and "import torch" not in text, path
    for path in (REPO / "serving").rglob("*.py"):
        text = path.read_text()
        assert "from training" not in text and "import torch" not in text and "import monai" not in text, path
