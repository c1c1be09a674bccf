"""``dxassist export``: studies from the store, de-identified, with labels, for retraining.

Studies are named by Study UID (a list, or a store query); each needs a screening in the
results database, whose findings are the labels, decided by readers' feedback where readers
gave it (``Label Source`` says ``reader`` then, ``ai`` otherwise). Every instance goes through
``serving.export.deid`` before anything is written; the images stay DICOM (de-identified, pseudonymous UIDs),
which is what ``training/datasets.py`` reads. Output, in ``out``:

* ``chestxray14`` layout: ``<patient>_<follow-up>.dcm`` and ``Data_Entry.csv`` with the columns
  of NIH ChestX-ray14 (``Image Index``, ``Finding Labels`` joined by ``|`` or ``No Finding``,
  ``Follow-up #``, ``Patient ID`` as a number, ``Patient Age``/``Gender`` only with the
  patient-characteristics option, ``View Position``, sizes, spacing) plus ``Label Source``;
* ``kvasir`` layout (Kvasir-SEG): ``images/<n>.dcm`` and ``masks/<n>.png``, the mask being the
  AI's polyp region (a box; empty when no polyp): pseudo-labels to be corrected by readers, listed
  in ``labels.csv`` with their source;
* ``export.json``: counts and the profile options (no identifier).

The private mapping table (original -> pseudonymous Patient ID and Study UID) is written only to
``export.mapping_file``, which may not lie inside ``out``. Logs carry counts, never identifiers.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
from pydicom import dcmread

from models.errors import DxAssistError, InputRejected, SourceError
from models.pixels import load_frames
from models.results import OutcomeValues, ScreeningResult
from models.synthetic.cxr import CHESTXRAY14_COLUMNS, CHESTXRAY14_NAMES
from serving.export.deid import Deidentifier
from serving.online.factory import build_source
from serving.persistence.feedback import Verdict, reader_labels
from serving.persistence.results import ResultsStore
from serving.persistence.schema import STORE_SOURCES
from serving.settings import Settings

logger = logging.getLogger(__name__)

#: ChestX-ray14 label names for the reference model's finding keys (``nodule_mass`` reads as Nodule)
CHESTXRAY14 = CHESTXRAY14_NAMES | {"nodule_mass": "Nodule"}
EXPORT_COLUMNS = [*CHESTXRAY14_COLUMNS, "Label Source"]  # where each label came from (AI, reader)


@dataclass
class ExportSummary:
    studies: int = 0
    instances: int = 0
    images: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def labels_for(store: ResultsStore, study_instance_uid: str) -> tuple[list[str], str, ScreeningResult] | None:
    """Positive finding keys of the study's reference screening, with what readers' feedback
    decided applied (``serving.persistence.feedback.reader_labels``: each reader's latest verdict,
    contradicting readers decide nothing), where they came from (``reader`` when a reader decided
    at least one finding, else ``ai``) and the result; None when it was never screened or not
    SCREENED."""
    records = store.screenings_for(study_instance_uid)
    if not records:
        return None
    store_copies = [r for r in records if r.source in STORE_SOURCES]
    record = (store_copies or records)[-1]
    result: ScreeningResult = record.result
    if result.outcome != OutcomeValues.SCREENED:
        return None  # the AI declined: nothing to learn from, and "No Finding" would be a false label
    positive = {f.key for f in result.findings if f.positive}
    verdicts = store.feedback_for(record.screening_uuid)
    decided = reader_labels(result, (Verdict(v.reader_id, v.finding_key, v.verdict) for v in verdicts))
    positive = (positive - decided.keys()) | {key for key, value in decided.items() if value}
    return sorted(positive), "reader" if decided else "ai", result


def _private_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _mask(shape: tuple[int, ...], result: ScreeningResult, positive: list[str]) -> bytes:
    """A Kvasir-SEG mask (PNG, 255 inside): the AI's region of each positive finding kept."""
    height, width = int(shape[0]), int(shape[1])
    mask = np.zeros((height, width), np.uint8)
    for finding in result.findings:
        if finding.key in positive and finding.region is not None:
            r = finding.region
            x0, y0 = int(r.x * width), int(r.y * height)
            mask[y0 : y0 + max(1, int(r.height * height)), x0 : x0 + max(1, int(r.width * width))] = 255
    ok, encoded = cv2.imencode(".png", mask)
    if not ok:
        raise ValueError("mask encoding failed")
    return bytes(encoded.tobytes())


def _bytes_of(source: object) -> bytes:
    if isinstance(source, bytes):
        return source
    if isinstance(source, str | os.PathLike):
        return Path(source).read_bytes()
    read = getattr(source, "read", None)
    if read is None:
        raise TypeError("instance source")
    return bytes(read())


