"""HL7 v2.5.1 messages built with hl7apy (no string building): the ORU^R01 result and the
OMG^O19 priority-change request.

ORU^R01, one per screening (SCREENED or NOT_SCREENED)::

    MSH  site applications/facilities, MSH-10 from the result id (``message_control_id``),
         MSH-18 UNICODE UTF-8 (names from DICOM headers are not all ASCII)
    PID  PID-3 id^^^authority^type (settings), PID-5 from the DICOM PatientName   [when the id is known]
    PV1  PV1-2 U, PV1-19 the visit (AdmissionID)                                  [when known]
    ORC  RE, ORC-2/3 placer/filler order numbers (placer: the DICOM placer order number, else
         the accession; filler: the accession), each with its authority
    OBR  OBR-4 report kind per model (settings), OBR-7 the study time, OBR-22 now,
         OBR-24 service section, OBR-25 P (AI results are preliminary)
    NTE  report note: AI-generated, preliminary, priority, models (belongs to the OBR)
    per finding n (OBX-4 sub-id n groups its two OBX):
    OBX  CE  OBX-3 the finding's code in its own coding system, OBX-5 Present/Absent (SNOMED CT
             qualifier values), OBX-8 A/N, OBX-11 P, OBX-14 study time, OBX-18 the model@version
    NTE  the region, when the finding is present and the model located it
    OBX  NM  OBX-3 local code PROB, OBX-5 the probability, OBX-6 UCUM "1", OBX-7 the
             model's operating point as the normal range ("<threshold"), OBX-18 the model
    NOT_SCREENED: one OBX CE with the reason code (local coding system), and an NTE with it.

OMG^O19 (general clinical order, chapter 4): ORC-1 XO (change order request), the same order
numbers, TQ1-9 ``A^ASAP^HL70485`` (timing lives in TQ1, which this structure has - unlike
ORM^O01 in 2.5/2.5.1), OBR-4 with OBR-13 left empty (an empty field means "no change" in v2: the
ordering clinician's relevant clinical information is never overwritten), the reason in an NTE.

MSH-10 (ST, at most 20 characters) is a hash of the result's id and the sink name (the service
derives that id from its job, ADR 0021): the same on every retry of one delivery and every
screening of one job, different for every other screening, sink and database -
a receiver that de-duplicates on it never drops a new result.

Messages are built at hl7apy's tolerant level (its strict level refuses to type OBX-5, which it
keeps "varies"); ``tests/conformance`` parses every message the sinks send with STRICT.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Field, Group, Message, Segment
from hl7apy.factories import datatype_factory

from models.manifest import CodingSchemeValues
from models.results import Finding, ScreeningResult
from serving.emr.priority import NOTE, triage_reason
from serving.settings import HierarchicDesignator, SiteIdentity

VERSION = "2.5.1"
#: MSH-18 (table 0211); the MLLP sink encodes with the matching codec
CHARSET = "UNICODE UTF-8"
#: SNOMED CT qualifier values for a finding's presence (as IHE AIR and the SR-to-FHIR mapping use)
PRESENT = ("52101004", "Present")
ABSENT = ("2667000", "Absent")
#: dxassist's local codes (HL7 local coding system from settings; FHIR ``CODE_SYSTEM``)
PROBABILITY = ("PROB", "AI probability")
SCREENING_OUTCOME = ("OUTCOME", "AI screening outcome")


def message_control_id(result: ScreeningResult, sink: str) -> str:
    """MSH-10: 20 base32 characters (100 bits) of sha256(result id, sink)."""
    digest = hashlib.sha256(f"{result.result_id}|{sink}".encode()).digest()
    return base64.b32encode(digest).decode()[:20]


def hl7_datetime(moment: datetime | None, identity: SiteIdentity) -> str:
    """DTM with its offset; a naive DICOM time is read in the site's study timezone."""
    if moment is None:
        return ""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=identity.zone)
    return moment.strftime("%Y%m%d%H%M%S%z")


def _put(element: Any, name: str, value: str) -> None:
    """Set the leaf ``name`` of ``element`` to ``value`` as a value of the leaf's own datatype,
    so hl7apy escapes delimiters in it (a string assigned directly would be parsed as ER7)."""
    if value:
        child = getattr(element, name)
        child.value = datatype_factory(child.datatype, value, version=VERSION)


def _hd(element: Any, hd: HierarchicDesignator, prefix: str = "hd", start: int = 1) -> None:
    """Fill an HD, or the HD-shaped components ``prefix``_start.. of an EI (start 2)."""
    _put(element, f"{prefix}_{start}", hd.namespace_id)
    if hd.universal_id:
        _put(element, f"{prefix}_{start + 1}", hd.universal_id)
        _put(element, f"{prefix}_{start + 2}", hd.universal_id_type or "ISO")


def _ei(field: Any, value: str, authority: HierarchicDesignator) -> None:
    """An EI: the identifier and its assigning authority."""
    _put(field, "ei_1", value)
    _hd(field, authority, "ei", start=2)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")


