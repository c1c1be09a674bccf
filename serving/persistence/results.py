"""The results store: one record per screening (never overwritten), the jobs, evidence headers,
idempotency keys, the audit log and readers' feedback, in SQLite (embedded default) or PostgreSQL.

Integrity rules kept here, in transactions, so that every caller (API, SCP, webhook, poller, CLI,
batch, several replicas) gets them:

* Each screening is its own row with its provenance (``source``, ``triggered_by``,
  ``requested_by``) and a public time-ordered id; the database refuses UPDATE of a screening.
* A study's *reference* result (worklist, ``latest``, EMR delivery) is its newest screening of the
  store's copy (PACS fetch or SCP push); an upload or local file counts only while no store copy
  was screened. An upload claiming another study's UID therefore never displaces the PACS result.
* One dedupe key for store-sourced jobs (the Study UID): at most one QUEUED/RUNNING job per key
  (a partial unique index), and automatic triggers add none for a study already screened from
  the store. Uploads have no key: they never block a PACS screening.
* ``Idempotency-Key``: (client, key) -> (request hash, job); a retry gets the same job, a
  different request with the same key is ``IdempotencyKeyReused``.

The database holds PHI (the clinical record of what the AI said); nothing from it is logged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import Connection, Text, and_, case, cast, delete, func, insert, literal, or_, select, update

from models.errors import IdempotencyKeyReused, ResultsConflict
from models.results import ScreeningResult
from serving.persistence.ids import new_screening_uuid
from serving.persistence.migrate import open_migrated
from serving.persistence.schema import (
    STORE_SOURCES,
    SYSTEM_ACTOR,
    SourceValues,
    TriggerValues,
    VerdictValues,
    audit_log,
    deliveries,
    feedback,
    idempotency_keys,
    jobs,
    screenings,
    uploads,
)
from serving.persistence.schema import evidence as evidence_table

_ACTIVE = ("QUEUED", "RUNNING")


@dataclass(frozen=True)
class JobRecord:
    """A screening request as persisted: it survives restarts until DONE or FAILED."""

    id: str
    created_at: str
    updated_at: str
    priority: str
    status: str
    study_instance_uid: str | None
    spool_dir: str | None
    screening_id: int | None
    error_reason: str | None
    error_detail: str | None
    source: str = SourceValues.UNKNOWN.value
    triggered_by: str = TriggerValues.UNKNOWN.value
    requested_by: str = "unknown"
    dedupe_key: str | None = None
    #: the ingress screening it and until when its claim holds (``claim_jobs``); claims so far
    claimed_by: str | None = None
    lease_until: str | None = None
    attempts: int = 0


@dataclass(frozen=True)
class Claim:
    """Who claims a job at admission (``add_job``) or later (``claim_jobs``), for how long."""

    holder: str
    lease_s: float

    def until(self) -> str:
        return _iso(datetime.now(UTC) + timedelta(seconds=self.lease_s))


@dataclass(frozen=True)
class Provenance:
    """Who and what produced a screening (see ``serving.persistence.schema``)."""

    source: SourceValues
    triggered_by: TriggerValues
    requested_by: str = SYSTEM_ACTOR


@dataclass(frozen=True)
class Idempotency:
    """An ``Idempotency-Key`` as the store keeps it: per client, with the request's hash."""

    actor: str
    key: str
    request_hash: str


@dataclass(frozen=True)
class Finished:
    """A screening that ended before its job was admitted (``add_job(finished=...)``): its result,
    evidence headers and the sinks to deliver to, committed with the admission."""

    result: ScreeningResult
    evidence: Sequence[Dataset] = ()
    sinks: Sequence[str] = ()


@dataclass(frozen=True)
class Admission:
    """What ``add_job`` did: ``created`` a new job, or found the one to answer with (``job_id``);
    ``job_id`` is None when an automatic trigger found the study already screened."""

    job_id: str | None
    created: bool


@dataclass(frozen=True)
class ScreeningRecord:
    """One stored screening with its provenance."""

    id: int
    screening_uuid: str
    created_at: str
    source: str
    triggered_by: str
    requested_by: str
    result: ScreeningResult


