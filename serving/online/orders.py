"""Orders in: an HL7 v2 MLLP listener (ORM^O01, OMI^O23 orders, ADT^A40 merges) and FHIR R4
ServiceRequest/ImagingStudy notifications (a Subscription rest-hook, ``serving.online.orders_api``)
or polls (``FhirOrderPoller``), all to the same orders.

A hospital's RIS knows a study is coming, and how urgent it is, before any image arrives. Each
message is read within a size and time budget, parsed with the ``hl7`` package (never by
splitting strings), checked, and stored in the results database together with the orders it
creates or changes (``serving.persistence.orders``) before the sender gets its ACK:

* ``AA``: stored (or a retry of a message already stored: same sender and MSH-10, not applied
  twice);
* ``AE`` with ERR: the message is understood but wrong (an order without a placer or filler
  number, a malformed Study UID), or it could not be stored now (the sender should send it again);
* ``AR`` with ERR: not a message this listener takes (unparseable, unsupported type or version).

What is read from each order group (ORC with its TQ1/OBR/IPC/ZDS):

=====================  =====================================================================
placer / filler        ORC-2 / ORC-3, else OBR-2 / OBR-3 (first component)
accession number       IPC-1 (OMI), else OBR-18 (IHE Scheduled Workflow's ORM)
Study Instance UID     IPC-3 (OMI), else ZDS-1 (IHE SWF)
priority               TQ1-9, else ORC-7.6, else OBR-27.6, else OBR-5; STAT when the code is
                       one of ``orders.stat_codes`` (table 0485 ``S`` by default)
requested procedure    OBR-4 (identifier and text)
status                 cancelled for ORC-1 CA/DC/OC/OD/CR/DR or ORC-5 CA/DC; completed for
                       ORC-5 CM; active otherwise
patient                PID-3 (first repetition); ADT^A40: PID-3 replaces MRG-1 on every order
=====================  =====================================================================

Logs carry message types, ACK codes and counts, never a value from a message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import hl7
import httpx
from hl7.mllp import InvalidBlockError, start_hl7_server
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from models.errors import InvalidOrderMessage, ResultsDatabaseError, SourceUnavailable
from serving.core.uids import is_dicom_uid
from serving.persistence.orders import (
    MessageReceipt,
    Order,
    OrderBook,
    OrderPriorityValues,
    OrderRecord,
    OrderStatusValues,
)
from serving.settings import OrdersSettings

logger = logging.getLogger(__name__)

#: message types this listener takes (MSH-9.1^MSH-9.2)
SUPPORTED = {("ORM", "O01"), ("OMI", "O23"), ("ADT", "A40")}
_CANCEL_CONTROLS = {"CA", "DC", "OC", "OD", "CR", "DR"}
_CANCEL_STATUSES = {"CA", "DC"}
#: identifiers longer than this are refused, never truncated (a cut number would link another order)
MAX_IDENTIFIER = 64
MAX_TEXT = 200
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

# HL7 table 0357 (message error condition codes) used in ERR-3
ERR_SEGMENT_SEQUENCE = "100"
ERR_REQUIRED_FIELD = "101"
ERR_DATA_TYPE = "102"
ERR_UNSUPPORTED_TYPE = "200"
ERR_UNSUPPORTED_EVENT = "201"
ERR_UNSUPPORTED_VERSION = "203"
ERR_INTERNAL = "207"


@dataclass(frozen=True)
class ParsedMessage:
    """What a message asks for: its identity, its orders and its patient merges."""

    sender: str
    control_id: str
    message_type: str
    orders: tuple[Order, ...] = ()
    merges: tuple[tuple[str, str], ...] = ()


def _value(segment: Any, field_num: int, component: int = 1, repeat: int = 1) -> str:
    """One component of one field, unescaped by the ``hl7`` package; empty when absent."""
    try:
        value = segment.extract_field(1, field_num, repeat, component, 1)
    except (IndexError, KeyError, ValueError, TypeError):
        return ""
    return _CONTROL_CHARS.sub(" ", str(value)).strip()


def _identifier(value: str, what: str) -> str:
    if len(value) > MAX_IDENTIFIER:
        raise InvalidOrderMessage(f"{what} longer than {MAX_IDENTIFIER} characters", "AE", ERR_DATA_TYPE)
    return value


def _first(*values: str) -> str:
    return next((v for v in values if v), "")


def _parse_hl7(text: str) -> Any:
    """The message as the ``hl7`` package's tree; line ends normalised to the segment separator."""
    text = text.replace("\r\n", "\r").replace("\n", "\r").strip("\r")
    if not text.startswith("MSH"):
        raise InvalidOrderMessage("not an HL7 v2 message (no MSH segment first)", "AR", ERR_SEGMENT_SEQUENCE)
    try:
        return hl7.parse(text)
    except Exception as exc:  # the library's errors are not one tree; the type is enough
        raise InvalidOrderMessage(f"message not parseable ({type(exc).__name__})", "AR", ERR_SEGMENT_SEQUENCE) from None


