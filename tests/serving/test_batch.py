"""Batch screening on Ray Data: resumable, same results as the online path, tables and report."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from models.predictor import OnnxPredictor
from models.registry import resolve
from models.synthetic.cxr import generate_cxr_dataset
from serving.batch.job import Topology, run_batch_job
from serving.batch.report import write_report, write_tables
from serving.core.screening import StudyScreener, screen_paths
from serving.persistence.ledger import Ledger
from serving.persistence.results import ResultsStore
from tests.own_process import in_child


@pytest.fixture(scope="module")
def ray_local() -> Iterator[None]:
    """A local Ray for the tests that need one: they are ``own_process`` tests, so only the
    child process that runs a test's body starts it."""
    if not in_child():
        yield
        return
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def archive(tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "archive"
    generate_cxr_dataset(folder, 8, seed=303, size=(384, 384), prevalence=0.4, encodings=("explicit", "j2k", "rle"))
    (folder / "broken.dcm").write_bytes(b"definitely not DICOM" * 50)
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "cpu"}],
                "results": {"sqlite_path": str(tmp_path / "results.sqlite3")},
                "security": {"study_ref_key": "batch-test-key"},
            }
        )
    )
    return folder, settings


@pytest.mark.own_process
def test_interrupted_job_resumes_without_redoing_work(
    ray_local: None, archive: tuple[Path, Path], tmp_path: Path
) -> None:
    folder, settings = archive
    out = tmp_path / "job"
    first = run_batch_job([folder], out, settings_path=str(settings), stop_after=4)
    assert first.planned == 9 and first.screened_now == 4 and first.skipped == 0
    second = run_batch_job([folder], out, settings_path=str(settings))
    assert second.skipped == 4 and second.screened_now == 5
    ledger = Ledger(out / "ledger.sqlite3")
    keys = [k for k, _ in ledger.results()]
    assert len(keys) == len(set(keys)) == 9
    # nothing screened twice: the results store got one row per study across both runs
    assert ResultsStore(tmp_path / "results.sqlite3").count() == 9
    third = run_batch_job([folder], out, settings_path=str(settings))
    assert third.screened_now == 0 and third.skipped == 9


@pytest.mark.own_process
def test_crash_between_the_results_database_and_the_ledger_records_once(
    ray_local: None, archive: tuple[Path, Path], tmp_path: Path
) -> None:
    """A study whose result was committed but whose ledger row was not (the process died between
    the two commits) is screened again by the rerun and still has exactly one result."""
    import sqlite3

    folder, settings = archive
    out = tmp_path / "job"
    first = run_batch_job([folder], out, settings_path=str(settings), stop_after=3)
    assert first.screened_now == 3
    store = ResultsStore(tmp_path / "results.sqlite3")
    assert store.count() == 3
    # the crash: the ledger loses the last study it had recorded, the results database keeps it
    with sqlite3.connect(out / "ledger.sqlite3") as conn:
        (lost,) = conn.execute("SELECT study_key FROM studies ORDER BY finished_at DESC, rowid DESC").fetchone()
        conn.execute("DELETE FROM studies WHERE study_key = ?", (lost,))
    second = run_batch_job([folder], out, settings_path=str(settings))
    assert second.skipped == 2 and second.screened_now == 7  # the lost one is screened again
    assert store.count() == 9  # and not recorded twice
    assert store.job(Ledger(out / "ledger.sqlite3").job_id(lost)) is not None
    store.close()


@pytest.mark.own_process
@pytest.mark.parametrize("topology", ["fused", "staged"])
def test_batch_results_equal_the_online_path(
    ray_local: None, archive: tuple[Path, Path], tmp_path: Path, topology: Topology
) -> None:
    folder, settings = archive
    chosen = tmp_path / "settings.yaml"
    chosen.write_text(settings.read_text() + f"\nbatch:\n  topology: {topology}\n")
    summary = run_batch_job([folder], tmp_path / "job", settings_path=str(chosen), save_to_results_store=False)
    screener = StudyScreener([OnnxPredictor(resolve("cxr-triage"), providers="cpu")], study_ref_key=b"batch-test-key")
    online = {r.study_instance_uid: r for r in screen_paths(screener, sorted(folder.glob("cxr_*.dcm")))}
    batch = {r.study_instance_uid: r for r in summary.results if r.study_instance_uid}
    assert batch.keys() == online.keys()
    for uid, r in batch.items():
        assert [(f.key, f.positive) for f in r.findings] == [(f.key, f.positive) for f in online[uid].findings]
        assert [f.score for f in r.findings] == pytest.approx([f.score for f in online[uid].findings], abs=1e-4)
        assert r.study_ref == online[uid].study_ref
        assert (r.patient_id, r.accession_number) == (online[uid].patient_id, online[uid].accession_number)
        assert r.patient_id  # the EMR needs it: the header travels back with the scores
    broken = [r for r in summary.results if not r.study_instance_uid]
    assert [r.reason for r in broken] == ["NOT_DICOM"]


