"""Inbound orders in the results database: what the RIS/EMR asked for, before any image arrives.

An order is keyed by its placer order number (else the filler's) and carries the accession
number, the Study Instance UID when the sender knows it, the patient id, the requested priority
(``stat``/``routine``), the requested procedure and a status (``active``, ``completed``,
``cancelled``). A study is matched to its order by Study UID, else by accession number; the
first screening of the study links the order to its UID.

Inbound messages are recorded in the same transaction as the orders they change, before the
sender gets its ACK (``record_message``); (sender, message control id) identifies a message, so
a retry after a lost ACK is answered again without being applied twice.

The tables hold PHI (order numbers, accession numbers, patient ids, the raw message): nothing
from them is logged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, and_, case, func, insert, or_, select, update

from serving.persistence.migrate import open_migrated
from serving.persistence.schema import inbound_messages, orders


class OrderStatusValues(StrEnum):
    ACTIVE = "active"  # ordered or scheduled: images may come
    COMPLETED = "completed"  # the sender says the images are taken
    CANCELLED = "cancelled"  # cancelled or discontinued: never ranks a study


class OrderPriorityValues(StrEnum):
    STAT = "stat"
    ROUTINE = "routine"


@dataclass(frozen=True)
class Order:
    """One order as a sender described it (empty strings: not given)."""

    source: str  # hl7, fhir
    placer_number: str = ""
    filler_number: str = ""
    accession_number: str = ""
    study_instance_uid: str = ""
    patient_id: str = ""
    priority: OrderPriorityValues = OrderPriorityValues.ROUTINE
    priority_code: str = ""
    procedure_code: str = ""
    procedure_text: str = ""
    status: OrderStatusValues = OrderStatusValues.ACTIVE

    @property
    def key(self) -> str:
        """The order's identity: its placer number, else its filler number, else its accession."""
        if self.placer_number:
            return f"P:{self.placer_number}"
        if self.filler_number:
            return f"F:{self.filler_number}"
        return f"A:{self.accession_number}"


@dataclass(frozen=True)
class OrderRecord:
    id: int
    order: Order
    updated_at: str


@dataclass(frozen=True)
class MessageReceipt:
    """What ``record_message`` did: ``duplicate`` when (sender, control id) was seen before (its
    first ACK code is ``ack_code``, nothing applied again); the orders it created or changed."""

    duplicate: bool
    ack_code: str
    orders: tuple[OrderRecord, ...] = ()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


_COLUMNS = (
    orders.c.id,
    orders.c.updated_at,
    orders.c.source,
    orders.c.placer_number,
    orders.c.filler_number,
    orders.c.accession_number,
    orders.c.study_instance_uid,
    orders.c.patient_id,
    orders.c.priority,
    orders.c.priority_code,
    orders.c.procedure_code,
    orders.c.procedure_text,
    orders.c.status,
)


def _record(row: Any) -> OrderRecord:
    order = Order(
        source=row.source,
        placer_number=row.placer_number,
        filler_number=row.filler_number,
        accession_number=row.accession_number,
        study_instance_uid=row.study_instance_uid,
        patient_id=row.patient_id,
        priority=OrderPriorityValues(row.priority),
        priority_code=row.priority_code,
        procedure_code=row.procedure_code,
        procedure_text=row.procedure_text,
        status=OrderStatusValues(row.status),
    )
    return OrderRecord(int(row.id), order, row.updated_at)