@dataclass(frozen=True)
class ReferenceScreening:
    """A study's reference screening, as worklists list it."""

    id: int  # the row id (deliveries and evidence refer to it)
    screening_uuid: str  # the public id (the job id for API screenings)
    created_at: str
    requested_priority: str | None
    source: str
    result: ScreeningResult


@dataclass(frozen=True)
class FeedbackRecord:
    id: int
    created_at: str
    screening_id: str
    finding_key: str
    verdict: VerdictValues
    comment: str | None
    reader_id: str


@dataclass(frozen=True)
class AuditEntry:
    at: str
    actor: str
    action: str
    screening_id: str | None
    study_ref: str | None


_JOB_COLUMNS = (
    jobs.c.id,
    jobs.c.created_at,
    jobs.c.updated_at,
    jobs.c.priority,
    jobs.c.status,
    jobs.c.study_instance_uid,
    jobs.c.spool_dir,
    jobs.c.screening_id,
    jobs.c.error_reason,
    jobs.c.error_detail,
    jobs.c.source,
    jobs.c.triggered_by,
    jobs.c.requested_by,
    jobs.c.dedupe_key,
    jobs.c.claimed_by,
    jobs.c.lease_until,
    jobs.c.attempts,
)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _now() -> str:
    return _iso(datetime.now(UTC))


def _header_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=False)
    return buffer.getvalue()


def _authority() -> Any:
    """1 for a screening of the store's copy of a study, 0 otherwise (upload, files, unknown)."""
    return case((screenings.c.source.in_(STORE_SOURCES), 1), else_=0)