def run_export(settings: Settings, study_uids: list[str], out: Path) -> ExportSummary:
    """Export ``study_uids`` into ``out`` (see the module docstring)."""
    options = settings.export
    mapping_file = options.mapping_file
    if mapping_file is not None and out.resolve() in mapping_file.resolve().parents:
        raise ValueError("export.mapping_file: must not lie inside the export folder")
    out.mkdir(parents=True, exist_ok=True)
    deid = Deidentifier(options)
    source = build_source(settings)
    store = ResultsStore(settings.results.target)
    summary = ExportSummary()
    rows: list[dict[str, str]] = []
    kvasir_rows: list[dict[str, str]] = []
    patients: dict[str, int] = {}
    follow_ups: Counter[str] = Counter()
    try:
        for uid in dict.fromkeys(study_uids):
            labels = labels_for(store, uid)
            if labels is None:
                summary.skipped["no SCREENED result (no labels)"] += 1
                continue
            try:
                items = source.instances(uid)
            except SourceError as exc:
                summary.skipped[type(exc).__name__] += 1
                continue
            positive, label_source, result = labels
            exported = 0
            for item in items:
                try:
                    raw = _bytes_of(item.source)
                    clean = deid(dcmread(BytesIO(raw)))
                    buffer = BytesIO()
                    clean.save_as(buffer, enforce_file_format=True)
                    data = buffer.getvalue()
                    frames = load_frames(data)
                except InputRejected as exc:
                    summary.skipped[exc.reason.value] += 1
                    continue
                except (DxAssistError, ValueError, KeyError, AttributeError, TypeError) as exc:
                    summary.skipped[type(exc).__name__] += 1
                    continue
                summary.instances += 1
                exported += 1
                patient = str(clean.get("PatientID", "")) or str(clean.StudyInstanceUID)
                number = patients.setdefault(patient, len(patients) + 1)
                follow_up = follow_ups[patient]
                follow_ups[patient] += 1
                name = f"{number:08d}_{follow_up:03d}"
                if options.layout == "kvasir":
                    _private_write(out / "images" / f"{name}.dcm", data)
                    _private_write(out / "masks" / f"{name}.png", _mask(frames[0].pixels.shape[:2], result, positive))
                    kvasir_rows.append(
                        {"image": f"{name}.dcm", "polyp": str(int(bool(positive))), "Label Source": label_source}
                    )
                else:
                    _private_write(out / f"{name}.dcm", data)
                    spacing = list(clean.get("PixelSpacing", clean.get("ImagerPixelSpacing", [])) or [])
                    rows.append(
                        {
                            "Image Index": f"{name}.dcm",
                            "Finding Labels": "|".join(CHESTXRAY14.get(k, k) for k in positive) or "No Finding",
                            "Follow-up #": str(follow_up),
                            "Patient ID": str(number),
                            "Patient Age": str(clean.get("PatientAge", "")),
                            "Patient Gender": str(clean.get("PatientSex", "")),
                            "View Position": str(clean.get("ViewPosition", "")),
                            "OriginalImage[Width": str(clean.get("Columns", "")),
                            "Height]": str(clean.get("Rows", "")),
                            "OriginalImagePixelSpacing[x": str(spacing[1]) if len(spacing) == 2 else "",
                            "y]": str(spacing[0]) if len(spacing) == 2 else "",
                            "Label Source": label_source,
                        }
                    )
                summary.images += len(frames)
            summary.studies += 1 if exported else 0
    finally:
        store.close()
        close = getattr(source, "close", None)
        if close is not None:
            close()
    if options.layout == "chestxray14":
        with (out / "Data_Entry.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=EXPORT_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    else:
        with (out / "labels.csv").open("w", newline="") as fh:
            kvasir = csv.DictWriter(fh, fieldnames=["image", "polyp", "Label Source"])
            kvasir.writeheader()
            kvasir.writerows(kvasir_rows)
    report = {
        "studies": summary.studies,
        "instances": summary.instances,
        "images": summary.images,
        "skipped": dict(summary.skipped),
        "layout": options.layout,
        "profile": {
            "retain_longitudinal_dates": options.retain_longitudinal_dates,
            "retain_patient_characteristics": options.retain_patient_characteristics,
            "clean_pixel_regions": len(options.clean_pixels),
        },
    }
    (out / "export.json").write_text(json.dumps(report, indent=2))
    if mapping_file is not None:
        table = "kind,original,pseudonym\n" + "".join(f"{k},{o},{p}\n" for k, o, p in deid.mapping)
        _private_write(mapping_file, table.encode())
    logger.info("export done: %d studies, %d instances, %d images", summary.studies, summary.instances, summary.images)
    return summary
