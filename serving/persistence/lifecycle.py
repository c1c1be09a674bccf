"""Model lifecycle rows in the results database (migration 0006): which version of each model is
active, the audit of every switch, run-time shadow versions, and shadow results.

The active version lives in the database, not in the settings file, so that ``dxassist models
promote``/``rollback`` switch it for a running service without a restart: the service re-reads
it for every job (``serving.online.versions``). A switch and its audit row are one
transaction; the audit table is append-only. Shadow results sit in their own table, which no
outbox row can reference, so a shadow version has no path to the EMR, the PACS or the worklist.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import delete, insert, select, update

from models.errors import ResultsConflict
from models.results import ScreeningResult
from serving.persistence.database import Database
from serving.persistence.migrate import open_migrated
from serving.persistence.schema import (
    model_active_versions,
    model_shadow_versions,
    model_version_events,
    shadow_results,
)

active_versions = model_active_versions
version_events = model_version_events
shadow_versions = model_shadow_versions


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class VersionEvent:
    id: int
    at: str
    model_id: str
    action: str
    from_version: str
    to_version: str
    actor: str
    reason: str


@dataclass(frozen=True)
class ShadowRecord:
    id: int
    created_at: str
    model_id: str
    shadow_version: str
    active_version: str
    study_instance_uid: str
    study_ref: str
    result: ScreeningResult


class LifecycleStore:
    """Active/shadow versions, their audit, and shadow results (SQLite or PostgreSQL)."""

    def __init__(self, target: Path | str) -> None:
        self.target = target
        self._db = open_migrated(target)

    # -- active versions -------------------------------------------------------------------

    def active_versions(self) -> dict[str, str]:
        """``model_id -> version`` switched by promote/rollback (models never switched are absent)."""
        with self._db.read() as conn:
            return {r.model_id: r.version for r in conn.execute(select(active_versions))}

    def routing(self) -> tuple[dict[str, str], dict[str, list[str]]]:
        """``active_versions`` and ``shadow_versions`` in one read (what each job routes by)."""
        with self._db.read() as conn:
            active = {r.model_id: r.version for r in conn.execute(select(active_versions))}
            shadows: dict[str, list[str]] = {}
            for r in conn.execute(select(shadow_versions).order_by(shadow_versions.c.added_at)):
                shadows.setdefault(r.model_id, []).append(r.version)
        return active, shadows

    def switch(self, model_id: str, to_version: str, *, action: str, actor: str, reason: str, current: str) -> int:
        """Make ``to_version`` active and write its audit row, in one transaction.

        ``current`` is the version the caller believes active (settings or database): the audit
        row records it as ``from_version``. Returns the event id.
        """
        if not actor.strip() or not reason.strip():
            raise ResultsConflict("a version switch needs who and why")
        with self._db.write() as conn:
            now = _now()
            row = conn.execute(select(active_versions.c.version).where(active_versions.c.model_id == model_id)).first()
            before = row.version if row is not None else current
            event_id = conn.execute(
                insert(version_events)
                .values(
                    at=now,
                    model_id=model_id,
                    action=action,
                    from_version=before,
                    to_version=to_version,
                    actor=actor[:128],
                    reason=reason[:1000],
                )
                .returning(version_events.c.id)
            ).scalar_one()
            if row is None:
                conn.execute(
                    insert(active_versions).values(
                        model_id=model_id, version=to_version, updated_at=now, event_id=event_id
                    )
                )
            else:
                conn.execute(
                    update(active_versions)
                    .where(active_versions.c.model_id == model_id)
                    .values(version=to_version, updated_at=now, event_id=event_id)
                )
            return int(event_id)

    def events(self, model_id: str | None = None) -> list[VersionEvent]:
        """The audit of switches, oldest first."""
        query = select(version_events).order_by(version_events.c.id)
        if model_id is not None:
            query = query.where(version_events.c.model_id == model_id)
        with self._db.read() as conn:
            return [VersionEvent(**r._asdict()) for r in conn.execute(query)]

    # -- shadow versions -------------------------------------------------------------------

    def add_shadow(self, model_id: str, version: str) -> None:
        with self._db.write() as conn:
            exists = conn.execute(
                select(shadow_versions.c.version).where(
                    shadow_versions.c.model_id == model_id, shadow_versions.c.version == version
                )
            ).first()
            if exists is None:
                conn.execute(insert(shadow_versions).values(model_id=model_id, version=version, added_at=_now()))

    def remove_shadow(self, model_id: str, version: str) -> None:
        with self._db.write() as conn:
            conn.execute(
                delete(shadow_versions).where(
                    shadow_versions.c.model_id == model_id, shadow_versions.c.version == version
                )
            )

    def shadow_versions(self) -> dict[str, list[str]]:
        with self._db.read() as conn:
            out: dict[str, list[str]] = {}
            for r in conn.execute(select(shadow_versions).order_by(shadow_versions.c.added_at)):
                out.setdefault(r.model_id, []).append(r.version)
            return out

    # -- shadow results --------------------------------------------------------------------

    def add_shadow_result(
        self, model_id: str, shadow_version: str, active_version: str, result: ScreeningResult
    ) -> int:
        with self._db.write() as conn:
            return int(
                conn.execute(
                    insert(shadow_results)
                    .values(
                        created_at=_now(),
                        model_id=model_id,
                        shadow_version=shadow_version,
                        active_version=active_version,
                        study_instance_uid=result.study_instance_uid,
                        study_ref=result.study_ref,
                        result_json=result.model_dump_json(),
                    )
                    .returning(shadow_results.c.id)
                ).scalar_one()
            )

    def shadow_results(self, model_id: str, shadow_version: str | None = None) -> list[ShadowRecord]:
        query = select(shadow_results).where(shadow_results.c.model_id == model_id).order_by(shadow_results.c.id)
        if shadow_version is not None:
            query = query.where(shadow_results.c.shadow_version == shadow_version)
        with self._db.read() as conn:
            rows = list(conn.execute(query))
        return [
            ShadowRecord(
                id=r.id,
                created_at=r.created_at,
                model_id=r.model_id,
                shadow_version=r.shadow_version,
                active_version=r.active_version,
                study_instance_uid=r.study_instance_uid,
                study_ref=r.study_ref,
                result=ScreeningResult.model_validate_json(r.result_json),
            )
            for r in rows
        ]

    def close(self) -> None:
        self._db.close()


def screenings_since(
    store_target: Path | str, since: str, limit: int = 100_000
) -> list[tuple[int, str, str, ScreeningResult]]:
    """(screening row id, public screening id, created_at, result) of every screening created at or after ``since`` (ISO
    UTC), oldest first: what drift monitoring reads."""
    from serving.persistence.schema import screenings

    db = Database(store_target)
    try:
        with db.read() as conn:
            rows = conn.execute(
                select(screenings.c.id, screenings.c.screening_uuid, screenings.c.created_at, screenings.c.result_json)
                .where(screenings.c.created_at >= since)
                .order_by(screenings.c.id)
                .limit(limit)
            ).all()
    finally:
        db.close()
    return [(int(r[0]), str(r[1] or ""), str(r[2]), ScreeningResult.model_validate_json(r[3])) for r in rows]
