"""What a version was really trained on: measured from the files, written into the manifest
(``provenance.data``, ``models.manifest.TrainingData``) and the model card.

Three kinds of source (``DataKindValues``):

* ``synthetic``: the project's generators (``models/synthetic``); no patient data;
* ``store-export``: a folder written by ``dxassist export`` (recognised by its ``export.json``):
  studies pulled from the site's DICOM store through the ``StudySource`` and de-identified on
  the way (ADR 0018); its labels are the screenings' findings, corrected by readers where they
  gave feedback, and the ``Label Source`` column says which;
* ``folder``: any other labelled folder in a public dataset's layout, taken as given.

Everything is read from the data itself, never assumed from the config: per label and split
the positive images, the modality and manufacturer mix and the study date range from the DICOM
headers, the de-identification state (``PatientIdentityRemoved`` on every image, the export's
profile options). A dataset manifest (one line per file: split, path relative to the data root,
file sha256, positive labels) is written into the work folder and its sha256 recorded: the
same data always gives the same digest, and a changed, added or relabelled file changes it.
The manifest stays with the data (its file names may be the site's); only its digest ships.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from models.manifest import DataKindValues, TrainingData

EXPORT_REPORT = "export.json"  # written by ``dxassist export`` (serving/export/job.py)
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class DataItem:
    """One training image: which split, its file, its label vector (label key -> 0/1)."""

    split: str
    path: Path
    labels: Mapping[str, int]
    label_source: str = ""


def export_report(root: Path) -> dict[str, Any] | None:
    """The ``export.json`` of a ``dxassist export`` folder, or None when ``root`` is not one."""
    path = root / EXPORT_REPORT
    if not path.is_file():
        return None
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or not {"studies", "instances", "layout", "profile"} <= report.keys():
        return None
    return report


def data_kind(source: str, root: Path | None) -> DataKindValues:
    """The kind of ``data.source``: synthetic, a store export (by its report), else a folder."""
    if source == "synthetic":
        return DataKindValues.SYNTHETIC
    if root is not None and export_report(root) is not None:
        return DataKindValues.STORE_EXPORT
    return DataKindValues.FOLDER


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.name


def _date(value: str) -> str | None:
    digits = value.strip()[:8]
    if len(digits) == 8 and digits.isdigit():
        return f"{digits[:4]}-{digits[4:6]}-{digits[6:]}"
    return None


def _deidentification(kind: DataKindValues, removed: int, n: int, export: dict[str, Any] | None) -> str:
    if kind is DataKindValues.SYNTHETIC:
        return "not applicable: generated phantoms, no patient data"
    marked = f"PatientIdentityRemoved YES on {removed} of {n} images"
    if kind is DataKindValues.STORE_EXPORT and export is not None:
        profile = export.get("profile", {})
        return (
            "de-identified on the way out of the store by `dxassist export` (PS3.15 Basic Profile as an "
            f"allow-list, dicognito pseudonyms; retain longitudinal dates {profile.get('retain_longitudinal_dates')}, "
            f"retain patient characteristics {profile.get('retain_patient_characteristics')}, "
            f"{profile.get('clean_pixel_regions', 0)} pixel regions cleaned); {marked}"
        )
    if n and removed == n:
        return f"de-identified before training (not by dxassist): {marked}"
    return f"NOT known to be de-identified: {marked}"


def describe_data(
    kind: DataKindValues,
    root: Path,
    items: Sequence[DataItem],
    label_keys: Sequence[str],
    *,
    description: str,
    manifest_path: Path,
) -> TrainingData:
    """Measure ``items`` (every split) and write the dataset manifest to ``manifest_path``.

    ``root`` is the data root the manifest's paths are relative to (for synthetic data: the work
    folder holding the generated sets)."""
    lines = ["split,file,sha256,positive_labels"]
    positives: dict[str, dict[str, int]] = {key: dict.fromkeys(SPLITS, 0) for key in label_keys}
    splits: Counter[str] = Counter()
    modalities: Counter[str] = Counter()
    manufacturers: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    studies: set[str] = set()
    dates: list[str] = []
    removed = 0
    for item in sorted(items, key=lambda i: (i.split, _relative(i.path, root))):
        splits[item.split] += 1
        present = sorted(k for k in label_keys if item.labels.get(k))
        for key in present:
            positives[key][item.split] = positives[key].get(item.split, 0) + 1
        if item.label_source:
            sources[item.label_source] += 1
        lines.append(f"{item.split},{_relative(item.path, root)},{file_sha256(item.path)},{'|'.join(present)}")
        try:
            header = dcmread(item.path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            modalities["unreadable"] += 1
            continue
        modalities[str(header.get("Modality", "") or "unknown")] += 1
        manufacturers[str(header.get("Manufacturer", "") or "unknown")[:64]] += 1
        studies.add(str(header.get("StudyInstanceUID", "") or item.path))
        day = _date(str(header.get("StudyDate", "") or header.get("ContentDate", "") or ""))
        if day:
            dates.append(day)
        removed += str(header.get("PatientIdentityRemoved", "")).upper() == "YES"
    text = "\n".join(lines) + "\n"
    manifest_path.parent.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(text)
    export = export_report(root) if kind is DataKindValues.STORE_EXPORT else None
    note = ""
    if kind is DataKindValues.STORE_EXPORT and export is not None:
        retained = export.get("profile", {}).get("retain_longitudinal_dates")
        note = (
            "shifted by the export's one date offset (intervals kept): not the calendar dates"
            if retained
            else "dates removed by the export"
        )
    elif kind is DataKindValues.SYNTHETIC:
        note = "the generator's dates, not acquisition dates"
    n = len(items)
    return TrainingData(
        kind=kind,
        description=description,
        images=n,
        studies=len(studies),
        splits={s: splits.get(s, 0) for s in SPLITS},
        positives=positives,
        label_sources=dict(sorted(sources.items())),
        modalities=dict(modalities.most_common()),
        manufacturers=dict(manufacturers.most_common()),
        study_dates=(min(dates), max(dates)) if dates else None,
        dates_note=note,
        deidentification=_deidentification(kind, removed, n, export),
        manifest_sha256=hashlib.sha256(text.encode()).hexdigest(),
    )


def trained_on_text(data: TrainingData) -> str:
    """The one-line ``provenance.trained_on``: what kind of data, how much, how it was split."""
    s = data.splits
    split = f"{s['train']} train / {s['validation']} validation / {s['test']} test images"
    if data.kind is DataKindValues.SYNTHETIC:
        return f"synthetic: {data.description}; {split}. Synthetic phantoms only, not for clinical use."
    labels = ""
    if data.label_sources:
        labels = "; labels: " + ", ".join(f"{n} {source}" for source, n in data.label_sources.items())
    return f"{data.kind.value}: {data.description}; {data.studies} studies, {split}{labels}."


def card_section(data: TrainingData) -> str:
    """The model card's "Training data" section, from the measured provenance."""
    rows = ["| label | " + " | ".join(SPLITS) + " |", "|---|" + "---|" * len(SPLITS)]
    for key, per_split in data.positives.items():
        rows.append(f"| {key} | " + " | ".join(str(per_split.get(s, 0)) for s in SPLITS) + " |")
    rows.append("| images | " + " | ".join(str(data.splits.get(s, 0)) for s in SPLITS) + " |")
    dates = f"{data.study_dates[0]} to {data.study_dates[1]}" if data.study_dates else "unknown"
    lines = [
        "## Training data",
        "",
        f"- Source: **{data.kind.value}**: {data.description}.",
        f"- {data.images} images from {data.studies} studies. Positive images per label and split:",
        "",
        *rows,
        "",
        f"- Modalities: {_mix(data.modalities)}. Manufacturers: {_mix(data.manufacturers)}.",
        f"- Study dates: {dates}" + (f" ({data.dates_note})" if data.dates_note else "") + ".",
        f"- De-identification: {data.deidentification}.",
    ]
    if data.label_sources:
        lines.append(
            "- Labels: "
            + ", ".join(f"{n} images labelled by {source}" for source, n in data.label_sources.items())
            + " (`reader`: a radiologist's feedback decided at least one finding; `ai`: the screening's own"
            " findings, unreviewed)."
        )
    lines.append(
        f"- Dataset manifest sha256 `{data.manifest_sha256}` (split, file, file sha256 and labels of every image;"
        " the manifest stays with the data)."
    )
    return "\n".join(lines)


