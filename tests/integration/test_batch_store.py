"""Batch job over StudyInstanceUIDs fetched from a real Orthanc (DICOMweb)."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from models.synthetic.cxr import generate_cxr_dataset
from serving.batch.job import run_batch_job
from tests.conftest import orthanc_settings_file
from tests.integration.conftest import OrthancServer

pytestmark = [pytest.mark.integration, pytest.mark.own_process]


def test_batch_job_from_dicomweb_uids_with_errors_retried(orthanc: OrthancServer, tmp_path: Path) -> None:
    import ray

    folder = tmp_path / "archive"
    generate_cxr_dataset(folder, 3, seed=515, size=(320, 320), encodings=("j2k", "explicit"))
    uids = []
    for path in sorted(folder.glob("*.dcm")):
        orthanc.upload(path)
        uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID))
    settings = orthanc_settings_file(tmp_path, orthanc)
    missing = "1.2.826.0.1.3680043.8.498.4242"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_batch_job([], tmp_path / "job", settings_path=str(settings), study_uids=[*uids, missing])
        again = run_batch_job([], tmp_path / "job", settings_path=str(settings), study_uids=[*uids, missing])
    finally:
        ray.shutdown()
    assert summary.screened_now == 3 and {r.study_instance_uid for r in summary.results} == set(uids)
    assert all(r.outcome == "SCREENED" for r in summary.results)
    assert list(summary.errors) == [missing] and "StudyNotFound" in summary.errors[missing]
    assert again.skipped == 3 and again.screened_now == 0 and list(again.errors) == [missing]