def _order_group(segments: dict[str, Any], settings: OrdersSettings) -> Order:
    orc, obr = segments.get("ORC"), segments.get("OBR")
    tq1, ipc, zds = segments.get("TQ1"), segments.get("IPC"), segments.get("ZDS")

    def get(segment: Any, field_num: int, component: int = 1) -> str:
        return _value(segment, field_num, component) if segment is not None else ""

    placer = _identifier(_first(get(orc, 2), get(obr, 2)), "placer order number")
    filler = _identifier(_first(get(orc, 3), get(obr, 3)), "filler order number")
    if not placer and not filler:
        raise InvalidOrderMessage("order without a placer or filler order number", "AE", ERR_REQUIRED_FIELD)
    accession = _identifier(_first(get(ipc, 1), get(obr, 18)), "accession number")
    study_uid = _first(get(ipc, 3), get(zds, 1))
    if study_uid and not is_dicom_uid(study_uid):
        raise InvalidOrderMessage("Study Instance UID is not a DICOM UID", "AE", ERR_DATA_TYPE)
    code = _first(get(tq1, 9), get(orc, 7, 6), get(obr, 27, 6), get(obr, 5)).upper()[:8]
    control, order_status = get(orc, 1).upper(), get(orc, 5).upper()
    if control in _CANCEL_CONTROLS or order_status in _CANCEL_STATUSES:
        status = OrderStatusValues.CANCELLED
    elif order_status == "CM":
        status = OrderStatusValues.COMPLETED
    else:
        status = OrderStatusValues.ACTIVE
    return Order(
        source="hl7",
        placer_number=placer,
        filler_number=filler,
        accession_number=accession,
        study_instance_uid=study_uid,
        patient_id=_identifier(get(segments.get("PID"), 3), "patient id"),
        priority=OrderPriorityValues.STAT if code in settings.stat_codes else OrderPriorityValues.ROUTINE,
        priority_code=code,
        procedure_code=_identifier(get(obr, 4, 1), "procedure code"),
        procedure_text=get(obr, 4, 2)[:MAX_TEXT],
        status=status,
    )


