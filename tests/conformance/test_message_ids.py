"""HL7 MSH-10 ids: stable for one delivery, new for every screening (also for results stored
before results had an id of their own)."""

from __future__ import annotations

import json

from models.results import ScreeningResult
from serving.emr.hl7_messages import message_control_id


def test_a_result_stored_without_an_id_gets_the_same_one_on_every_load() -> None:
    stored = {"study_instance_uid": "1.2.3", "study_ref": "r", "outcome": "SCREENED", "duration_ms": 12.5}
    first = ScreeningResult.model_validate_json(json.dumps(stored))
    again = ScreeningResult.model_validate_json(json.dumps(stored))
    other = ScreeningResult.model_validate_json(json.dumps(stored | {"duration_ms": 13.0}))
    assert first.result_id and first.result_id == again.result_id != other.result_id
    assert message_control_id(first, "hl7") == message_control_id(again, "hl7")


def test_each_sink_and_each_result_has_its_own_control_id() -> None:
    a = ScreeningResult(study_instance_uid="1.2.3", study_ref="r", outcome="SCREENED", result_id="a" * 32)
    b = a.model_copy(update={"result_id": "b" * 32})
    ids = {message_control_id(r, sink) for r in (a, b) for sink in ("hl7", "hl7-triage")}
    assert len(ids) == 4 and all(len(i) == 20 for i in ids)
    assert a.model_copy(update={"duration_ms": 1.0}).result_id == a.result_id  # a copy keeps its id
