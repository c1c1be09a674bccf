"""Images a chest model has no basis for get no score, through every door a result leaves by.

The real lower leg ``RG3`` (four encodings) and pydicom's MR, CT and ultrasound images, each
relabelled CR / CHEST / PA, and the real chest ``RG1`` (a population the phantom-trained
reference models never saw) are screened through the CLI, the HTTP API and a batch job with
the registered reference models: each is NOT_SCREENED with a content reason and carries no
score; synthetic chests and endoscopy frames are still screened.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from models.errors import ReasonCode
from models.predictor import OnnxPredictor
from models.registry import resolve
from models.synthetic.endoscopy import generate_endoscopy_demo
from serving.cli.main import app
from serving.core.screening import StudyScreener
from serving.dicom.sources.local import LocalFolderSource
from serving.online.api import LazyService, create_api
from serving.online.pipeline import LocalPipeline
from serving.online.service import ScreeningService
from serving.persistence.results import ResultsStore
from serving.settings import ApiSettings
from tests.conftest import relabel_as_chest, write_synthetic_cxr

CONTENT = {ReasonCode.CONTENT_MISMATCH.value, ReasonCode.OUT_OF_DISTRIBUTION.value}
RELABELLED = ("RG3_UNCR", "RG3_UNCI", "RG3_J2KR", "RG3_J2KI", "MR2_UNCR", "693_UNCR", "US1_UNCR")
REAL_CHEST = ("RG1_UNCR", "RG1_J2KI")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """name -> file: refused ones (relabelled and real chest) and ones that must be screened."""
    from pydicom.data import get_testdata_file

    root = tmp_path_factory.mktemp("gate")
    files = {name: relabel_as_chest(name, root) for name in RELABELLED}
    files.update({name: Path(str(get_testdata_file(f"{name}.dcm"))) for name in REAL_CHEST})
    files["synthetic_chest"] = write_synthetic_cxr(root / "synthetic_chest.dcm", seed=17)
    generate_endoscopy_demo(root / "endo", seed=5)
    files["endoscopy"] = root / "endo" / "frame_polyp.dcm"
    return files


def _check(results: dict[str, dict]) -> None:
    for name in (*RELABELLED, *REAL_CHEST):
        r = results[name]
        assert r["outcome"] == "NOT_SCREENED", name
        assert r["reason"] in CONTENT, (name, r["reason"])
        assert r["findings"] == [] and r["priority"] is None, name
        assert "CHEST" not in r["reason_detail"] and "EXTREMITY" not in r["reason_detail"]
    for name in REAL_CHEST:
        assert results[name]["reason"] == ReasonCode.OUT_OF_DISTRIBUTION.value
        assert "limit" in results[name]["reason_detail"]
    assert results["synthetic_chest"]["outcome"] == "SCREENED"
    assert results["synthetic_chest"]["models"][0].startswith("cxr-triage@")
    assert results["endoscopy"]["outcome"] == "SCREENED"


def test_cli_refuses_what_the_models_cannot_vouch_for(inputs: dict[str, Path], tmp_path: Path) -> None:
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "cpu"}, {"id": "endoscopy-polyp", "providers": "cpu"}],
                "results": {"sqlite_path": str(tmp_path / "results.sqlite3")},
            }
        )
    )
    args = ["screen", *map(str, inputs.values()), "--json", "--per-file", "--no-save", "--settings", str(settings)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output  # some files not screened (documented exit code)
    by_label = {r["images"][0]["label"]: r for r in json.loads(result.stdout)}
    _check({name: by_label[str(path)] for name, path in inputs.items()})
    table = CliRunner().invoke(app, ["screen", str(inputs["RG1_UNCR"]), "--no-save", "--settings", str(settings)])
    assert "OUT_OF_DISTRIBUTION" in table.output and "limit" in table.output


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("api")
    predictors = [OnnxPredictor(resolve(m), providers="cpu") for m in ("cxr-triage", "endoscopy-polyp")]
    screener = StudyScreener(predictors, study_ref_key=b"gate-e2e")
    store = root / "store"
    store.mkdir()

    def factory() -> ScreeningService:
        pipeline = LocalPipeline(screener, LocalFolderSource(store))
        return ScreeningService(
            pipeline, screener, ResultsStore(root / "results.sqlite3"), ApiSettings(spool_dir=root / "spool")
        )

    lazy = LazyService(factory)
    with TestClient(create_api(lazy), client=("127.0.0.1", 50000)) as client:
        client.get("/readyz")
        yield client
        if lazy.started is not None:
            client.portal.call(lazy.started.drain, 5.0)  # type: ignore[union-attr]


def test_api_refuses_what_the_models_cannot_vouch_for(inputs: dict[str, Path], api: TestClient) -> None:
    results = {}
    for name, path in inputs.items():
        upload = [("files", (path.name, path.read_bytes(), "application/dicom"))]
        answer = api.post("/v1/screenings/upload", files=upload, params={"wait": 60})
        assert answer.status_code == 202 and answer.json()["status"] == "DONE", answer.text
        results[name] = answer.json()["result"]
    _check(results)
    image = results["RG1_UNCR"]["images"][0]
    assert image["ood_distance"] is not None and image["reason"] == "OUT_OF_DISTRIBUTION"
    assert results["synthetic_chest"]["images"][0]["ood_distance"] is not None
    # the worklist never shows a refused study with an AI priority
    refused = {results[n]["study_instance_uid"] for n in (*RELABELLED, *REAL_CHEST)}
    for item in api.get("/v1/worklist").json():
        if item["study_instance_uid"] in refused:
            assert item.get("ai_priority") in (None, "")


@pytest.mark.slow
@pytest.mark.own_process
def test_batch_job_refuses_them_and_reports_the_gate(inputs: dict[str, Path], tmp_path: Path) -> None:
    import ray

    from serving.batch.job import run_batch_job
    from serving.batch.report import write_report, write_tables

    folder = tmp_path / "archive"
    folder.mkdir()
    for name, path in inputs.items():
        (folder / f"{name}.dcm").write_bytes(path.read_bytes())
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "cpu"}, {"id": "endoscopy-polyp", "providers": "cpu"}],
                "results": {"sqlite_path": str(tmp_path / "results.sqlite3")},
            }
        )
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_batch_job([folder], tmp_path / "job", settings_path=str(settings), save_to_results_store=False)
    finally:
        ray.shutdown()
    # the batch groups files by study (the four RG3 encodings are one study): check each image,
    # and that a study whose every image was refused is NOT_SCREENED with no finding
    per_image = {}
    for r in summary.results:
        for image in r.images:
            per_image[Path(image.label).stem] = {
                "outcome": image.outcome.value,
                "reason": image.reason.value if image.reason else None,
                "reason_detail": image.reason_detail or "",
                "findings": [] if image.outcome.value == "NOT_SCREENED" else [f.key for f in r.findings],
                "priority": None if image.outcome.value == "NOT_SCREENED" else r.priority,
                "models": [image.model_ref or ""],
            }
        if all(i.outcome.value == "NOT_SCREENED" for i in r.images):
            assert r.outcome.value == "NOT_SCREENED" and r.findings == [] and r.priority is None
    _check(per_image)
    out = tmp_path / "job"
    write_tables(summary.results, out)
    text = write_report(
        summary.results, out, inputs=[folder], seconds=1.0, screened_now=len(inputs), skipped=0
    ).read_text()
    assert "Content gate" in text and "OUT_OF_DISTRIBUTION" in text and "CONTENT_MISMATCH" in text
    assert (out / "ood.png").stat().st_size > 1000
    csv_text = (out / "results.csv").read_text()
    assert "ood_distance" in csv_text.splitlines()[0]
