"""When the AI raises a study's reading priority, and why (shared by the FHIR and HL7 sinks)."""

from __future__ import annotations

from models.results import ScreeningResult, TriagePriorityValues

#: what every AI-asserted text says about itself
NOTE = "AI-generated preliminary result, not a diagnosis; to be confirmed by a clinician."


def raises_priority(result: ScreeningResult) -> bool:
    """The AI raised this study's reading priority: a critical finding is positive and the study
    was not already requested STAT (the AI never lowers a priority, so nothing is sent then)."""
    return result.priority == TriagePriorityValues.URGENT and (result.requested_priority or "").lower() != "stat"


def triage_reason(result: ScreeningResult) -> str:
    critical = ", ".join(f.display for f in result.positive_findings if f.critical)
    return f"AI triage: critical finding(s) positive: {critical}. {NOTE}"