def parse_order_message(text: str, settings: OrdersSettings) -> ParsedMessage:
    """Read an ORM^O01, OMI^O23 or ADT^A40; ``InvalidOrderMessage`` (with the ACK code and
    HL7 error code to answer) when it is not one, or not a valid one."""
    message = _parse_hl7(text)
    try:
        msh = message.segment("MSH")
    except KeyError:
        raise InvalidOrderMessage("no MSH segment", "AR", ERR_SEGMENT_SEQUENCE) from None
    control_id = _identifier(_value(msh, 10), "message control id")
    if not control_id:
        raise InvalidOrderMessage("MSH-10 (message control id) is empty", "AR", ERR_REQUIRED_FIELD)
    if not _value(msh, 12).startswith("2."):
        raise InvalidOrderMessage("MSH-12: only HL7 version 2.x is taken", "AR", ERR_UNSUPPORTED_VERSION)
    kind, event = _value(msh, 9, 1).upper(), _value(msh, 9, 2).upper()
    if kind not in {k for k, _ in SUPPORTED}:
        raise InvalidOrderMessage("unsupported message type (ORM^O01, OMI^O23, ADT^A40)", "AR", ERR_UNSUPPORTED_TYPE)
    if (kind, event) not in SUPPORTED:
        raise InvalidOrderMessage("unsupported trigger event (ORM^O01, OMI^O23, ADT^A40)", "AR", ERR_UNSUPPORTED_EVENT)
    sender = f"{_value(msh, 3)[:MAX_IDENTIFIER]}|{_value(msh, 4)[:MAX_IDENTIFIER]}"
    message_type = f"{kind}^{event}"
    if kind == "ADT":
        pid, mrg = (_segments(message, "PID") or [None])[0], (_segments(message, "MRG") or [None])[0]
        new_id = _identifier(_value(pid, 3), "patient id") if pid is not None else ""
        old_id = _identifier(_value(mrg, 1), "prior patient id") if mrg is not None else ""
        if not new_id or not old_id:
            raise InvalidOrderMessage("ADT^A40 needs PID-3 and MRG-1", "AE", ERR_REQUIRED_FIELD)
        return ParsedMessage(sender, control_id, message_type, merges=((old_id, new_id),))
    groups: list[dict[str, Any]] = []
    patient: Any = None
    for segment in message:
        name = str(segment[0]).upper()
        if name == "PID":
            patient = segment
        elif name == "ORC" or (name == "OBR" and (not groups or "OBR" in groups[-1])):
            groups.append({"PID": patient})
            groups[-1][name] = segment
        elif name in ("OBR", "TQ1", "IPC", "ZDS") and groups:
            groups[-1].setdefault(name, segment)  # the first of each in a group
    orders = tuple(_order_group(g, settings) for g in groups if "ORC" in g or "OBR" in g)
    if not orders:
        raise InvalidOrderMessage("no order (ORC/OBR) in the message", "AE", ERR_REQUIRED_FIELD)
    return ParsedMessage(sender, control_id, message_type, orders=orders)


def _segments(message: Any, name: str) -> list[Any]:
    try:
        return list(message.segments(name))
    except KeyError:
        return []


def build_ack(
    text: str | None,
    code: str,
    *,
    settings: OrdersSettings,
    detail: str = "",
    error_code: str = "",
) -> str:
    """An original-mode ACK (MSH, MSA, and ERR when ``error_code``) for the message ``text``,
    built on the ``hl7`` package's tree; a minimal one when ``text`` cannot be parsed."""
    control = f"DXA{datetime.now(UTC).strftime('%Y%m%d%H%M%S%f')}"
    source: Any = None
    if text is not None:
        try:
            source = _parse_hl7(text)
            source.segment("MSH")
        except (InvalidOrderMessage, KeyError):
            source = None
    ack: Any = None
    if source is not None:
        try:
            ack = source.create_ack(
                code, message_id=control, application=settings.hl7.application, facility=settings.hl7.facility
            )
        except (IndexError, KeyError, ValueError, TypeError):  # an MSH too short to answer to
            ack = None
    if ack is None:  # nothing to answer to but the sender: an ACK naming no message
        ack = hl7.parse("MSH|^~\\&|\rMSA|")
        msh = ack.segment("MSH")
        msh.assign_field(settings.hl7.application, 3)
        msh.assign_field(settings.hl7.facility, 4)
        msh.assign_field(datetime.now(UTC).strftime("%Y%m%d%H%M%S"), 7)
        msh.assign_field("ACK", 9)
        msh.assign_field(control, 10)
        msh.assign_field("P", 11)
        msh.assign_field("2.5.1", 12)
        ack.segment("MSA").assign_field(code, 1)
    if detail:
        ack.segment("MSA").assign_field(detail[:80], 3)
    if error_code:
        err = ack.create_segment([ack.create_field(["ERR"])])
        err.assign_field(error_code, 3, 1, 1)
        err.assign_field(detail[:80] or "error", 3, 1, 2)
        err.assign_field("HL70357", 3, 1, 3)
        err.assign_field("E", 4)
        ack.append(err)
    return str(ack)


