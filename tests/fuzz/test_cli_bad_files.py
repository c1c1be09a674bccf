"""``dxassist screen`` over a folder with hostile files: every good file is screened, the rest
are NOT_SCREENED with a reason, no traceback, and the exit code says which (0/1/2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from serving.cli.main import app
from tests.conftest import write_synthetic_cxr
from tests.fuzz import crafted

runner = CliRunner()


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    path = tmp_path / "settings.yaml"
    settings = {
        "environment": "test",
        "models": [{"id": "cxr-triage", "providers": "cpu"}],
        "store": {"kind": "local", "path": str(tmp_path / "store")},
        "results": {"sqlite_path": str(tmp_path / "results.sqlite3")},
    }
    path.write_text(yaml.safe_dump(settings))
    return path


def _screen(folder: Path, settings_file: Path) -> tuple[int, dict[str, dict[str, object]], str]:
    result = runner.invoke(
        app, ["screen", str(folder), "--json", "--per-file", "--no-save", "--settings", str(settings_file)]
    )
    by_label = {r["images"][0]["label"]: r for r in json.loads(result.stdout)} if result.stdout.strip() else {}
    return result.exit_code, by_label, result.output


def test_one_bad_file_does_not_stop_the_others(tmp_path: Path, settings_file: Path) -> None:
    folder = tmp_path / "mixed"
    good = write_synthetic_cxr(folder / "good.dcm", seed=41)
    panic = bytearray(write_synthetic_cxr(tmp_path / "rle.dcm", encoding="rle").read_bytes())
    panic[27736] = 220  # the Rust RLE decoder panics on this byte (tests/fuzz/test_findings.py)
    (folder / "rle_panic.dcm").write_bytes(bytes(panic))
    (folder / "voi_lut.dcm").write_bytes(crafted.bad_voi_lut("depth-7"))
    (folder / "deferred.dcm").write_bytes(crafted.deferred_rows_error())
    (folder / "not_dicom.dcm").write_bytes(b"%PDF-1.7\n" + bytes(100))
    code, results, output = _screen(folder, settings_file)
    assert code == 1, output
    assert "Traceback" not in output
    assert results[str(good)]["outcome"] == "SCREENED"
    reasons = {Path(label).name: r["reason"] for label, r in results.items() if r["outcome"] == "NOT_SCREENED"}
    assert reasons == {
        "rle_panic.dcm": "DECODE_FAILED",
        "voi_lut.dcm": "DECODE_FAILED",
        "deferred.dcm": "CORRUPT_FILE",
        "not_dicom.dcm": "NOT_DICOM",
    }


def test_all_screened_exits_zero(tmp_path: Path, settings_file: Path) -> None:
    write_synthetic_cxr(tmp_path / "ok" / "a.dcm", seed=42)
    code, results, output = _screen(tmp_path / "ok", settings_file)
    assert code == 0, output
    assert [r["outcome"] for r in results.values()] == ["SCREENED"]


def test_exit_codes_are_documented_in_help() -> None:
    text = runner.invoke(app, ["screen", "--help"]).output
    assert "Exit codes" in text and "0  every study screened" in text and "1  some study not screened" in text
    assert "2  usage or configuration error" in text
