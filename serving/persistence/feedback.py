"""Readers' feedback as labels: what a radiologist's verdicts say each finding of a study truly is.

A verdict is about the AI's call on one finding of one screening (``POST
/v1/screenings/{id}/feedback``): ``agree`` keeps the call (positive stays 1, negative stays 0),
``disagree`` reverses it, ``uncertain`` decides nothing. Each reader's *latest* verdict per
finding counts (a reader who changes their mind adds a row); readers who contradict each other
decide nothing, and neither does a verdict on a key the screening did not report. Findings no
reader judged have no label here: they are unknown, not negative.

``feedback_labels`` reads every screening with feedback and merges them per study (a study
screened twice, e.g. before and after a promotion, keeps the labels both agree on). It is what
``dxassist models feedback-export`` writes and what ``dxassist export`` uses to correct the AI's
labels for retraining.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from models.results import ScreeningResult
from serving.persistence.migrate import open_migrated
from serving.persistence.schema import VerdictValues, feedback, screenings


@dataclass(frozen=True)
class Verdict:
    """One stored verdict, as far as labels need it (``FeedbackRecord`` carries more)."""

    reader_id: str
    finding_key: str
    verdict: VerdictValues


def reader_labels(result: ScreeningResult, verdicts: Iterable[Verdict]) -> dict[str, int]:
    """Finding key -> 1/0 as the readers decided it (see the module docstring); ``verdicts`` in
    the order they were given."""
    latest: dict[tuple[str, str], VerdictValues] = {}
    for v in verdicts:
        latest[(v.reader_id, v.finding_key)] = VerdictValues(v.verdict)
    ai = {f.key: int(f.positive) for f in result.findings}
    votes: dict[str, set[int]] = {}
    for (_reader, key), verdict in latest.items():
        if key not in ai or verdict is VerdictValues.UNCERTAIN:
            continue
        votes.setdefault(key, set()).add(ai[key] if verdict is VerdictValues.AGREE else 1 - ai[key])
    return {key: next(iter(v)) for key, v in sorted(votes.items()) if len(v) == 1}


@dataclass
class StudyLabels:
    """The readers' labels of one study, merged over its screenings with feedback."""

    study_instance_uid: str
    labels: dict[str, int]
    readers: int
    #: ``id@version`` of the models whose findings were judged
    models: list[str] = field(default_factory=list)
    #: label keys the screenings disagreed on (left out of ``labels``)
    conflicts: set[str] = field(default_factory=set)


def feedback_labels(store_target: Path | str, *, model_id: str | None = None) -> list[StudyLabels]:
    """Every study a reader gave feedback on, with the labels the verdicts decide, oldest first.
    ``model_id`` keeps only findings of that model. Studies whose verdicts decide nothing are
    left out."""
    db = open_migrated(store_target)
    try:
        with db.read() as conn:
            rows = conn.execute(
                select(
                    feedback.c.screening_id, feedback.c.reader_id, feedback.c.finding_key, feedback.c.verdict
                ).order_by(feedback.c.id)
            ).all()
            judged = {str(r[0]) for r in rows}
            found = (
                conn.execute(
                    select(screenings.c.screening_uuid, screenings.c.study_instance_uid, screenings.c.result_json)
                    .where(screenings.c.screening_uuid.in_(sorted(judged)))
                    .order_by(screenings.c.id)
                ).all()
                if judged
                else []
            )
    finally:
        db.close()
    verdicts: dict[str, list[Verdict]] = {}
    for screening_id, reader, key, verdict in rows:
        verdicts.setdefault(str(screening_id), []).append(Verdict(str(reader), str(key), VerdictValues(verdict)))
    studies: dict[str, StudyLabels] = {}
    for screening_uuid, study_uid, result_json in found:
        result = ScreeningResult.model_validate_json(result_json)
        if model_id is not None:
            result = result.model_copy(update={"findings": [f for f in result.findings if f.model_id == model_id]})
        given = verdicts.get(str(screening_uuid), [])
        labels = reader_labels(result, given)
        if not labels:
            continue
        entry = studies.setdefault(str(study_uid), StudyLabels(str(study_uid), {}, 0))
        entry.readers = max(entry.readers, len({v.reader_id for v in given}))
        for ref in sorted({f"{f.model_id}@{f.model_version}" for f in result.findings if f.key in labels}):
            if ref not in entry.models:
                entry.models.append(ref)
        for key, value in labels.items():
            if key in entry.conflicts:
                continue
            if entry.labels.get(key, value) != value:
                entry.conflicts.add(key)
                del entry.labels[key]
            else:
                entry.labels[key] = value
    return [s for s in studies.values() if s.labels]
