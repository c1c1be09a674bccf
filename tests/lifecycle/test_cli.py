"""The lifecycle verbs from the command line, as the README walk-through runs them: import an
ONNX file with its spec (and refuse a wrong one with exit 1 and the typed error's name), shadow,
promote, versions, rollback (audited, who and why) against a settings file's results database."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from models.importing import derive_version
from models.registry import REGISTRY_ROOT, resolve
from serving.persistence.lifecycle import LifecycleStore
from tests.lifecycle.conftest import chest_spec, write_spec
from tests.lifecycle.test_import import _export


def _dxassist(registry: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DXASSIST_REGISTRY": str(registry), "DXASSIST_SCREENING__DECODE_ISOLATION": "inline"}
    return subprocess.run(
        [sys.executable, "-m", "serving.cli.main", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_import_from_the_command_line(tmp_path: Path, site_folder: Path) -> None:
    registry = tmp_path / "registry"
    onnx = _export(tmp_path / "vendor.onnx", labels=2)
    spec = write_spec(tmp_path / "spec.yaml", chest_spec("vendor-cxr", "2.0.0", ["pneumothorax", "cardiomegaly"]))
    run = _dxassist(registry, "models", "import", str(onnx), "--spec", str(spec), "--ood-folder", str(site_folder))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "logits[?, 2]" in run.stdout and "registered vendor-cxr@2.0.0" in run.stdout
    assert resolve("vendor-cxr", "2.0.0", registry).manifest.ood is not None
    wrong = write_spec(tmp_path / "wrong.yaml", chest_spec("vendor-cxr", "2.0.1", ["pneumothorax"]))
    run = _dxassist(registry, "models", "import", str(onnx), "--spec", str(wrong), "--ood-folder", str(site_folder))
    assert run.returncode == 1 and "SignatureMismatch" in run.stdout
    assert not (registry / "vendor-cxr" / "2.0.1").exists()


def test_shadow_promote_rollback_from_the_command_line(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    shutil.copytree(REGISTRY_ROOT / "cxr-triage" / "1.0.0", registry / "cxr-triage" / "1.0.0")
    derive_version("cxr-triage", "1.0.0", "1.0.1", {"pneumothorax": (0.5, "test: threshold 0.5")}, root=registry)
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "models": [{"id": "cxr-triage", "version": "1.0.0"}],
                "results": {"sqlite_path": str(tmp_path / "results.sqlite3")},
            }
        )
    )
    s = ("--settings", str(settings))
    assert _dxassist(registry, "models", "shadow", "cxr-triage@1.0.1", *s).returncode == 0
    run = _dxassist(registry, "models", "versions", "cxr-triage", *s)
    assert "active cxr-triage@1.0.0; shadow ['1.0.1']" in run.stdout
    missing = _dxassist(registry, "models", "promote", "cxr-triage@9.9.9", "--reason", "typo", *s)
    assert missing.returncode == 1
    run = _dxassist(registry, "models", "promote", "cxr-triage@1.0.1", "--reason", "validated", "--actor", "dr-ml", *s)
    assert run.returncode == 0 and "1.0.0 -> 1.0.1" in run.stdout
    run = _dxassist(registry, "models", "rollback", "cxr-triage", "--reason", "alerts", "--actor", "dr-ml", *s)
    assert run.returncode == 0 and "1.0.1 -> 1.0.0" in run.stdout
    store = LifecycleStore(tmp_path / "results.sqlite3")
    assert [(e.action, e.to_version, e.actor, e.reason) for e in store.events("cxr-triage")] == [
        ("promote", "1.0.1", "dr-ml", "validated"),
        ("rollback", "1.0.0", "dr-ml", "alerts"),
    ]
    assert store.active_versions() == {"cxr-triage": "1.0.0"} and store.shadow_versions() == {}
    store.close()


def test_bundle_import_from_the_command_line_runs_the_training_exporter(tmp_path: Path, site_folder: Path) -> None:
    from tests.lifecycle.test_import import _bundle

    registry = tmp_path / "registry"
    bundle = _bundle(tmp_path / "bundle", torchscript=False)
    spec = write_spec(tmp_path / "spec.yaml", chest_spec("bundle-cxr", "1.0.0", ["pneumothorax", "cardiomegaly"]))
    run = _dxassist(
        registry, "models", "import", "--bundle", str(bundle), "--spec", str(spec), "--ood-folder", str(site_folder)
    )
    assert run.returncode == 0, run.stdout + run.stderr
    loaded = resolve("bundle-cxr", "1.0.0", registry)
    card = (loaded.directory / "MODEL_CARD.md").read_text()
    assert loaded.manifest.ood is not None and "MONAI Bundle" in card
    parity = card.split("per output: ")[1].split(" (gate")[0]
    assert all(float(part.split()[1]) <= 1e-4 for part in parity.split(", "))