@pytest.mark.own_process
def test_tables_and_report_with_labelled_auroc(ray_local: None, archive: tuple[Path, Path], tmp_path: Path) -> None:
    folder, settings = archive
    out = tmp_path / "job"
    summary = run_batch_job([folder], out, settings_path=str(settings), save_to_results_store=False)
    csv_path, parquet_path = write_tables(summary.results, out)
    rows = list(csv.DictReader(csv_path.read_text().splitlines()))
    assert len(rows) == 9 and {"outcome", "reason", "score_pneumothorax", "positive_pneumothorax"} <= rows[0].keys()
    import pyarrow.parquet as pq

    assert pq.read_table(parquet_path).num_rows == 9
    report = write_report(summary.results, out, inputs=[folder], seconds=summary.seconds, screened_now=9, skipped=0)
    text = report.read_text()
    assert "Flagged studies" in text and "NOT_SCREENED: NOT_DICOM" in text and "AUROC" in text
    for png in ("outcomes.png", "scores.png", "roc.png"):
        assert (out / png).stat().st_size > 1000
    for r in summary.results:  # no UID in the report (it names studies by file and study_ref)
        if r.study_instance_uid:
            assert r.study_instance_uid not in text


@pytest.mark.own_process
def test_unreadable_input_is_retried_never_a_finished_not_screened(
    ray_local: None, archive: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that vanishes between planning and reading (an archive purged, a mount gone) is
    InputUnreadable: no result, exit 1 with the count, and the next run screens it."""
    from typer.testing import CliRunner

    import serving.batch.job as job
    from serving.cli.main import app

    folder, settings = archive
    victim = sorted(folder.glob("cxr_*.dcm"))[2]
    saved = victim.read_bytes()
    planned = job.plan_studies

    def plan_then_lose_one(inputs: list[Path]) -> list[job.PlannedStudy]:
        studies = planned(inputs)
        victim.unlink()
        return studies

    monkeypatch.setattr(job, "plan_studies", plan_then_lose_one)
    out = tmp_path / "job"
    args = ["screen", str(folder), "--out", str(out), "--no-save", "--settings", str(settings)]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 1, first.output
    assert "1 studies could not be read or fetched (1 InputUnreadable)" in " ".join(first.output.split())
    ledger = Ledger(out / "ledger.sqlite3")
    errors, done = ledger.errors(), [r for _, r in ledger.results()]
    ledger.close()
    assert len(done) == 8 and len(errors) == 1  # 9 planned: the lost one is not a result
    assert all(r.reason != "CORRUPT_FILE" for r in done)
    ((key, why),) = errors.items()
    assert why.startswith("InputUnreadable:") and str(folder) not in why
    monkeypatch.setattr(job, "plan_studies", planned)
    victim.write_bytes(saved)
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 1, second.output  # the archive's broken.dcm stays NOT_SCREENED
    assert "1 screened now" in second.output and "could not be read" not in second.output
    ledger = Ledger(out / "ledger.sqlite3")
    assert key in ledger.done() and ledger.errors() == {}
    ledger.close()


def test_read_inputs_ships_bytes_and_types_read_failures(tmp_path: Path) -> None:
    import json
    import pickle

    import numpy as np

    from serving.batch.job import read_inputs

    small, big = tmp_path / "a.dcm", tmp_path / "b.dcm"
    small.write_bytes(b"x" * 2000)
    big.write_bytes(b"y" * 5000)
    batch = {
        "study": np.array(["s1", "s2"], dtype=object),
        "files": np.array([json.dumps([str(small), str(big)]), json.dumps([str(tmp_path / "gone.dcm")])], dtype=object),
    }
    out = read_inputs(batch, max_file_bytes=4096)
    assert pickle.loads(out["inputs"][0]) == [(str(small), b"x" * 2000), (str(big), 5000)]  # too big: its size
    assert out["error"][0] == ""
    assert pickle.loads(out["inputs"][1]) == []
    assert out["error"][1].startswith("InputUnreadable:") and "gone" not in out["error"][1]


def test_single_node_prepare_actor_reads_its_rows_files(archive: tuple[Path, Path], tmp_path: Path) -> None:
    """In the job's own one-node cluster there is no read stage: the prepare actor is handed rows
    that name files, reads them itself and prepares them; a file gone by then is the row's
    InputUnreadable error, as from the read stage (the study stays to do)."""
    import json
    import pickle

    import numpy as np

    from serving.batch.job import PrepareStage
    from serving.batch.shipping import pack
    from serving.core.screening import PreparedImage
    from serving.settings import Settings

    folder, settings_path = archive
    settings = Settings.load(str(settings_path))
    stage = PrepareStage(settings, [pack(resolve("cxr-triage"))])
    present = sorted(folder.glob("cxr_*.dcm"))[0]
    batch = {
        "study": np.array(["s1", "s2"], dtype=object),
        "files": np.array([json.dumps([str(present)]), json.dumps([str(tmp_path / "gone.dcm")])], dtype=object),
    }
    out = stage(batch)
    (image,) = pickle.loads(out["prepared"][0])
    assert isinstance(image, PreparedImage) and image.tensors.shape[1:] == (1, 224, 224)
    assert out["error"][0] == ""
    assert pickle.loads(out["prepared"][1]) == []
    assert out["error"][1].startswith("InputUnreadable:") and "gone" not in out["error"][1]


def test_local_runtime_resumes_and_equals_the_online_path(archive: tuple[Path, Path], tmp_path: Path) -> None:
    """``batch.runtime: local`` (a process pool on this machine, no Ray): the same stage, the same
    results as the online path, the same ledger: an interrupted job resumes without redoing work
    and nothing is recorded twice (ADR 0027)."""
    folder, settings = archive
    chosen = tmp_path / "local.yaml"
    chosen.write_text(settings.read_text() + "\nbatch:\n  runtime: local\n  workers: 2\n")
    out = tmp_path / "job"
    first = run_batch_job([folder], out, settings_path=str(chosen), stop_after=4)
    assert first.planned == 9 and first.screened_now == 4
    second = run_batch_job([folder], out, settings_path=str(chosen))
    assert second.skipped == 4 and second.screened_now == 5
    assert set(second.nodes) == {""}  # no Ray node: the pool ran it
    assert ResultsStore(tmp_path / "results.sqlite3").count() == 9
    screener = StudyScreener([OnnxPredictor(resolve("cxr-triage"), providers="cpu")], study_ref_key=b"batch-test-key")
    online = {r.study_instance_uid: r for r in screen_paths(screener, sorted(folder.glob("cxr_*.dcm")))}
    batch = {r.study_instance_uid: r for r in second.results if r.study_instance_uid}
    assert batch.keys() == online.keys()
    for uid, r in batch.items():
        assert [f.score for f in r.findings] == pytest.approx([f.score for f in online[uid].findings], abs=1e-4)
        assert (r.study_ref, r.patient_id) == (online[uid].study_ref, online[uid].patient_id)
    assert [r.reason for r in second.results if not r.study_instance_uid] == ["NOT_DICOM"]


def test_runtime_auto_pools_a_one_machine_cpu_job_and_leaves_clusters_to_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    import serving.batch.job as job

    monkeypatch.setattr(job, "cuda_device_count", lambda: 0)
    assert job.choose_runtime("auto", None) == "local"
    assert job.choose_runtime("auto", "ray://head:10001") == "ray"
    assert job.choose_runtime("ray", None) == "ray" and job.choose_runtime("local", "x") == "local"
    monkeypatch.setattr(job, "cuda_device_count", lambda: 1)  # a GPU: the staged topology on Ray
    assert job.choose_runtime("auto", None) == "ray"