@dataclass
class OrderListener:
    """The MLLP listener (``orders.hl7``); ``on_orders`` hears about every order stored (not
    about retries), in the event loop."""

    book: OrderBook
    settings: OrdersSettings
    on_orders: Callable[[Sequence[OrderRecord]], None] | None = None
    _server: asyncio.Server | None = None
    _connections: int = 0
    _clients: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> None:
        self._server = await start_hl7_server(
            self._client,
            host=self.settings.hl7.host,
            port=self.settings.hl7.port,
            limit=self.settings.hl7.max_message_bytes,
        )

    @property
    def port(self) -> int:
        """The bound port (``orders.hl7.port`` 0 picks a free one)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            clients = list(self._clients)
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)  # each closes its connection
            await self._server.wait_closed()
            await asyncio.sleep(0)  # let the transports finish closing
            self._server = None

    async def _client(self, reader: Any, writer: Any) -> None:
        task = asyncio.current_task()
        if self._connections >= self.settings.hl7.max_connections:
            writer.close()
            return
        self._connections += 1
        if task is not None:
            self._clients.add(task)
        try:
            while True:
                try:
                    block = await asyncio.wait_for(reader.readblock(), self.settings.hl7.idle_timeout_s)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    break
                except (ValueError, InvalidBlockError):  # over the size limit, or not MLLP framing
                    writer.writeblock(
                        build_ack(
                            None,
                            "AR",
                            settings=self.settings,
                            detail="message too large or not MLLP-framed",
                            error_code=ERR_SEGMENT_SEQUENCE,
                        ).encode()
                    )
                    await writer.drain()
                    break
                try:
                    answer = await self.handle(bytes(block))
                except Exception as exc:  # never leave the sender without an answer
                    logger.error("inbound HL7 message failed (%s); answered AE", type(exc).__name__)
                    answer = build_ack(
                        None, "AE", settings=self.settings, detail="internal error", error_code=ERR_INTERNAL
                    )
                writer.writeblock(answer.encode("utf-8"))
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._connections -= 1
            if task is not None:
                self._clients.discard(task)
            writer.close()

    async def handle(self, block: bytes) -> str:
        """One message in, its ACK out; stored before an ``AA``."""
        text = _decode(block)
        try:
            parsed = await asyncio.to_thread(parse_order_message, text, self.settings)
        except InvalidOrderMessage as exc:
            logger.warning("inbound HL7 message refused (%s %s)", exc.ack_code, exc.hl7_error)
            return build_ack(text, exc.ack_code, settings=self.settings, detail=str(exc), error_code=exc.hl7_error)
        try:
            receipt: MessageReceipt = await asyncio.to_thread(
                self.book.record_message,
                parsed.sender,
                parsed.control_id,
                parsed.message_type,
                text,
                parsed.orders,
                merges=parsed.merges,
            )
        except ResultsDatabaseError as exc:
            logger.error("inbound HL7 message not stored (%s); answered AE", type(exc).__name__)
            return build_ack(
                text, "AE", settings=self.settings, detail="not stored, send again", error_code=ERR_INTERNAL
            )
        logger.info(
            "inbound HL7 message stored",
            extra={"message_type": parsed.message_type, "orders": len(receipt.orders), "duplicate": receipt.duplicate},
        )
        if not receipt.duplicate and receipt.orders and self.on_orders is not None:
            try:
                self.on_orders(receipt.orders)
            except Exception as exc:  # stored already: the study is matched when its images come
                logger.error("order hand-off failed (%s)", type(exc).__name__)
        return build_ack(text, receipt.ack_code, settings=self.settings)


def _decode(block: bytes) -> str:
    """UTF-8 when it is, else ISO 8859-1 (never fails: every byte is a character)."""
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError:
        return block.decode("latin-1")


# -- FHIR R4: ServiceRequest and ImagingStudy, from a Subscription rest-hook or a poll ----------

#: identifier type codes (HL7 v2 table 0203, as FHIR ``Identifier.type``) for order numbers
_PLACER, _FILLER, _ACCESSION = "PLAC", "FILL", "ACSN"
_FHIR_CANCELLED = {"revoked", "entered-in-error"}
_DICOM_UID_SYSTEM = "urn:dicom:uid"


class _FhirCode(BaseModel):
    model_config = ConfigDict(extra="ignore")
    code: StrictStr | None = None
    display: StrictStr | None = None
    system: StrictStr | None = None


class _FhirConcept(BaseModel):
    model_config = ConfigDict(extra="ignore")
    coding: list[_FhirCode] = Field(default_factory=list, max_length=32)
    text: StrictStr | None = None


class _FhirIdentifier(BaseModel):
    model_config = ConfigDict(extra="ignore")
    system: StrictStr | None = None
    value: StrictStr | None = None
    type: _FhirConcept | None = None

    def typed(self, code: str) -> bool:
        return self.type is not None and any(c.code == code for c in self.type.coding)


class _FhirReference(BaseModel):
    model_config = ConfigDict(extra="ignore")
    reference: StrictStr | None = None
    identifier: _FhirIdentifier | None = None


class _FhirMeta(BaseModel):
    model_config = ConfigDict(extra="ignore")
    versionId: StrictStr | None = None
    lastUpdated: StrictStr | None = None


class _FhirResource(BaseModel):
    """The elements of ServiceRequest (R4) and ImagingStudy (R4) that orders need; the rest is
    ignored (a site's extensions never make a notification fail)."""

    model_config = ConfigDict(extra="ignore")
    resourceType: StrictStr
    id: StrictStr | None = None
    meta: _FhirMeta | None = None
    status: StrictStr | None = None
    priority: StrictStr | None = None
    identifier: list[_FhirIdentifier] = Field(default_factory=list, max_length=32)
    code: _FhirConcept | None = None
    subject: _FhirReference | None = None
    basedOn: list[_FhirReference] = Field(default_factory=list, max_length=32)


def _identifier_of(identifiers: Sequence[_FhirIdentifier], code: str) -> str:
    return next((i.value or "" for i in identifiers if i.typed(code) and i.value), "")


def order_from_fhir(resource: Mapping[str, Any], settings: OrdersSettings) -> Order | None:
    """An order from a ServiceRequest (placer/filler/accession identifiers by type PLAC/FILL/
    ACSN, priority, status, code, subject identifier) or an ImagingStudy (its Study UID,
    accession, ``basedOn`` order and ``available`` status: the images are taken). None for
    any other resource type; ``InvalidOrderMessage`` for a malformed one."""
    kind = resource.get("resourceType")
    if kind not in ("ServiceRequest", "ImagingStudy"):
        return None
    try:
        parsed = _FhirResource.model_validate(resource)
    except ValidationError:
        raise InvalidOrderMessage(f"{kind} malformed (elements of the wrong type)", "AE", ERR_DATA_TYPE) from None
    patient = parsed.subject.identifier.value if parsed.subject and parsed.subject.identifier else ""
    if kind == "ServiceRequest":
        coding = parsed.code.coding[0] if parsed.code and parsed.code.coding else _FhirCode()
        status = parsed.status or ""
        order = Order(
            source="fhir",
            placer_number=_identifier(_identifier_of(parsed.identifier, _PLACER), "placer order number"),
            filler_number=_identifier(_identifier_of(parsed.identifier, _FILLER), "filler order number"),
            accession_number=_identifier(_identifier_of(parsed.identifier, _ACCESSION), "accession number"),
            patient_id=_identifier(patient or "", "patient id"),
            priority=OrderPriorityValues.STAT
            if parsed.priority in settings.stat_fhir_priorities
            else OrderPriorityValues.ROUTINE,
            priority_code=(parsed.priority or "")[:16],
            procedure_code=_identifier(coding.code or "", "procedure code"),
            procedure_text=(coding.display or (parsed.code.text if parsed.code else "") or "")[:MAX_TEXT],
            status=OrderStatusValues.CANCELLED
            if status in _FHIR_CANCELLED
            else OrderStatusValues.COMPLETED
            if status == "completed"
            else OrderStatusValues.ACTIVE,
        )
    else:
        uid = next((i.value or "" for i in parsed.identifier if i.system == _DICOM_UID_SYSTEM and i.value), "")
        uid = uid.removeprefix("urn:oid:")
        if uid and not is_dicom_uid(uid):
            raise InvalidOrderMessage("ImagingStudy Study Instance UID is not a DICOM UID", "AE", ERR_DATA_TYPE)
        based = [r.identifier for r in parsed.basedOn if r.identifier is not None]
        order = Order(
            source="fhir",
            placer_number=_identifier(_identifier_of(based, _PLACER), "placer order number"),
            filler_number=_identifier(_identifier_of(based, _FILLER), "filler order number"),
            accession_number=_identifier(
                _identifier_of(parsed.identifier, _ACCESSION) or _identifier_of(based, _ACCESSION), "accession number"
            ),
            study_instance_uid=uid,
            patient_id=_identifier(patient or "", "patient id"),
            status=OrderStatusValues.COMPLETED if parsed.status == "available" else OrderStatusValues.ACTIVE,
        )
    if not (order.placer_number or order.filler_number or order.accession_number):
        raise InvalidOrderMessage(f"{kind} names no placer, filler or accession identifier", "AE", ERR_REQUIRED_FIELD)
    return order


def fhir_resources_of(body: Any) -> list[Mapping[str, Any]]:
    """The resources of a notification: the resource itself (R4 rest-hook with a payload), or
    the entries of a Bundle (a search page, a ``history`` or subscription-notification bundle)."""
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise InvalidOrderMessage("not a FHIR resource", "AE", ERR_DATA_TYPE)
    if body["resourceType"] != "Bundle":
        return [body]
    entries = body.get("entry") or []
    if not isinstance(entries, list) or len(entries) > 1000:
        raise InvalidOrderMessage("Bundle.entry malformed or too long", "AE", ERR_DATA_TYPE)
    return [e["resource"] for e in entries if isinstance(e, dict) and isinstance(e.get("resource"), dict)]


def fhir_message_id(resource: Mapping[str, Any]) -> str:
    """A notification's dedupe key: type, id and version (a resend of one version applies once)."""
    meta = resource.get("meta") if isinstance(resource.get("meta"), dict) else {}
    version = str((meta or {}).get("versionId") or (meta or {}).get("lastUpdated") or "")
    return f"{resource.get('resourceType')}/{resource.get('id')}/_history/{version}"[:200]


def record_fhir(
    book: OrderBook, resources: Sequence[Mapping[str, Any]], settings: OrdersSettings, sender: str
) -> list[OrderRecord]:
    """Store each order resource once per version (before the caller answers); the orders it
    created or changed (resends of a stored version change nothing)."""
    stored: list[OrderRecord] = []
    for resource in resources:
        order = order_from_fhir(resource, settings)
        if order is None:
            continue
        receipt = book.record_message(
            sender, fhir_message_id(resource), str(resource.get("resourceType")), json.dumps(resource)[:65536], [order]
        )
        stored.extend(receipt.orders)
    return stored


@dataclass
class FhirOrderPoller:
    """Reads ServiceRequest and ImagingStudy changed since the last sweep from the FHIR server
    (``orders.fhir.poll``), for sites without Subscriptions; the same effect as notifications."""

    book: OrderBook
    settings: OrdersSettings
    on_orders: Callable[[Sequence[OrderRecord]], None] | None = None
    since: str | None = None
    max_pages: int = 50

    def poll_once(self) -> int:
        """One sweep; returns how many orders were stored or changed."""
        fhir = self.settings.fhir
        assert fhir.url is not None
        headers = {"Accept": "application/fhir+json"}
        if fhir.token is not None:
            headers["Authorization"] = f"Bearer {fhir.token.get_secret_value()}"
        started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        stored: list[OrderRecord] = []
        with httpx.Client(timeout=fhir.timeout_s, headers=headers) as client:
            for kind in ("ServiceRequest", "ImagingStudy"):
                params = {"_count": "100", "_sort": "_lastUpdated"}
                if self.since:
                    params["_lastUpdated"] = f"ge{self.since}"
                url: str | None = f"{fhir.url.rstrip('/')}/{kind}"
                for _page in range(self.max_pages):
                    if url is None:
                        break
                    try:
                        response = client.get(url, params=params)
                        response.raise_for_status()
                        bundle = response.json()
                    except (httpx.HTTPError, ValueError) as exc:
                        raise SourceUnavailable(f"FHIR order poll failed ({type(exc).__name__})") from None
                    for resource in fhir_resources_of(bundle):
                        try:
                            stored.extend(record_fhir(self.book, [resource], self.settings, f"fhir-poll|{fhir.url}"))
                        except InvalidOrderMessage as exc:
                            logger.warning("FHIR order skipped (%s)", exc)
                    url = next(
                        (str(link.get("url")) for link in bundle.get("link", []) if link.get("relation") == "next"),
                        None,
                    )
                    params = {}
        self.since = started
        if stored and self.on_orders is not None:
            self.on_orders(stored)
        return len(stored)
