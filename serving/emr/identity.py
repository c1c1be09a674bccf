"""Site identity for messages to the EMR/RIS: every name, authority and code system a receiving
interface engine matches on, in settings (``emr.identity``) with documented defaults.

An interface team connects dxassist by filling this in from their interface specification; the
message builders (``serving.emr.hl7_messages``, ``serving.emr.fhir_resources``) never invent a
site value. The defaults are placeholders that validate (and that a receiver would reject as
unknown): ``configs/settings/prod.example.yaml`` shows a filled-in site.
"""

from __future__ import annotations

from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.manifest import CodingSchemeValues


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HierarchicDesignator(_Strict):
    """HL7 v2 HD: a namespace id and, where the site assigns one, a universal id (an OID)."""

    namespace_id: str = Field(min_length=1, max_length=20)
    universal_id: str | None = Field(default=None, max_length=199)
    universal_id_type: Literal["ISO", "DNS", "URI", "UUID", "GUID", "L"] | None = None


class Coded(_Strict):
    """A code with its HL7 v2 coding system name (table 0396) and its FHIR system URI."""

    code: str = Field(min_length=1)
    display: str = Field(min_length=1)
    hl7_system: str = Field(min_length=1)
    fhir_system: str = Field(min_length=1)


class ReportKind(_Strict):
    """What the report is (OBR-4 / ``DiagnosticReport.code``) and which diagnostic service
    section files it (OBR-24, table 0074 / ``DiagnosticReport.category``; None: not sent)."""

    code: Coded
    diagnostic_service: str | None = None


_LOINC = {"hl7_system": "LN", "fhir_system": "http://loinc.org"}
IMAGING_REPORT = ReportKind(
    code=Coded(code="18748-4", display="Diagnostic imaging study", **_LOINC), diagnostic_service="RAD"
)
ENDOSCOPY_REPORT = ReportKind(code=Coded(code="18751-8", display="Endoscopy study", **_LOINC))

#: code system names and URIs per manifest coding scheme (HL7 v2 table 0396 / FHIR)
_DEFAULT_HL7_SYSTEMS = {"SCT": "SCT", "RADLEX": "RADLEX", "DCM": "DCM"}
_DEFAULT_FHIR_SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "RADLEX": "http://radlex.org",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
}


class SiteIdentity(_Strict):
    """Names, authorities and code systems of this site (``emr.identity``).

    HL7 v2: MSH-3..6 from the four applications/facilities; PID-3 is
    ``id^^^patient_id_authority^patient_id_type``; order numbers (ORC-2/3, OBR-2/3) carry
    ``placer_authority``/``filler_authority``. FHIR: the identifier systems below, and
    ``fhir_references`` says whether Patient, ServiceRequest and ImagingStudy are referenced
    literally after a search on the server (``resolve``: needs the server to hold them) or by
    identifier only (``identifier``: an explicit site choice for servers that resolve logical
    references themselves)."""

    sending_application: HierarchicDesignator = HierarchicDesignator(namespace_id="DXASSIST")
    sending_facility: HierarchicDesignator = HierarchicDesignator(namespace_id="DXASSIST")
    receiving_application: HierarchicDesignator = HierarchicDesignator(namespace_id="EMR")
    receiving_facility: HierarchicDesignator = HierarchicDesignator(namespace_id="HOSPITAL")
    #: MSH-11 (table 0103): P production, T training, D debugging
    processing_id: Literal["P", "T", "D"] = "P"
    #: the RIS/order filler that receives priority-change requests (MSH-5 of OMG^O19)
    order_receiving_application: HierarchicDesignator = HierarchicDesignator(namespace_id="RIS")
    patient_id_authority: HierarchicDesignator = HierarchicDesignator(namespace_id="HOSPITAL")
    #: HL7 table 0203 (MR: medical record number)
    patient_id_type: str = Field(default="MR", min_length=1, max_length=5)
    placer_authority: HierarchicDesignator = HierarchicDesignator(namespace_id="EMR")
    filler_authority: HierarchicDesignator = HierarchicDesignator(namespace_id="RIS")
    #: FHIR identifier systems of the site's patient ids, accession numbers (the order's filler
    #: number, ``ServiceRequest.identifier``), and dxassist's report ids
    patient_id_system: str = "urn:oid:2.16.840.1.113883.19.5.1"
    accession_system: str = "urn:oid:2.16.840.1.113883.19.5.2"
    report_id_system: str = "urn:oid:2.16.840.1.113883.19.5.3"
    fhir_references: Literal["resolve", "identifier"] = "resolve"
    #: canonical URL of dxassist's CodeSystem (local codes: probability, region, not-screened
    #: reasons); ``serving.emr.fhir_resources.code_system`` builds the resource to load on a server
    local_code_system_uri: str = "urn:oid:2.16.840.1.113883.19.5.4"
    #: HL7 local coding system (table 0396 "99zzz") for dxassist's own codes (probability,
    #: not-screened reasons); the FHIR counterpart is ``local_code_system_uri``
    local_coding_system: str = Field(default="99DXA", pattern=r"^99[A-Z0-9]{1,3}$")
    #: coding system names (HL7 v2) and URIs (FHIR) for the manifest's coding schemes
    hl7_coding_systems: dict[CodingSchemeValues, str] = Field(
        default_factory=lambda: {CodingSchemeValues(k): v for k, v in _DEFAULT_HL7_SYSTEMS.items()}
    )
    fhir_coding_systems: dict[CodingSchemeValues, str] = Field(
        default_factory=lambda: {CodingSchemeValues(k): v for k, v in _DEFAULT_FHIR_SYSTEMS.items()}
    )
    #: report code and service section per model id; models not named get ``default_report``
    reports: dict[str, ReportKind] = Field(default_factory=lambda: {"endoscopy-polyp": ENDOSCOPY_REPORT})
    default_report: ReportKind = IMAGING_REPORT
    #: the zone of DICOM study dates/times that carry no TimezoneOffsetFromUTC
    study_timezone: str = "UTC"

    @field_validator("study_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"study_timezone: unknown zone {value!r}") from exc
        return value

    @field_validator("hl7_coding_systems", "fhir_coding_systems")
    @classmethod
    def _every_scheme(cls, value: dict[CodingSchemeValues, str]) -> dict[CodingSchemeValues, str]:
        missing = set(CodingSchemeValues) - set(value)
        if missing:
            raise ValueError(f"coding systems missing for {sorted(m.value for m in missing)}")
        return value

    def report_kind(self, model_ids: list[str]) -> ReportKind:
        """The report kind for a result's models (the first named one), else the default."""
        for model_id in model_ids:
            if model_id in self.reports:
                return self.reports[model_id]
        return self.default_report

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.study_timezone)
