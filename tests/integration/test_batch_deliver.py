"""`dxassist screen --uids ... --out DIR --deliver`: archived studies from a real Orthanc reach the
real FHIR server, a real MLLP listener and Orthanc itself (the SR) through the outbox, exactly
once per study, counted at the receivers; running the same job again delivers nothing new."""

from __future__ import annotations

from pathlib import Path

import hl7
import pydicom
import pytest
from typer.testing import CliRunner

from models.synthetic.cxr import generate_cxr_dataset
from serving.cli.main import app
from serving.persistence.outbox import Outbox
from tests.conformance.receivers import fhir_search, fhir_server, mllp_listener
from tests.conftest import orthanc_settings_file
from tests.integration.conftest import OrthancServer
from tests.integration.test_pacs_flows import _sr_count

pytestmark = [pytest.mark.integration, pytest.mark.own_process]


def test_batch_job_delivers_each_study_exactly_once_to_fhir_hl7_and_the_pacs(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    import ray

    folder = tmp_path / "archive"
    generate_cxr_dataset(folder, 3, seed=616, size=(320, 320), encodings=("explicit",))
    uids = []
    for path in sorted(folder.glob("*.dcm")):
        orthanc.upload(path)
        uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID))
    (tmp_path / "uids.txt").write_text("\n".join(uids))
    with fhir_server() as fhir, mllp_listener() as listener:
        settings = orthanc_settings_file(
            tmp_path,
            orthanc,
            store={"write_results": True, "write_objects": ["sr"]},
            emr={"fhir": {"url": f"{fhir}/fhir/R4"}, "hl7": {"host": "127.0.0.1", "port": listener.port}},
        )
        command = ["screen", "--uids", str(tmp_path / "uids.txt"), "--out", str(tmp_path / "job"), "--deliver"]
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            first = CliRunner().invoke(app, [*command, "--settings", str(settings)])
            assert first.exit_code in (0, 1), first.output
            again = CliRunner().invoke(app, [*command, "--settings", str(settings)])  # resumed: all done
            assert again.exit_code in (0, 1), again.output
        finally:
            ray.shutdown()
        outbox = Outbox(tmp_path / "results.sqlite3")
        status = outbox.status()
        outbox.close()
        assert (status.pending, status.dead, status.done) == (0, 0, 9)  # 3 studies x 3 sinks
        reports = fhir_search(fhir, "DiagnosticReport")
        assert len(reports) == 3
        assert len(listener.accepted) == 3 and len(listener.received) == 3
        oru_studies = {
            str(hl7.parse(m).segment("OBR")[3]) for m in listener.messages
        }  # one ORU per study (accession as filler)
        assert len(oru_studies) == 3
        assert [_sr_count(orthanc, uid) for uid in uids] == [1, 1, 1]