def describe_model(static: Mapping[str, Any], data: TrainingData, synthetic_note: str) -> dict[str, Any]:
    """The manifest's ``name`` and ``intended_use`` for this data: only a version trained on
    synthetic data is called the synthetic-trained reference (``synthetic_note`` appended);
    the training config holds neither claim, so a site's version never inherits it."""
    out = dict(static)
    if data.kind is DataKindValues.SYNTHETIC:
        out["name"] = f"{static['name']} (reference, synthetic-trained)"
        out["intended_use"] = f"{str(static['intended_use']).rstrip()} {synthetic_note}"
    return out


def card_banner(data: TrainingData) -> str:
    """The card's first line: what this version has seen."""
    if data.kind is DataKindValues.SYNTHETIC:
        return "**Trained on synthetic data only. Not for clinical use.**"
    if data.kind is DataKindValues.STORE_EXPORT:
        return (
            f"**Trained on {data.studies} de-identified studies exported from the site's DICOM store.** Validate it"
            " on studies it has not seen (`dxassist models validate`) before it screens a patient."
        )
    return (
        f"**Trained on {data.studies} studies of a labelled folder ({data.description}).** Validate it on the"
        " site's own studies (`dxassist models validate`) before it screens a patient."
    )


def _mix(counts: Mapping[str, int]) -> str:
    total = sum(counts.values()) or 1
    return ", ".join(f"{k} {v} ({v / total:.0%})" for k, v in counts.items()) or "unknown"