def _message_type(message: Message, code: str, event: str, structure: str) -> None:
    for name, value in (("msg_1", code), ("msg_2", event), ("msg_3", structure)):
        _put(message.msh.msh_9, name, value)


def _coded_value(obx: Segment, code: str, text: str, system: str) -> None:
    """OBX-5 as a CE. hl7apy keeps OBX-5 "varies" (untyped), so the CE is built as a typed CE
    field (its components escaped by hl7apy) and OBX-5 takes its ER7 encoding."""
    typed = Field("OBX_3", version=VERSION)  # OBX-3 is a CE
    _ce(typed, code, text, system)
    obx.obx_5 = typed.to_er7()


def _msh(message: Message, identity: SiteIdentity, control_id: str, receiver: HierarchicDesignator) -> None:
    msh = message.msh
    for field, hd in (
        (msh.msh_3, identity.sending_application),
        (msh.msh_4, identity.sending_facility),
        (msh.msh_5, receiver),
        (msh.msh_6, identity.receiving_facility),
    ):
        _hd(field, hd)
    _put(msh.msh_7, "ts_1", _now())
    _put(msh, "msh_10", control_id)
    _put(msh.msh_11, "pt_1", identity.processing_id)
    _put(msh.msh_12, "vid_1", VERSION)
    _put(msh, "msh_15", "AL")  # accept acknowledgment always (the sink waits for it)
    _put(msh, "msh_16", "NE")  # no application acknowledgment
    _put(msh, "msh_18", CHARSET)  # names from DICOM headers are not ASCII everywhere


def _patient(group: Group, result: ScreeningResult, identity: SiteIdentity, visit_group: str) -> None:
    pid = group.add_segment("PID")
    _put(pid, "pid_1", "1")
    cx = pid.add_field("PID_3")
    _put(cx, "cx_1", result.patient_id)
    _hd(cx.cx_4, identity.patient_id_authority)
    _put(cx, "cx_5", identity.patient_id_type)
    parts = (result.patient_name.split("^") + [""] * 5)[:5]
    family, given, middle, prefix, suffix = parts
    if any(parts):
        xpn = pid.pid_5
        _put(xpn.xpn_1, "fn_1", family)
        for name, value in (("xpn_2", given), ("xpn_3", middle), ("xpn_4", suffix), ("xpn_5", prefix)):
            if value:
                _put(xpn, name, value)
        _put(xpn, "xpn_7", "L")  # legal name (table 0200)
    if result.visit_number:
        pv1 = group.add_group(visit_group).add_segment("PV1")
        _put(pv1, "pv1_1", "1")
        _put(pv1, "pv1_2", "U")  # patient class unknown to dxassist (table 0004)
        _put(pv1.pv1_19, "cx_1", result.visit_number)


def _order_numbers(segment: Segment, result: ScreeningResult, identity: SiteIdentity, kind: str) -> None:
    """ORC-2/3 or OBR-2/3: placer (the order's or DICOM placer order number, else the accession),
    filler (the order's filler number, else the accession)."""
    placer = result.placer_order_number or result.accession_number
    if placer:
        _ei(getattr(segment, f"{kind}_2"), placer, identity.placer_authority)
    filler = result.filler_order_number or result.accession_number  # an inbound order's filler number first
    if filler:
        _ei(getattr(segment, f"{kind}_3"), filler, identity.filler_authority)


def _ce(field: Any, code: str, text: str, system: str, prefix: str = "ce") -> None:
    _put(field, f"{prefix}_1", code)
    _put(field, f"{prefix}_2", text)
    _put(field, f"{prefix}_3", system)


def _obr(group: Group, result: ScreeningResult, identity: SiteIdentity, *, with_times: bool) -> Segment:
    kind = identity.report_kind([f.model_id for f in result.findings])
    obr = group.add_segment("OBR")
    _put(obr, "obr_1", "1")
    _order_numbers(obr, result, identity, "obr")
    _ce(obr.obr_4, kind.code.code, kind.code.display, kind.code.hl7_system)
    if with_times:
        if result.study_datetime is not None:
            _put(obr.obr_7, "ts_1", hl7_datetime(result.study_datetime, identity))
        _put(obr.obr_22, "ts_1", _now())
        _put(obr, "obr_24", kind.diagnostic_service or "")
        _put(obr, "obr_25", "P")
    return obr


def _nte(group: Group, n: int, text: str) -> None:
    nte = group.add_segment("NTE")
    _put(nte, "nte_1", str(n))
    _put(nte, "nte_2", "L")  # comment from the filler/ancillary (table 0105)
    _put(nte, "nte_3", text.replace("\r", " ").replace("\n", " "))


def _model_ref(finding: Finding) -> str:
    return f"{finding.model_id}@{finding.model_version}"


