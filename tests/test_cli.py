"""The dxassist CLI end to end on the embedded defaults (real models, real files, SQLite)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from serving.cli.main import app
from tests.conftest import write_synthetic_cxr

runner = CliRunner()


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "cpu"}, {"id": "endoscopy-polyp", "providers": "cpu"}],
                "store": {"kind": "local", "path": str(tmp_path / "store")},
                "results": {"sqlite_path": str(tmp_path / "results.sqlite3")},
            }
        )
    )
    return path


def test_screen_json_reports_findings_and_reasons(tmp_path: Path, settings_file: Path, rg1: dict[str, Path]) -> None:
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"not dicom at all" * 10)
    synthetic = write_synthetic_cxr(tmp_path / "synthetic.dcm", seed=8)
    files = [rg1["RG1_UNCR"], rg1["RG3_UNCR"], synthetic, bad]
    args = ["screen", *map(str, files), "--json", "--settings", str(settings_file)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output  # some files not screened (documented exit code)
    out = {r["images"][0]["label"]: r for r in json.loads(result.stdout)}
    # the real chest RG1: the phantom-trained reference model refuses it, with its reason
    real = out[str(rg1["RG1_UNCR"])]
    assert (real["outcome"], real["reason"], real["findings"]) == ("NOT_SCREENED", "OUT_OF_DISTRIBUTION", [])
    assert "distance" in real["reason_detail"] and "limit" in real["reason_detail"]
    chest = out[str(synthetic)]
    assert chest["outcome"] == "SCREENED" and chest["models"][0].startswith("cxr-triage@")
    assert {f["key"] for f in chest["findings"]} == {
        "cardiomegaly",
        "pleural_effusion",
        "pneumothorax",
        "nodule_mass",
        "consolidation",
    }
    assert all({"threshold", "model_version", "score", "positive"} <= f.keys() for f in chest["findings"])
    assert out[str(rg1["RG3_UNCR"])]["reason"] == "UNSUPPORTED_BODY_PART"
    assert out[str(bad)]["reason"] == "NOT_DICOM"
    rows = sqlite3.connect(tmp_path / "results.sqlite3").execute("SELECT outcome, reason FROM screenings").fetchall()
    assert sorted(rows) == sorted(
        [
            ("SCREENED", None),
            ("NOT_SCREENED", "OUT_OF_DISTRIBUTION"),
            ("NOT_SCREENED", "UNSUPPORTED_BODY_PART"),
            ("NOT_SCREENED", "NOT_DICOM"),
        ]
    )


def test_screen_folder_groups_a_study(tmp_path: Path, settings_file: Path) -> None:
    folder = tmp_path / "study"
    write_synthetic_cxr(folder / "one.dcm", seed=31)
    write_synthetic_cxr(folder / "two.dcm", seed=31, photometric="MONOCHROME1")
    result = runner.invoke(app, ["screen", str(folder), "--json", "--no-save", "--settings", str(settings_file)])
    assert result.exit_code == 0, result.output
    results = json.loads(result.stdout)
    assert len(results) == 1 and len(results[0]["images"]) == 2


def test_missing_path_exits_with_usage_error(settings_file: Path) -> None:
    result = runner.invoke(app, ["screen", "/nonexistent/x.dcm", "--settings", str(settings_file)])
    assert result.exit_code == 2 and "no such file" in result.output


def test_demo_prints_findings_and_reasons(tmp_path: Path, settings_file: Path) -> None:
    result = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo"), "--settings", str(settings_file)])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "RG1_J2KR.dcm" in text and "cxr-triage@" in text and "threshold" in text
    # real RG1 refused with its reason; relabelled leg, MR and CT refused on their content
    assert "OUT_OF_DISTRIBUTION" in text and "CONTENT_MISMATCH" in text
    assert "UNSUPPORTED_BODY_PART" in text and "NOT_DICOM" in text and "UNSUPPORTED_VIEW" in text
    assert "CORRUPT_FILE" in text or "DECODE_FAILED" in text
    assert "endoscopy-polyp@" in text


def test_models_list_and_verify() -> None:
    listed = runner.invoke(app, ["models", "list"])
    assert listed.exit_code == 0 and "cxr-triage" in listed.output and "endoscopy-polyp" in listed.output
    verified = runner.invoke(app, ["models", "verify"])
    assert verified.exit_code == 0 and "FAIL" not in verified.output


def test_outbox_status_and_retry_of_dead_letters(tmp_path: Path, settings_file: Path) -> None:
    from models.results import ScreeningResult
    from serving.persistence.outbox import Outbox
    from serving.persistence.results import ResultsStore

    store = ResultsStore(tmp_path / "results.sqlite3")
    store.add_job("j1", "routine", "1.2.3", None)
    store.finish_job(
        "j1", ScreeningResult(study_instance_uid="1.2.3", study_ref="r", outcome="SCREENED"), sinks=["fhir", "hl7"]
    )
    outbox = Outbox(tmp_path / "results.sqlite3")
    (delivery_id, _, sink, _), _ = outbox.claim()
    outbox.mark(delivery_id, sink, 1, "DEAD", "receiver rejected the message (AR)")
    status = runner.invoke(app, ["outbox", "status", "--settings", str(settings_file)])
    assert status.exit_code == 0 and "dead: #1 fhir: receiver rejected the message (AR)" in status.output
    retried = runner.invoke(app, ["outbox", "retry", "--settings", str(settings_file)])
    assert retried.exit_code == 0 and "1 deliveries queued again" in retried.output
    assert outbox.status().pending == 2 and outbox.status().dead == 0
