"""Screen local files and write the DICOM result objects the store-back would store (SR, GSPS,
SC, SEG) into a folder: for a site without a PACS, or a reviewer who wants to inspect and
validate them (``dxassist screen PATH... --dicom-out DIR``).

Files go to ``DIR/<study ref>/{sr,gsps,sc-<n>,seg-<n>}.dcm``: the keyed study reference, never a
UID or a name, in the path.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from models.errors import DxAssistError, InferenceFailed
from models.pixels import decode_frames, read_dataset
from models.results import OutcomeValues, ScreeningResult
from serving.core.screening import InstanceInput, ModelOutputs, PreparedImage, StudyScreener
from serving.dicom.common import placed_findings
from serving.dicom.gsps import build_gsps
from serving.dicom.sc import build_scs
from serving.dicom.seg import build_seg
from serving.dicom.sr import build_sr


def _frames(
    result: ScreeningResult, images: Sequence[Dataset], paths: dict[str, Path]
) -> dict[tuple[str, int | None], NDArray[np.float32]]:
    wanted: dict[str, set[int | None]] = {}
    for p in placed_findings(result, images):
        wanted.setdefault(str(p.image.SOPInstanceUID), set()).add(p.frame_number)
    if not wanted and images:
        wanted[str(images[0].SOPInstanceUID)] = {None}
    frames: dict[tuple[str, int | None], NDArray[np.float32]] = {}
    for sop, numbers in wanted.items():
        if sop not in paths:
            continue
        try:
            ds = read_dataset(paths[sop])
            for number in numbers:
                frames[(sop, number)] = decode_frames(ds, frame_indices=[(number or 1) - 1])[0].pixels
        except DxAssistError:
            continue
    return frames


def result_objects(
    result: ScreeningResult,
    paired: Sequence[tuple[PreparedImage, ModelOutputs | InferenceFailed]],
    screener: StudyScreener,
    paths: dict[str, Path],
    objects: Iterable[str],
) -> list[tuple[str, Dataset]]:
    """(name, dataset) of every object ``objects`` asks for."""
    kinds = set(objects)
    images = [image.header for image, _ in paired if image.header is not None]
    if not images or result.outcome != OutcomeValues.SCREENED:
        return []
    out: list[tuple[str, Dataset]] = []
    if "sr" in kinds:
        out.append(("sr", build_sr(result, images)))
    if "gsps" in kinds and (gsps := build_gsps(result, images)) is not None:
        out.append(("gsps", gsps))
    if "sc" in kinds and result.positive_findings:
        out += [(f"sc-{n}", sc) for n, sc in enumerate(build_scs(result, images, _frames(result, images, paths)), 1)]
    if "seg" in kinds:
        out += [(f"seg-{n}", seg) for n, seg in enumerate(build_seg(result, paired, screener.loaded), 1)]
    return out


def screen_to_folder(
    screener: StudyScreener,
    files: Sequence[Path],
    out_dir: Path,
    *,
    objects: Iterable[str] = ("sr", "gsps", "sc", "seg"),
    group_by_study: bool = True,
) -> list[tuple[ScreeningResult, list[Path]]]:
    """Screen ``files`` (one study per Study Instance UID, or one per file) and write each
    study's result objects under ``out_dir``; returns each result with the files written."""
    kinds = tuple(objects)
    paths: dict[str, Path] = {}
    done = []
    screened = screener.screen_studies((InstanceInput(p, str(p)) for p in files), group_by_study=group_by_study)
    for result, paired in screened:
        paths.update({image.sop_instance_uid: Path(image.label) for image, _ in paired})
        written = []
        folder = out_dir / (result.study_ref or "unknown")
        for name, ds in result_objects(result, paired, screener, paths, kinds):
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{name}.dcm"
            ds.save_as(target, enforce_file_format=True)
            written.append(target)
        done.append((result, written))
    return done