def _observation(
    group: Group,
    set_id: int,
    value_type: str,
    code: tuple[str, str, str],
    sub_id: str,
    identity: SiteIdentity,
    result: ScreeningResult,
) -> Segment:
    obx = group.add_group("ORU_R01_OBSERVATION").add_segment("OBX")
    _put(obx, "obx_1", str(set_id))
    _put(obx, "obx_2", value_type)
    _ce(obx.obx_3, *code)
    if sub_id:
        _put(obx, "obx_4", sub_id)
    _put(obx, "obx_11", "P")
    if result.study_datetime is not None:
        _put(obx.obx_14, "ts_1", hl7_datetime(result.study_datetime, identity))
    return obx


def _finding_observations(order: Group, result: ScreeningResult, identity: SiteIdentity) -> None:
    local = identity.local_coding_system
    set_id = 0
    for n, finding in enumerate(result.findings, start=1):
        set_id += 1
        system = identity.hl7_coding_systems[finding.code.scheme]
        obx = _observation(
            order, set_id, "CE", (finding.code.value, finding.code.meaning, system), str(n), identity, result
        )
        value, meaning = PRESENT if finding.positive else ABSENT
        _coded_value(obx, value, meaning, identity.hl7_coding_systems[CodingSchemeValues.SCT])
        _put(obx, "obx_8", "A" if finding.positive else "N")
        _ei(obx.obx_18, _model_ref(finding), identity.sending_application)
        if finding.positive and finding.region is not None:  # where an absent finding "is" is noise
            r = finding.region
            where = f"region x {r.x:.2f}-{r.x + r.width:.2f}, y {r.y:.2f}-{r.y + r.height:.2f} of the image"
            if finding.frame_index is not None:
                where += f", frame {finding.frame_index}"
            _nte(obx.parent, 1, where)
        set_id += 1
        prob = _observation(order, set_id, "NM", (*PROBABILITY, local), str(n), identity, result)
        prob.obx_5 = f"{finding.score:.4f}"  # NM: digits and a point, no delimiter
        _ce(prob.obx_6, "1", "", "UCUM")
        _put(prob, "obx_7", f"<{finding.threshold}")
        _ei(prob.obx_18, _model_ref(finding), identity.sending_application)


def _not_screened_observation(order: Group, result: ScreeningResult, identity: SiteIdentity) -> None:
    local = identity.local_coding_system
    obx = _observation(order, 1, "CE", (*SCREENING_OUTCOME, local), "", identity, result)
    reason = result.reason.value if result.reason else "NOT_SCREENED"
    _coded_value(obx, reason, reason_text(result), local)
    if result.reason_detail:
        _nte(obx.parent, 1, result.reason_detail)


def reason_text(result: ScreeningResult) -> str:
    """Human text for a NOT_SCREENED reason code (no patient values)."""
    reason = result.reason.value if result.reason else "NOT_SCREENED"
    return "Not screened by AI: " + reason.replace("_", " ").lower()


def oru_r01(result: ScreeningResult, identity: SiteIdentity, control_id: str) -> str:
    """The ORU^R01 (ER7, segments joined by CR) for a SCREENED or NOT_SCREENED result."""
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    _msh(message, identity, control_id, identity.receiving_application)
    _message_type(message, "ORU", "R01", "ORU_R01")
    patient_result = message.add_group("ORU_R01_PATIENT_RESULT")
    if result.patient_id:
        _patient(patient_result.add_group("ORU_R01_PATIENT"), result, identity, "ORU_R01_VISIT")
    order = patient_result.add_group("ORU_R01_ORDER_OBSERVATION")
    orc = order.add_segment("ORC")
    _put(orc, "orc_1", "RE")
    _order_numbers(orc, result, identity, "orc")
    _obr(order, result, identity, with_times=True)
    if result.findings:
        positive = ", ".join(f.display for f in result.positive_findings) or "none"
        models = ", ".join(result.models)
        _nte(order, 1, f"{NOTE} AI triage priority {result.priority}; positive: {positive}; models {models}.")
        _finding_observations(order, result, identity)
    else:
        _nte(order, 1, f"{NOTE} {reason_text(result)}.")
        _not_screened_observation(order, result, identity)
    return str(message.to_er7())


def omg_priority_update(result: ScreeningResult, identity: SiteIdentity, control_id: str) -> str:
    """OMG^O19 change-order request raising the order's priority to ASAP (TQ1-9), reason in NTE."""
    message = Message("OMG_O19", version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    _msh(message, identity, control_id, identity.order_receiving_application)
    _message_type(message, "OMG", "O19", "OMG_O19")
    if result.patient_id:
        _patient(message.add_group("OMG_O19_PATIENT"), result, identity, "OMG_O19_PATIENT_VISIT")
    order = message.add_group("OMG_O19_ORDER")
    orc = order.add_segment("ORC")
    _put(orc, "orc_1", "XO")
    _order_numbers(orc, result, identity, "orc")
    _put(orc.orc_9, "ts_1", _now())
    tq1 = order.add_group("OMG_O19_TIMING").add_segment("TQ1")
    _put(tq1, "tq1_1", "1")
    _ce(tq1.tq1_9, "A", "ASAP", "HL70485", prefix="cwe")
    _obr(order, result, identity, with_times=False)
    _nte(order, 1, triage_reason(result))
    return str(message.to_er7())