class OrderBook:
    """Orders and inbound messages in the results database (SQLite or PostgreSQL); thread-safe."""

    def __init__(self, target: Path | str) -> None:
        self.target = target
        self._db = open_migrated(target)

    # -- writes ----------------------------------------------------------------------------

    def _upsert(self, conn: Connection, order: Order, message_id: str | None) -> OrderRecord:
        """Insert the order, or merge it into the one with the same key: given values replace
        stored ones, values the sender left empty keep what was known (a status update without
        the Study UID does not forget it)."""
        now = _now()
        found = conn.execute(select(*_COLUMNS).where(orders.c.order_key == order.key)).first()
        if found is None:
            row_id = conn.execute(
                insert(orders)
                .values(
                    created_at=now,
                    updated_at=now,
                    order_key=order.key,
                    source=order.source,
                    placer_number=order.placer_number,
                    filler_number=order.filler_number,
                    accession_number=order.accession_number,
                    study_instance_uid=order.study_instance_uid,
                    patient_id=order.patient_id,
                    priority=order.priority.value,
                    priority_code=order.priority_code,
                    procedure_code=order.procedure_code,
                    procedure_text=order.procedure_text,
                    status=order.status.value,
                    message_id=message_id,
                )
                .returning(orders.c.id)
            ).scalar_one()
            return OrderRecord(int(row_id), order, now)
        known = _record(found).order
        merged = replace(
            known,
            **{
                name: getattr(order, name)
                for name in (
                    "filler_number",
                    "accession_number",
                    "study_instance_uid",
                    "patient_id",
                    "priority_code",
                    "procedure_code",
                    "procedure_text",
                )
                if getattr(order, name)
            },
            priority=order.priority if order.priority_code else known.priority,  # no code given: unchanged
            status=order.status,
        )
        conn.execute(
            update(orders)
            .where(orders.c.id == found.id)
            .values(
                updated_at=now,
                filler_number=merged.filler_number,
                accession_number=merged.accession_number,
                study_instance_uid=merged.study_instance_uid,
                patient_id=merged.patient_id,
                priority=merged.priority.value,
                priority_code=merged.priority_code,
                procedure_code=merged.procedure_code,
                procedure_text=merged.procedure_text,
                status=merged.status.value,
                message_id=message_id,
            )
        )
        return OrderRecord(int(found.id), merged, now)

    def record_message(
        self,
        sender: str,
        control_id: str,
        message_type: str,
        body: str,
        new_orders: Sequence[Order],
        *,
        merges: Sequence[tuple[str, str]] = (),
    ) -> MessageReceipt:
        """Store an accepted message and apply its orders and patient merges (``(old id, new
        id)``) in one transaction; durable before return, so the caller may ACK ``AA`` then.
        A message seen before (same sender and control id) changes nothing."""
        with self._db.write() as conn:
            seen = conn.execute(
                select(inbound_messages.c.ack_code).where(
                    inbound_messages.c.sender == sender, inbound_messages.c.control_id == control_id
                )
            ).first()
            if seen is not None:
                return MessageReceipt(True, str(seen[0]))
            conn.execute(
                insert(inbound_messages).values(
                    sender=sender,
                    control_id=control_id,
                    received_at=_now(),
                    message_type=message_type,
                    ack_code="AA",
                    body=body,
                )
            )
            records = tuple(self._upsert(conn, o, f"{sender}|{control_id}") for o in new_orders)
            for old, new in merges:
                conn.execute(update(orders).where(orders.c.patient_id == old).values(patient_id=new, updated_at=_now()))
        return MessageReceipt(False, "AA", records)

    def upsert(self, order: Order, message_id: str | None = None) -> OrderRecord:
        """Create or update one order (FHIR notifications and polls: the resource's version
        is its dedupe key, given as ``message_id``)."""
        with self._db.write() as conn:
            return self._upsert(conn, order, message_id)

    def link_study(self, order_id: int, study_instance_uid: str) -> None:
        """Remember the Study UID the order's accession number led to."""
        with self._db.write() as conn:
            conn.execute(
                update(orders)
                .where(orders.c.id == order_id, orders.c.study_instance_uid == "")
                .values(study_instance_uid=study_instance_uid, updated_at=_now())
            )

    # -- reads -----------------------------------------------------------------------------

    def match(self, study_instance_uid: str = "", accession_number: str = "") -> OrderRecord | None:
        """The order a study belongs to: not cancelled, by Study UID or accession number; STAT
        before routine, then the newest."""
        keys = []
        if study_instance_uid:
            keys.append(orders.c.study_instance_uid == study_instance_uid)
        if accession_number:
            keys.append(orders.c.accession_number == accession_number)
        if not keys:
            return None
        stat_first = case((orders.c.priority == OrderPriorityValues.STAT.value, 0), else_=1)
        query = (
            select(*_COLUMNS)
            .where(and_(or_(*keys), orders.c.status != OrderStatusValues.CANCELLED.value))
            .order_by(stat_first, orders.c.id.desc())
            .limit(1)
        )
        with self._db.read() as conn:
            row = conn.execute(query).first()
        return _record(row) if row is not None else None

    def stat_keys(self) -> tuple[set[str], set[str]]:
        """Study UIDs and accession numbers of the STAT orders not cancelled (the worklist ranks
        their studies first, also when they were screened before the order came)."""
        query = select(orders.c.study_instance_uid, orders.c.accession_number).where(
            orders.c.priority == OrderPriorityValues.STAT.value,
            orders.c.status != OrderStatusValues.CANCELLED.value,
        )
        with self._db.read() as conn:
            rows = conn.execute(query).all()
        return {r[0] for r in rows if r[0]}, {r[1] for r in rows if r[1]}

    def get(self, order_key: str) -> OrderRecord | None:
        with self._db.read() as conn:
            row = conn.execute(select(*_COLUMNS).where(orders.c.order_key == order_key)).first()
        return _record(row) if row is not None else None

    def message_count(self) -> int:
        with self._db.read() as conn:
            return int(conn.execute(select(func.count()).select_from(inbound_messages)).scalar_one())

    def close(self) -> None:
        self._db.close()
