"""Every site-specific identity lives in settings: the documented defaults are the real ones,
and a filled-in site (the prod example) goes out in every message field it names."""

from __future__ import annotations

from pathlib import Path

import hl7
import pytest

from models.results import OutcomeValues, ScreeningResult
from serving.emr.fhir_resources import as_json, fhir_resources
from serving.emr.hl7_messages import oru_r01
from serving.settings import Settings, SiteIdentity
from tests.conformance.validators import validate_hl7

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "settings"


def test_dev_settings_document_the_defaults() -> None:
    assert Settings.load(CONFIGS / "dev.yaml").emr.identity == SiteIdentity()


def test_a_filled_in_site_goes_out_in_its_messages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DXASSIST_SECURITY__STUDY_REF_KEY", "s" * 40)
    monkeypatch.setenv("DXASSIST_API__TOKENS", "ops:Zx8-q2Lm9vT4rP0wY7bN3cK6hJ1dF5gS")
    identity = Settings.load(CONFIGS / "prod.example.yaml").emr.identity
    result = ScreeningResult(
        study_instance_uid="1.2.3",
        study_ref="r",
        outcome=OutcomeValues.NOT_SCREENED,
        reason="UNSUPPORTED_VIEW",
        patient_id="MRN1",
        patient_name="DOE^JANE",
        accession_number="ACC1",
    )
    er7 = oru_r01(result, identity, "X1")
    message = hl7.parse(er7)
    msh, pid = message.segment("MSH"), message.segment("PID")
    assert [str(msh[i]).split("^")[0] for i in (3, 4, 5, 6)] == ["DXASSIST", "RADAI", "EPIC", "EXH"]
    assert str(msh[3]) == "DXASSIST^2.16.840.1.113883.19.77.1^ISO"
    assert str(pid[3]) == "MRN1^^^EXHMRN&2.16.840.1.113883.19.77.2&ISO^MR"
    assert str(message.segment("ORC")[2]) == "ACC1^EPIC" and str(message.segment("ORC")[3]) == "ACC1^RADIANT"
    assert validate_hl7(er7).clean
    report = as_json(fhir_resources(result, identity)[-1])
    assert report["subject"]["identifier"]["system"] == "urn:oid:2.16.840.1.113883.19.77.2"
    assert report["basedOn"][0]["identifier"]["system"] == "urn:oid:2.16.840.1.113883.19.77.3"
    assert report["conclusionCode"][0]["coding"][1]["system"] == "urn:oid:2.16.840.1.113883.19.77.5"


def test_a_wrong_site_setting_is_refused_at_load() -> None:
    with pytest.raises(ValueError, match="study_timezone"):
        SiteIdentity(study_timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="local_coding_system"):
        SiteIdentity(local_coding_system="DXA")
