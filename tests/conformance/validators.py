"""Independent validators for what dxassist sends to an EMR, at their strictest useful setting.

HL7 v2: hl7apy parses each message with ``VALIDATION_LEVEL.STRICT`` (message structure and its
groups, segments, field datatypes) and then runs its validator with a report (cardinality,
children, datatypes: errors; table values and lengths: warnings); the ``hl7`` package parses it
as a second reader. FHIR R4: ``tests/fhir_server/validate.mjs`` runs FHIR.js (unexpected
elements are errors) and Medplum's ``validateResource``; ``fhir.resources`` parses each resource
as well. Every error fails. A warning fails unless it is listed below with the reason it is a
gap of the validator rather than a defect of the message.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hl7
from fhir.resources.R4B import get_fhir_model_class
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from hl7apy.validation import Validator

FHIR_DIR = Path(__file__).resolve().parents[1] / "fhir_server"

#: hl7apy 1.3.5's v2.5.1 tables are the tables as printed in 2.5.1; HL7 maintains some of them
#: outside the version (table 0396 "coding system" is HL7-and-user-defined and grows in the
#: HL7 Terminology). Each pattern: a warning text, and why it is not a defect of the message.
HL7APY_TABLE_GAPS: dict[str, str] = {
    r"Value SCT not in table HL70396 in element \w+\.\w+": (
        "SNOMED CT is 'SCT' in HL7 table 0396 (HL7 Terminology v2-0396); hl7apy's 2.5.1 copy predates the entry"
    ),
    r"Value RADLEX not in table HL70396 in element \w+\.\w+": (
        "RadLex is 'RADLEX' in HL7 table 0396 (HL7 Terminology v2-0396); hl7apy's 2.5.1 copy predates the entry"
    ),
    r"Value UCUM not in table HL70396 in element \w+\.\w+": (
        "UCUM is 'UCUM' in HL7 table 0396 (HL7 Terminology v2-0396); hl7apy's 2.5.1 copy predates the entry"
    ),
    r"Value HL7\d{4} not in table HL70396 in element \w+\.\w+": (
        "table 0396 defines the pattern HL7nnnn for HL7 tables (here HL70485); hl7apy stores the pattern as a literal"
    ),
    r"Value 99[A-Z0-9]{1,3} not in table HL70396 in element \w+\.\w+": (
        "table 0396 reserves 99zzz for local coding systems (dxassist's own codes); hl7apy lists only 99IHE"
    ),
}
#: what hl7apy cannot check at all, for the record: OBX-5 stays "varies" (not typed by OBX-2),
#: so the coded and numeric values are checked by the tests that read them back.
HL7APY_BLIND_SPOTS = ("OBX-5 datatype against OBX-2",)

#: FHIR.js ships the R4 value sets that enumerate their codes; bindings to value sets defined
#: over SNOMED CT, LOINC or an HL7 Terminology code system it cannot expand: it reports an info
#: "Value set ... could not be found" and then a warning "Code ... not found in value set" for
#: the same element. Such a warning is accepted only with that info beside it, only for these
#: elements (none has a required binding), each with the reason.
FHIRJS_UNEXPANDABLE: dict[str, str] = {
    r"Observation\.code": "observation-codes (example binding, LOINC): SNOMED CT/RadLex finding codes are allowed",
    r"Observation\.component\[\d+\]\.code": "observation-codes (example binding): dxassist's own component codes",
    r"Observation\.bodySite": "body-site (example binding, SNOMED CT): FHIR.js cannot expand SNOMED CT",
    r"Observation\.interpretation\[\d+\]": (
        "observation-interpretation (extensible): POS/NEG are in v3-ObservationInterpretation; FHIR.js lacks the"
        " HL7 Terminology expansion"
    ),
    r"DiagnosticReport\.category\[\d+\]": (
        "diagnostic-service-sections (example binding): v2-0074 RAD; FHIR.js lacks the HL7 Terminology expansion"
    ),
    r"DiagnosticReport\.code": "report-codes (preferred binding, all LOINC): FHIR.js cannot expand LOINC",
    r"DiagnosticReport\.conclusionCode\[\d+\]": (
        "clinical-findings (example binding, SNOMED CT): data-absent-reason and dxassist's reason codes are allowed"
    ),
}


@dataclass
class Findings:
    """What the validators said about one message or resource."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # not explained by a listed gap
    explained: list[str] = field(default_factory=list)  # warnings a listed gap explains

    @property
    def clean(self) -> bool:
        return not self.errors and not self.warnings


def validate_hl7(er7: str) -> Findings:
    """hl7apy STRICT parse + validator report, and the ``hl7`` package's parse."""
    out = Findings()
    try:
        message = parse_message(er7, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    except Exception as exc:  # a strict parse failure is an error of the message
        out.errors.append(f"hl7apy strict parse: {type(exc).__name__}: {exc}")
        return out
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as report:
        try:
            Validator.validate(message, report_file=report.name)
        except Exception:  # the report has every error; the exception repeats the first
            pass
        lines = Path(report.name).read_text().splitlines()
    for line in lines:
        kind, _, text = line.partition(": ")
        if kind == "Error":
            out.errors.append(f"hl7apy: {text}")
        elif any(re.fullmatch(p, text) for p in HL7APY_TABLE_GAPS):
            out.explained.append(text)
        else:
            out.warnings.append(f"hl7apy: {text}")
    try:
        parsed = hl7.parse(er7)
        if str(parsed.segment("MSH")[12]) != "2.5.1":
            out.errors.append("hl7: MSH-12 is not 2.5.1")
    except Exception as exc:
        out.errors.append(f"hl7 parse: {type(exc).__name__}")
    return out


def validate_fhir(resources: list[dict[str, Any]]) -> list[Findings]:
    """FHIR.js + Medplum (one node process for all) and fhir.resources, per resource."""
    out = [Findings() for _ in resources]
    for resource, found in zip(resources, out, strict=True):
        try:
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
        except Exception as exc:
            found.errors.append(f"fhir.resources: {type(exc).__name__}: {str(exc)[:300]}")
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is required for the FHIR validators")
    run = subprocess.run(
        [node, "--experimental-websocket", "validate.mjs"],
        cwd=FHIR_DIR,
        input=json.dumps(resources),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    issues = json.loads(run.stdout.strip().splitlines()[-1])
    unexpandable = {(i["index"], i["location"]) for i in issues if "could not be found" in i["message"]}
    for issue in issues:
        found = out[issue["index"]]
        text = f"{issue['validator']} {issue['severity']} at {issue['location']}: {issue['message']}"
        if issue["severity"] in ("error", "fatal"):
            found.errors.append(text)
        elif issue["severity"] == "warning":
            listed = any(re.fullmatch(p, issue["location"]) for p in FHIRJS_UNEXPANDABLE)
            if (
                issue["validator"] == "fhir.js"
                and "not found in value set" in issue["message"]
                and (issue["index"], issue["location"]) in unexpandable
                and listed
            ):
                found.explained.append(text)
            else:
                found.warnings.append(text)
    return out
