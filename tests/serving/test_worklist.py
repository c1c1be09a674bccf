"""Worklist order: STAT never lowered by the AI, critical findings first, ageing so nothing waits forever."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from models.results import OutcomeValues, ScreeningResult, TriagePriorityValues
from serving.online.api import worklist_rank

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def result(priority: TriagePriorityValues | None) -> ScreeningResult:
    outcome = OutcomeValues.SCREENED if priority else OutcomeValues.NOT_SCREENED
    return ScreeningResult(study_instance_uid="1.2.3", study_ref="r", outcome=outcome, priority=priority)


def at(minutes_ago: float) -> str:
    return (NOW - timedelta(minutes=minutes_ago)).isoformat(timespec="milliseconds")


def test_stat_request_is_never_lowered_by_the_ai() -> None:
    assert worklist_rank(result(TriagePriorityValues.ROUTINE), "stat", at(0), NOW, 60) == (0, "STAT requested")


def test_ai_levels_order_the_list() -> None:
    ranks = [worklist_rank(result(p), "routine", at(0), NOW, 60)[0] for p in TriagePriorityValues]
    assert ranks == [1, 2, 3]  # URGENT, ABNORMAL, ROUTINE
    assert worklist_rank(result(None), None, at(0), NOW, 60)[0] == 3  # not screened: read as routine


def test_ageing_moves_waiting_studies_up_but_never_above_stat() -> None:
    assert worklist_rank(result(TriagePriorityValues.ROUTINE), None, at(59), NOW, 60)[0] == 3
    rank, why = worklist_rank(result(TriagePriorityValues.ROUTINE), None, at(61), NOW, 60)
    assert rank == 2 and "aged 61 min" in why
    assert worklist_rank(result(TriagePriorityValues.ROUTINE), None, at(600), NOW, 60)[0] == 1
