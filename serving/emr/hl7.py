"""HL7 v2.5.1 result sinks over MLLP: the ORU^R01 report (every screening, NOT_SCREENED included)
and the OMG^O19 priority-change request, built by ``serving.emr.hl7_messages``.

MSH-10 derives from the result's id and the sink name: the same on every retry of one delivery
and for any re-screening of one service job (the service derives the id from the job, ADR 0021),
never the same for another screening, also after the results database is reset;
receivers may de-duplicate on it. ACK AA/CA: done; AE, no ACK or an ACK for another message:
retry; AR/CR: dead letter. Bodies are never logged.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydicom.dataset import Dataset

from models.errors import DeliveryFailed, DeliveryRejected
from models.results import ScreeningResult
from serving.emr.hl7_messages import message_control_id, omg_priority_update, oru_r01
from serving.emr.priority import raises_priority
from serving.settings import SiteIdentity


class Hl7MllpSink:
    """ORU^R01 over MLLP, one connection per message."""

    name = "hl7"
    #: the outbox gives this sink NOT_SCREENED results too
    reports_not_screened = True

    def __init__(self, host: str, port: int, *, identity: SiteIdentity | None = None, timeout_s: float = 10.0) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self.identity = identity or SiteIdentity()

    def message(self, result: ScreeningResult) -> str | None:
        """The message to send for this result (ER7), or None when there is nothing to send (not
        even a study: a file that is not DICOM has nothing the EMR could file it under)."""
        if not result.study_instance_uid:
            return None
        return oru_r01(result, self.identity, message_control_id(result, self.name))

    def deliver(self, delivery_id: int, result: ScreeningResult, evidence: list[Dataset]) -> None:
        message = self.message(result)
        if message is None:
            return
        try:
            ack = asyncio.run(self._send(message))
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise DeliveryFailed(f"MLLP peer unreachable or silent ({type(exc).__name__})") from exc
        code = str(ack.segment("MSA")[1]) if ack is not None else ""
        control = str(ack.segment("MSA")[2]) if ack is not None else ""
        if control and control != message_control_id(result, self.name):
            raise DeliveryFailed("ACK does not acknowledge this message (MSA-2 mismatch)")
        if code in ("AA", "CA"):
            return
        if code in ("AR", "CR"):
            raise DeliveryRejected(f"HL7 receiver rejected the message ({code})")
        raise DeliveryFailed(f"HL7 receiver answered {code or 'nothing'}")

    async def _send(self, message: str) -> Any:
        import hl7
        from hl7.mllp import open_hl7_connection

        connect = open_hl7_connection(self.host, self.port, encoding="utf-8")  # MSH-18 says UTF-8
        reader, writer = await asyncio.wait_for(connect, self.timeout_s)
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
    """The worklist priority update as OMG^O19 over MLLP (``emr.hl7.priority_updates``); sends
    only when the AI raised the priority. Same ACK rules as the ORU sink."""

    name = "hl7-triage"
    reports_not_screened = False

    def message(self, result: ScreeningResult) -> str | None:
        if not raises_priority(result):
            return None
        return omg_priority_update(result, self.identity, message_control_id(result, self.name))