class ResultsStore:
    """Append-only record of screening results; thread-safe (a connection pool).

    ``target`` is a SQLite file path or a ``postgresql://`` URL. Opening it brings the schema to
    the newest migration (``serving.persistence.migrate.ensure_schema``)."""

    def __init__(self, target: Path | str) -> None:
        self.target = target
        self._db = open_migrated(target)

    # -- screenings ------------------------------------------------------------------------

    def _insert(self, conn: Connection, result: ScreeningResult, provenance: Provenance, uuid: str) -> int:
        row = conn.execute(
            insert(screenings)
            .values(
                created_at=_now(),
                study_instance_uid=result.study_instance_uid,
                study_ref=result.study_ref,
                outcome=result.outcome.value,
                reason=result.reason.value if result.reason else None,
                priority=result.priority.value if result.priority else None,
                models=",".join(result.models),
                result_json=result.model_dump_json(),
                screening_uuid=uuid,
                source=provenance.source.value,
                triggered_by=provenance.triggered_by.value,
                requested_by=provenance.requested_by,
            )
            .returning(screenings.c.id)
        ).one()
        return int(row[0])

    def save(
        self,
        result: ScreeningResult,
        provenance: Provenance = Provenance(SourceValues.FILES, TriggerValues.CLI),
    ) -> int:
        """Commit a result as a new record (durable before return); returns its row id."""
        with self._db.write() as conn:
            return self._insert(conn, result, provenance, new_screening_uuid())

    def _reference(self, study_instance_uid: str, *, prefer_store: bool = True) -> Any:
        order = (_authority().desc(), screenings.c.id.desc()) if prefer_store else (screenings.c.id.desc(),)
        return (
            select(screenings.c.result_json)
            .where(screenings.c.study_instance_uid == study_instance_uid)
            .order_by(*order)
        )

    def latest(self, study_instance_uid: str, *, prefer_store: bool = True) -> ScreeningResult | None:
        """The study's reference result: its newest screening of the store's copy, else its newest
        (``prefer_store=False``: the newest whatever its source)."""
        with self._db.read() as conn:
            row = conn.execute(self._reference(study_instance_uid, prefer_store=prefer_store).limit(1)).first()
        return ScreeningResult.model_validate_json(row[0]) if row else None

    def result(self, screening_id: int) -> ScreeningResult | None:
        with self._db.read() as conn:
            row = conn.execute(select(screenings.c.result_json).where(screenings.c.id == screening_id)).first()
        return ScreeningResult.model_validate_json(row[0]) if row else None

    def screenings_for(self, study_instance_uid: str) -> list[ScreeningRecord]:
        """Every screening of a study with its provenance, oldest first (nothing is overwritten)."""
        with self._db.read() as conn:
            rows = conn.execute(
                select(
                    screenings.c.id,
                    screenings.c.screening_uuid,
                    screenings.c.created_at,
                    screenings.c.source,
                    screenings.c.triggered_by,
                    screenings.c.requested_by,
                    screenings.c.result_json,
                )
                .where(screenings.c.study_instance_uid == study_instance_uid)
                .order_by(screenings.c.id)
            ).all()
        return [
            ScreeningRecord(int(r[0]), str(r[1]), r[2], r[3], r[4], r[5], ScreeningResult.model_validate_json(r[6]))
            for r in rows
        ]

    def reference_screenings(self, limit: int = 200, *, prefer_store: bool = True) -> list[ReferenceScreening]:
        """Each study's reference screening (see ``latest``), newest first; screenings without
        a Study UID each stand alone. What every worklist shows: an upload claiming a study's
        UID never displaces the result of the store's copy."""
        order = (_authority().desc(), screenings.c.id.desc()) if prefer_store else (screenings.c.id.desc(),)
        study = func.coalesce(
            func.nullif(screenings.c.study_instance_uid, ""), literal("#") + cast(screenings.c.id, Text)
        )
        ranked = select(
            screenings.c.id.label("id"), func.row_number().over(partition_by=study, order_by=order).label("n")
        ).subquery()
        query = (
            select(
                screenings.c.id,
                screenings.c.screening_uuid,
                screenings.c.created_at,
                jobs.c.priority,
                screenings.c.source,
                screenings.c.result_json,
            )
            .join(ranked, and_(ranked.c.id == screenings.c.id, ranked.c.n == 1))
            .outerjoin(jobs, jobs.c.screening_id == screenings.c.id)
            .order_by(screenings.c.id.desc())
            .limit(max(0, limit))
        )
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        return [
            ReferenceScreening(int(r[0]), str(r[1]), r[2], r[3], r[4], ScreeningResult.model_validate_json(r[5]))
            for r in rows
        ]

    def latest_per_study(
        self, limit: int = 200, *, prefer_store: bool = True
    ) -> list[tuple[str, str | None, ScreeningResult]]:
        """(created_at, requested priority or None, result) of each study's reference screening."""
        return [
            (r.created_at, r.requested_priority, r.result)
            for r in self.reference_screenings(limit, prefer_store=prefer_store)
        ]

    def count(self) -> int:
        with self._db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(screenings)).scalar_one())

    # -- jobs ------------------------------------------------------------------------------

    def _store_screened(self, conn: Connection, study_instance_uid: str) -> bool:
        found = conn.execute(
            select(literal(1))
            .where(screenings.c.study_instance_uid == study_instance_uid, screenings.c.source.in_(STORE_SOURCES))
            .limit(1)
        ).first()
        return found is not None

    def add_job(
        self,
        job_id: str,
        priority: str,
        study_instance_uid: str | None,
        spool_dir: str | None,
        *,
        provenance: Provenance | None = None,
        dedupe_key: str | None = None,
        idempotency: Idempotency | None = None,
        unless_screened: bool = False,
        audit_action: str | None = None,
        claim: Claim | None = None,
        files: Sequence[bytes] = (),
        finished: Finished | None = None,
    ) -> Admission:
        """Persist a QUEUED job, unless an equivalent one answers the request:

        * ``idempotency`` seen before with the same request hash: that job (``IdempotencyKeyReused``
          when the hash differs);
        * ``dedupe_key`` of a job still QUEUED/RUNNING: that job;
        * ``unless_screened`` (automatic triggers) and the study already screened from the store:
          no job (``job_id`` None).

        One transaction (with the audit row of the request, when ``audit_action`` names it: one
        durable commit per admission); a concurrent writer that wins a race is found on the
        second pass. A new job is claimed by ``claim`` (the admitting ingress screens it) and
        keeps ``files`` (an upload's instances, in order) in ``uploads`` until its result. With
        ``finished`` (a screening that ended before anyone was told its job id) a new job is
        committed DONE with its result, evidence and outbox rows, as ``finish_job`` would: one
        durable commit for the whole screening, and no instances kept."""
        provenance = provenance or Provenance(SourceValues.UNKNOWN, TriggerValues.UNKNOWN)
        for attempt in range(2):
            try:
                with self._db.write() as conn:
                    admission = self._admit(
                        conn,
                        job_id,
                        priority,
                        study_instance_uid,
                        spool_dir,
                        provenance,
                        dedupe_key,
                        idempotency,
                        unless_screened,
                        claim,
                    )
                    if admission.created and finished is not None:
                        self._finish(conn, job_id, finished.result, finished.evidence, finished.sinks)
                    elif admission.created:
                        self._keep_files(conn, job_id, files)
                    if audit_action is not None:
                        conn.execute(
                            insert(audit_log).values(
                                at=_now(),
                                actor=provenance.requested_by,
                                action=audit_action,
                                screening_id=admission.job_id,
                                study_ref=None,
                            )
                        )
                    return admission
            except ResultsConflict:
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def idempotent_job(self, idempotency: Idempotency) -> str | None:
        """The job a retried ``Idempotency-Key`` answers with (None: not seen); a read, for a
        caller that would otherwise screen before it admits. ``IdempotencyKeyReused`` when the
        key came with another request."""
        with self._db.read() as conn:
            seen = conn.execute(
                select(idempotency_keys.c.request_hash, idempotency_keys.c.job_id).where(
                    idempotency_keys.c.actor == idempotency.actor, idempotency_keys.c.key == idempotency.key
                )
            ).first()
        if seen is None:
            return None
        if seen[0] != idempotency.request_hash:
            raise IdempotencyKeyReused("Idempotency-Key already used for a different request")
        return str(seen[1])

    def _admit(
        self,
        conn: Connection,
        job_id: str,
        priority: str,
        study_instance_uid: str | None,
        spool_dir: str | None,
        provenance: Provenance,
        dedupe_key: str | None,
        idempotency: Idempotency | None,
        unless_screened: bool,
        claim: Claim | None = None,
    ) -> Admission:
        if idempotency is not None:
            seen = conn.execute(
                select(idempotency_keys.c.request_hash, idempotency_keys.c.job_id).where(
                    idempotency_keys.c.actor == idempotency.actor, idempotency_keys.c.key == idempotency.key
                )
            ).first()
            if seen is not None:
                if seen[0] != idempotency.request_hash:
                    raise IdempotencyKeyReused("Idempotency-Key already used for a different request")
                return Admission(str(seen[1]), False)
        answer: str | None = None
        if dedupe_key is not None:
            if unless_screened and self._store_screened(conn, dedupe_key):
                return Admission(None, False)
            active = conn.execute(
                select(jobs.c.id).where(jobs.c.dedupe_key == dedupe_key, jobs.c.status.in_(_ACTIVE)).limit(1)
            ).first()
            if active is not None:
                answer = str(active[0])
        created = answer is None
        if answer is None:
            now = _now()
            conn.execute(
                insert(jobs).values(
                    id=job_id,
                    created_at=now,
                    updated_at=now,
                    priority=priority,
                    status="QUEUED",
                    study_instance_uid=study_instance_uid,
                    spool_dir=spool_dir,
                    source=provenance.source.value,
                    triggered_by=provenance.triggered_by.value,
                    requested_by=provenance.requested_by,
                    dedupe_key=dedupe_key,
                    claimed_by=claim.holder if claim else None,
                    lease_until=claim.until() if claim else None,
                    attempts=1 if claim else 0,
                )
            )
            answer = job_id
        if idempotency is not None:
            conn.execute(
                insert(idempotency_keys).values(
                    actor=idempotency.actor,
                    key=idempotency.key,
                    request_hash=idempotency.request_hash,
                    job_id=answer,
                    created_at=_now(),
                )
            )
        return Admission(answer, created)

    def update_job(
        self,
        job_id: str,
        status: str,
        *,
        screening_id: int | None = None,
        error_reason: str | None = None,
        error_detail: str | None = None,
    ) -> None:
        with self._db.write() as conn:
            finished = status in ("DONE", "FAILED")
            if finished:
                conn.execute(delete(uploads).where(uploads.c.job_id == job_id))
            conn.execute(
                update(jobs)
                .where(jobs.c.id == job_id, jobs.c.status.in_(_ACTIVE))  # a finished job stays as it ended
                .values(
                    status=status,
                    updated_at=_now(),
                    screening_id=func.coalesce(screening_id, jobs.c.screening_id),
                    error_reason=error_reason,
                    error_detail=error_detail,
                )
            )

    def finish_job(
        self,
        job_id: str,
        result: ScreeningResult,
        *,
        evidence: Sequence[Dataset] = (),
        sinks: Sequence[str] = (),
    ) -> int:
        """One transaction: the result (with the job's provenance, the job id as its public id),
        its evidence headers, one outbox row per sink, job DONE.

        No result exists without its pending deliveries, and no delivery without its result. A
        screening that is not the study's reference (an upload after the store's copy was
        screened) is recorded but not delivered: the EMR keeps the PACS result."""
        with self._db.write() as conn:
            return self._finish(conn, job_id, result, evidence, sinks)

    def _finish(
        self, conn: Connection, job_id: str, result: ScreeningResult, evidence: Sequence[Dataset], sinks: Sequence[str]
    ) -> int:
        query = select(
            jobs.c.source, jobs.c.triggered_by, jobs.c.requested_by, jobs.c.status, jobs.c.screening_id
        ).where(jobs.c.id == job_id)
        if self._db.dialect == "postgresql":  # a second finisher waits here, then finds it DONE
            query = query.with_for_update()
        job = conn.execute(query).first()
        if job is not None and job[3] == "DONE" and job[4] is not None:
            # a retry after a commit whose answer was lost, or a second screening of the same job
            # (an ingress whose lease ran out while another took the job over): recorded once
            return int(job[4])
        provenance = (
            Provenance(SourceValues(job[0]), TriggerValues(job[1]), str(job[2]))
            if job is not None
            else Provenance(SourceValues.UNKNOWN, TriggerValues.UNKNOWN, "unknown")
        )
        is_reference = (
            provenance.source.value in STORE_SOURCES
            or not result.study_instance_uid
            or not self._store_screened(conn, result.study_instance_uid)
        )
        screening_id = self._insert(conn, result, provenance, job_id)
        for header in evidence:
            conn.execute(insert(evidence_table).values(screening_id=screening_id, header=_header_bytes(header)))
        now = _now()
        for sink in sinks if is_reference else ():
            conn.execute(
                insert(deliveries).values(
                    screening_id=screening_id,
                    sink=sink,
                    status="PENDING",
                    attempts=0,
                    next_at=now,
                    created_at=now,
                    updated_at=now,
                )
            )
        conn.execute(
            update(jobs).where(jobs.c.id == job_id).values(status="DONE", updated_at=now, screening_id=screening_id)
        )
        conn.execute(delete(uploads).where(uploads.c.job_id == job_id))
        return screening_id

    def for_delivery(self, screening_id: int) -> tuple[ScreeningResult, list[Dataset]] | None:
        """The result and its evidence headers, as the outbox needs them."""
        with self._db.read() as conn:
            row = conn.execute(select(screenings.c.result_json).where(screenings.c.id == screening_id)).first()
            if row is None:
                return None
            blobs = conn.execute(
                select(evidence_table.c.header).where(evidence_table.c.screening_id == screening_id)
            ).all()
        return ScreeningResult.model_validate_json(row[0]), [dcmread(BytesIO(bytes(b[0]))) for b in blobs]

    def job(self, job_id: str) -> JobRecord | None:
        with self._db.read() as conn:
            row = conn.execute(select(*_JOB_COLUMNS).where(jobs.c.id == job_id)).first()
        return JobRecord(*row) if row else None

    def job_and_result(self, job_id: str) -> tuple[JobRecord, ScreeningResult | None] | None:
        """A job and, once it is DONE, its result, from one read."""
        query = (
            select(*_JOB_COLUMNS, screenings.c.result_json)
            .select_from(jobs.outerjoin(screenings, screenings.c.id == jobs.c.screening_id))
            .where(jobs.c.id == job_id)
        )
        with self._db.read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        *fields, result_json = row
        return JobRecord(*fields), ScreeningResult.model_validate_json(result_json) if result_json else None

    def jobs_of_study(self, study_instance_uid: str) -> list[JobRecord]:
        """Every job that named the study (each attempt, whatever its end), oldest first."""
        with self._db.read() as conn:
            rows = conn.execute(
                select(*_JOB_COLUMNS)
                .where(jobs.c.study_instance_uid == study_instance_uid)
                .order_by(jobs.c.created_at, jobs.c.id)
            ).all()
        return [JobRecord(*r) for r in rows]

    # -- claims and uploads ----------------------------------------------------------------

    def job_holders(self) -> set[str]:
        """Who holds unfinished jobs now (to find holders that died: ``claim_jobs(dead=...)``)."""
        with self._db.read() as conn:
            rows = conn.execute(
                select(jobs.c.claimed_by).where(jobs.c.status.in_(_ACTIVE), jobs.c.claimed_by.is_not(None)).distinct()
            ).all()
        return {str(r[0]) for r in rows}

    def claim_jobs(self, claim: Claim, limit: int, *, dead: Sequence[str] = ()) -> list[JobRecord]:
        """Claim up to ``limit`` unfinished jobs that nobody holds (never claimed, released, their
        lease ran out, or their holder is in ``dead``), stat first, oldest first, in one
        transaction (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite): two
        ingresses never claim one job at once. A job stays QUEUED until its result commits; its
        lease says who screens it."""
        if limit <= 0:
            return []
        now = _now()
        free = or_(jobs.c.claimed_by.is_(None), jobs.c.lease_until.is_(None), jobs.c.lease_until < now)
        if dead:
            free = or_(free, jobs.c.claimed_by.in_(list(dead)))
        due = (
            select(*_JOB_COLUMNS)
            .where(jobs.c.status.in_(_ACTIVE), free)
            .order_by(case((jobs.c.priority == "stat", 0), else_=1), jobs.c.created_at, jobs.c.id)
            .limit(limit)
        )
        with self._db.read() as conn:  # most passes find nothing: no write lock for them
            if conn.execute(select(jobs.c.id).where(jobs.c.status.in_(_ACTIVE), free).limit(1)).first() is None:
                return []
        if self._db.dialect == "postgresql":
            due = due.with_for_update(skip_locked=True)
        until = claim.until()
        with self._db.write() as conn:
            rows = [JobRecord(*r) for r in conn.execute(due).all()]
            if rows:
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id.in_([r.id for r in rows]))
                    .values(claimed_by=claim.holder, lease_until=until, attempts=jobs.c.attempts + 1)
                )
        return [
            JobRecord(**{**r.__dict__, "claimed_by": claim.holder, "lease_until": until, "attempts": r.attempts + 1})
            for r in rows
        ]

    def renew_jobs(self, claim: Claim, job_ids: Iterable[str]) -> set[str]:
        """Extend this holder's lease on ``job_ids``; returns those it still holds (a job finished
        meanwhile, or taken over after a lease ran out, is not among them)."""
        ids = list(job_ids)
        if not ids:
            return set()
        held: set[str] = set()
        with self._db.write() as conn:
            for start in range(0, len(ids), 500):
                rows = conn.execute(
                    update(jobs)
                    .where(
                        jobs.c.id.in_(ids[start : start + 500]),
                        jobs.c.claimed_by == claim.holder,
                        jobs.c.status.in_(_ACTIVE),
                    )
                    .values(lease_until=claim.until())
                    .returning(jobs.c.id)
                ).all()
                held.update(str(r[0]) for r in rows)
        return held

    def release_jobs(self, holder: str, job_ids: Iterable[str]) -> int:
        """Give unfinished jobs back (drain): another ingress claims them at its next pass."""
        ids = list(job_ids)
        if not ids:
            return 0
        with self._db.write() as conn:
            return int(
                conn.execute(
                    update(jobs)
                    .where(jobs.c.id.in_(ids), jobs.c.claimed_by == holder, jobs.c.status.in_(_ACTIVE))
                    .values(claimed_by=None, lease_until=None)
                ).rowcount
            )

    def _keep_files(self, conn: Connection, job_id: str, files: Sequence[bytes]) -> None:
        if files:
            now = _now()
            conn.execute(
                insert(uploads),
                [{"job_id": job_id, "seq": i, "data": data, "created_at": now} for i, data in enumerate(files)],
            )

    def upload_files(self, job_id: str) -> list[bytes]:
        """The instances kept for a job (upload or SCP push), in their order; empty once its result
        is stored, or for a job that kept none."""
        with self._db.read() as conn:
            rows = conn.execute(select(uploads.c.data).where(uploads.c.job_id == job_id).order_by(uploads.c.seq)).all()
        return [bytes(r[0]) for r in rows]

    def pending_jobs(self) -> list[JobRecord]:
        """Jobs not finished (QUEUED or RUNNING when the service stopped), oldest first."""
        with self._db.read() as conn:
            rows = conn.execute(
                select(*_JOB_COLUMNS).where(jobs.c.status.in_(_ACTIVE)).order_by(jobs.c.created_at, jobs.c.id)
            ).all()
        return [JobRecord(*r) for r in rows]

    def has_screening_for(self, study_instance_uid: str) -> bool:
        """The study was screened from the store, or a store-sourced job for it is queued/running:
        an automatic trigger must not add another. Uploads do not count (they prove nothing about
        the store's copy, and must never silence the PACS)."""
        with self._db.read() as conn:
            if self._store_screened(conn, study_instance_uid):
                return True
            active = conn.execute(
                select(literal(1)).where(jobs.c.dedupe_key == study_instance_uid, jobs.c.status.in_(_ACTIVE)).limit(1)
            ).first()
        return active is not None

    # -- audit log -------------------------------------------------------------------------

    def audit(self, actor: str, action: str, screening_id: str | None = None, study_ref: str | None = None) -> None:
        """Append one audit row: who (token id or ``system``), what, which screening/study ref."""
        self.audit_many(actor, action, [(screening_id, study_ref)])

    def audit_many(self, actor: str, action: str, subjects: Iterable[tuple[str | None, str | None]]) -> None:
        """Append one row per (screening id, study ref), in one transaction."""
        now = _now()
        rows = [{"at": now, "actor": actor, "action": action, "screening_id": s, "study_ref": r} for s, r in subjects]
        if rows:
            with self._db.write() as conn:
                conn.execute(insert(audit_log), rows)

    def audit_entries(self, screening_id: str | None = None) -> list[AuditEntry]:
        query = select(
            audit_log.c.at, audit_log.c.actor, audit_log.c.action, audit_log.c.screening_id, audit_log.c.study_ref
        ).order_by(audit_log.c.id)
        if screening_id is not None:
            query = query.where(audit_log.c.screening_id == screening_id)
        with self._db.read() as conn:
            return [AuditEntry(*r) for r in conn.execute(query).all()]

    # -- feedback --------------------------------------------------------------------------

    def add_feedback(
        self,
        screening_id: str,
        finding_key: str,
        verdict: VerdictValues | str,
        reader_id: str,
        comment: str | None = None,
    ) -> int:
        """Record a reader's verdict on one finding of a screening (public id); returns its row id.
        A reader who changes their mind adds a row: ``feedback_for`` lists them in order."""
        value = VerdictValues(verdict)
        with self._db.write() as conn:
            row = conn.execute(
                insert(feedback)
                .values(
                    created_at=_now(),
                    screening_id=screening_id,
                    finding_key=finding_key,
                    verdict=value.value,
                    comment=comment,
                    reader_id=reader_id,
                )
                .returning(feedback.c.id)
            ).one()
        return int(row[0])

    def feedback_for(self, screening_id: str) -> list[FeedbackRecord]:
        with self._db.read() as conn:
            rows = conn.execute(
                select(
                    feedback.c.id,
                    feedback.c.created_at,
                    feedback.c.screening_id,
                    feedback.c.finding_key,
                    feedback.c.verdict,
                    feedback.c.comment,
                    feedback.c.reader_id,
                )
                .where(feedback.c.screening_id == screening_id)
                .order_by(feedback.c.id)
            ).all()
        return [FeedbackRecord(int(r[0]), r[1], r[2], r[3], VerdictValues(r[4]), r[5], r[6]) for r in rows]

    def close(self) -> None:
        self._db.close()
