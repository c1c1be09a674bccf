"""Results back into the study in the DICOM store: the SR (and overlays) by STOW-RS.

The objects' UIDs derive from the result (``serving.dicom.sr.result_uid``), so a retried
delivery stores the same instances again rather than new ones.
"""

from __future__ import annotations

from pydicom.dataset import Dataset

from models.errors import DeliveryFailed, DeliveryRejected, SourceError
from models.results import ScreeningResult
from serving.dicom.sc import is_own_overlay
from serving.dicom.sources.dicomweb import DicomWebSource
from serving.dicom.sr import build_sr


class DicomSrSink:
    """The TID 1500 SR, and the heatmap Secondary Capture when there is one, into the same study
    (one STOW-RS request)."""

    name = "dicom-sr"

    def __init__(self, source: DicomWebSource) -> None:
        self.source = source

    def close(self) -> None:
        self.source.close()

    def deliver(self, delivery_id: int, result: ScreeningResult, evidence: list[Dataset]) -> None:
        if not result.findings:
            return
        images = [e for e in evidence if not is_own_overlay(e)]
        overlays = [e for e in evidence if is_own_overlay(e)]
        if not images:
            raise DeliveryRejected("no evidence headers kept for this result")
        try:
            self.source.store([build_sr(result, images), *overlays])
        except SourceError as exc:
            raise DeliveryFailed(f"store unavailable ({type(exc).__name__})") from exc
