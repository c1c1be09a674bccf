"""Results back into the study in the DICOM store by STOW-RS: the SR, the GSPS, the Secondary
Captures and the SEG, as the destination's ``store.write_objects`` allows.

The objects' UIDs derive from the result (``serving.dicom.common.result_uid``), so a retried
delivery stores the same instances again rather than new ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from models.errors import DeliveryFailed, DeliveryRejected, DxAssistError, SourceError
from models.pixels import decode_frames, read_dataset
from models.results import OutcomeValues, ScreeningResult
from serving.dicom.common import placed_findings
from serving.dicom.gsps import build_gsps
from serving.dicom.sc import SEG_SOP_CLASS, build_scs, is_own_object
from serving.dicom.sources.dicomweb import DicomWebSource, QidoInstance
from serving.dicom.sr import build_sr

ALL_OBJECTS = ("sr", "gsps", "sc", "seg")


class DicomSrSink:
    """The result objects into the screened study (one STOW-RS request per result).

    The SR and GSPS need only the image headers kept with the result; the Secondary Captures
    are drawn on the original pixels, retrieved from the same store (WADO-RS) at delivery (an
    image the store does not hold gets no SC); the
    SEG was made when the study was screened (the masks exist only then) and travels with the
    evidence."""

    name = "dicom-sr"

    def __init__(self, source: DicomWebSource, *, objects: Iterable[str] = ALL_OBJECTS) -> None:
        self.source = source
        self.objects = frozenset(objects)

    def close(self) -> None:
        self.source.close()

    def _frames(
        self, result: ScreeningResult, images: Sequence[Dataset]
    ) -> dict[tuple[str, int | None], NDArray[np.float32]]:
        """Display-ready pixels of the frames that carry a positive region (and of the first
        image, for the summary)."""
        wanted: dict[str, set[int | None]] = {}
        for p in placed_findings(result, images):
            wanted.setdefault(str(p.image.SOPInstanceUID), set()).add(p.frame_number)
        if not wanted and images:
            wanted[str(images[0].SOPInstanceUID)] = {None}
        frames: dict[tuple[str, int | None], NDArray[np.float32]] = {}
        for image in images:
            numbers = wanted.get(str(image.SOPInstanceUID))
            if not numbers:
                continue
            instance = QidoInstance(
                series_instance_uid=str(image.SeriesInstanceUID),
                sop_instance_uid=str(image.SOPInstanceUID),
                sop_class_uid=str(image.SOPClassUID),
                modality=str(image.get("Modality", "")),
                body_part_examined="",
                view_position="",
            )
            try:
                ds = read_dataset(self.source.retrieve(result.study_instance_uid, instance))
                for number in numbers:
                    frame = decode_frames(ds, frame_indices=[(number or 1) - 1])[0]
                    frames[(str(image.SOPInstanceUID), number)] = frame.pixels
            except DxAssistError:
                # not in this store (a modality pushed it to our SCP) or not decodable here: no SC
                # of it; the SR, GSPS and SEG still go (the STOW itself fails if the store is down)
                continue
        return frames

    def objects_for(self, result: ScreeningResult, evidence: list[Dataset]) -> list[Dataset]:
        """The objects this destination takes for ``result`` (empty when there is nothing to say)."""
        images = [e for e in evidence if not is_own_object(e)]
        made = [e for e in evidence if is_own_object(e)]
        if result.outcome != OutcomeValues.SCREENED:
            return []  # nothing to outline (and OHIF 3.13 cannot open an SR without a region)
        if not images:
            raise DeliveryRejected("no evidence headers kept for this result")
        objects: list[Dataset] = []
        if "sr" in self.objects:
            objects.append(build_sr(result, images))
        if "gsps" in self.objects and (gsps := build_gsps(result, images)) is not None:
            objects.append(gsps)
        if "sc" in self.objects and result.positive_findings:
            objects += build_scs(result, images, self._frames(result, images))
        if "seg" in self.objects:
            objects += [d for d in made if str(d.SOPClassUID) == SEG_SOP_CLASS]
        return objects

    def deliver(self, delivery_id: int, result: ScreeningResult, evidence: list[Dataset]) -> None:
        try:
            objects = self.objects_for(result, evidence)
            if objects:
                self.source.store(objects)
        except SourceError as exc:
            raise DeliveryFailed(f"store unavailable ({type(exc).__name__})") from exc
