"""HL7 v2 result sinks over MLLP: ORU^R01 findings and ORM^O01 priority updates.

MSH-10 derives from the outbox delivery id: the same on every retry of that delivery, never reused
for another, also after a restart; receivers dedupe on it. Bodies are never logged.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from pydicom.dataset import Dataset

from models.errors import DeliveryFailed, DeliveryRejected
from models.results import ScreeningResult
from serving.emr.priority import raises_priority, triage_reason


def _hl7_text(value: str) -> str:
    """Escape HL7 v2 delimiters in text that came from DICOM (names, IDs, free text)."""
    return (
        (
            value.replace("\\", "\\E\\")
            .replace("|", "\\F\\")
            .replace("^", "\\S\\")
            .replace("&", "\\T\\")
            .replace("~", "\\R\\")
        )
        .replace("\r", " ")
        .replace("\n", " ")
    )


def control_id(delivery_id: int, prefix: str = "DXA") -> str:
    """MSH-10: the outbox delivery id, so the same on every retry and never reused."""
    return f"{prefix}{delivery_id:012d}"


def oru_r01(
    delivery_id: int, result: ScreeningResult, *, sending_app: str = "DXASSIST", receiving_app: str = "EMR"
) -> str:
    """HL7 v2.5 ORU^R01 with one OBX per finding; MSH-10 = the outbox delivery id."""
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    control = control_id(delivery_id)
    segments = [
        f"MSH|^~\\&|{sending_app}|DXASSIST|{receiving_app}|HOSPITAL|{now}||ORU^R01^ORU_R01|{control}|P|2.5|||AL|NE",
        f"PID|1||{_hl7_text(result.patient_id)}^^^HOSP^MR",
        f"ORC|RE||{_hl7_text(result.accession_number)}",
        f"OBR|1||{_hl7_text(result.accession_number)}|18748-4^Diagnostic imaging study^LN|||{now}|||||||||||||||{now}||RAD|P",
    ]
    for n, f in enumerate(result.findings, start=1):
        flag = "A" if f.positive else "N"
        code = f"{f.code.value}^{_hl7_text(f.code.meaning)}^SCT"
        segments.append(
            f"OBX|{n}|NM|{code}|{f.model_id}|{f.score:.4f}|1^probability^UCUM|<{f.threshold}|{flag}|||P|||{now}"
        )
    segments.append(f"NTE|1||AI-generated, preliminary; priority {result.priority}; models {', '.join(result.models)}")
    return "\r".join(segments)


def orm_priority_update(
    delivery_id: int, result: ScreeningResult, *, sending_app: str = "DXASSIST", receiving_app: str = "RIS"
) -> str:
    """HL7 v2.5 ORM^O01 change-order request (ORC-1 XO) raising the order's priority to ASAP
    (TQ1-9, table 0485), with the reason in OBR-13 and NTE. MSH-10 = ``DXP`` + the delivery id."""
    now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
    accession = _hl7_text(result.accession_number)
    reason = _hl7_text(triage_reason(result))
    return "\r".join(
        [
            f"MSH|^~\\&|{sending_app}|DXASSIST|{receiving_app}|HOSPITAL|{now}||ORM^O01^ORM_O01|"
            f"{control_id(delivery_id, 'DXP')}|P|2.5|||AL|NE",
            f"PID|1||{_hl7_text(result.patient_id)}^^^HOSP^MR",
            f"ORC|XO||{accession}||||||{now}",
            "TQ1|1||||||||A^ASAP^HL70485",
            f"OBR|1||{accession}|18748-4^Diagnostic imaging study^LN|||||||||{reason}",
            f"NTE|1||{reason}",
        ]
    )


class Hl7MllpSink:
    """ORU^R01 over MLLP. ACK AA: done; AE or no ACK: retry; AR: dead letter."""

    name = "hl7"
    prefix = "DXA"

    def __init__(self, host: str, port: int, *, timeout_s: float = 10.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s

    def message(self, delivery_id: int, result: ScreeningResult) -> str | None:
        """The message to send for this result, or None when there is nothing to send."""
        return oru_r01(delivery_id, result) if result.findings else None

    def deliver(self, delivery_id: int, result: ScreeningResult, evidence: list[Dataset]) -> None:
        message = self.message(delivery_id, result)
        if message is None:
            return
        try:
            ack = asyncio.run(self._send(message))
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise DeliveryFailed(f"MLLP peer unreachable or silent ({type(exc).__name__})") from exc
        code = str(ack.segment("MSA")[1]) if ack is not None else ""
        control = str(ack.segment("MSA")[2]) if ack is not None else ""
        if control and control != control_id(delivery_id, self.prefix):
            raise DeliveryFailed("ACK does not acknowledge this message (MSA-2 mismatch)")
        if code in ("AA", "CA"):
            return
        if code in ("AR", "CR"):
            raise DeliveryRejected(f"HL7 receiver rejected the message ({code})")
        raise DeliveryFailed(f"HL7 receiver answered {code or 'nothing'}")

    async def _send(self, message: str) -> Any:
        import hl7
        from hl7.mllp import open_hl7_connection

        reader, writer = await asyncio.wait_for(open_hl7_connection(self.host, self.port), self.timeout_s)
        try:
            writer.writemessage(hl7.parse(message))
            await writer.drain()
            # the timeout cancels only the read, so the connection below is always closed
            return await asyncio.wait_for(reader.readmessage(), self.timeout_s)
        finally:
            writer.close()
            await writer.wait_closed()

    def close(self) -> None:
        """Nothing held between deliveries (one connection per message)."""


class Hl7PriorityUpdateSink(Hl7MllpSink):
    """The worklist priority update as ORM^O01 over MLLP (``emr.hl7.priority_updates``); sends
    only when the AI raised the priority. Same ACK rules as the ORU sink."""

    name = "hl7-triage"
    prefix = "DXP"

    def message(self, delivery_id: int, result: ScreeningResult) -> str | None:
        return orm_priority_update(delivery_id, result) if raises_priority(result) else None
