"""The demo study set, built by the project (nothing downloaded):

* ``chest/``     the real adult PA chest CR ``RG1`` from the ``pydicom-data`` package (NEMA WG04, MIT)
                 in its four encodings: uncompressed (from lossless and from lossy), JPEG 2000
                 lossless, JPEG 2000 lossy. The reference models have seen phantoms only, so
                 they refuse it (OUT_OF_DISTRIBUTION) instead of inventing findings;
* ``leg/``       the lower-leg CR ``RG3`` (a negative control: must never get a chest finding),
                 once as labelled and once relabelled CR/CHEST/PA (refused on its content);
* ``other/``     pydicom's MR and CT slices relabelled CR/CHEST/PA (refused on their content);
* ``bad/``       a truncated DICOM and a file that is not DICOM at all;
* ``synthetic/`` phantom chest radiographs with findings placed by construction (one of them a
                 lateral view, which the chest model does not accept) and, when the endoscopy
                 model is registered, synthetic endoscopy frames and a short video.

``expected.csv`` says what each file should produce.
"""

from __future__ import annotations

import csv
import logging
import shutil
from pathlib import Path

import numpy as np

from models.synthetic.cxr import generate_cxr_dataset, render_cxr
from models.synthetic.dicom_writer import DicomSpec, write_image

logger = logging.getLogger(__name__)

DEMO_SEED = 7
RG1 = ("RG1_UNCR.dcm", "RG1_UNCI.dcm", "RG1_J2KR.dcm", "RG1_J2KI.dcm")
RG3 = ("RG3_UNCR.dcm", "RG3_J2KI.dcm")
#: files shown labelled as a chest radiograph: (source, folder, what the content gate says)
RELABELLED = (
    ("RG3_UNCR.dcm", "leg", "NOT_SCREENED CONTENT_MISMATCH or OUT_OF_DISTRIBUTION"),
    ("MR2_UNCR.dcm", "other", "NOT_SCREENED CONTENT_MISMATCH"),
    ("693_UNCR.dcm", "other", "NOT_SCREENED CONTENT_MISMATCH"),
)


def _relabel_as_chest(src: Path, dst: Path) -> None:
    """Write ``src`` with a header that claims CR / CHEST / PA (what a mislabelled study does)."""
    import pydicom

    ds = pydicom.dcmread(src)
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.save_as(dst, enforce_file_format=True)


def _registry_file(name: str) -> Path | None:
    try:
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover - pydicom always has it
        return None
    path = get_testdata_file(name)  # a single name: never the glob form, which downloads
    return Path(str(path)) if path else None


def build_demo_set(root: Path, *, with_endoscopy: bool = True) -> Path:
    """Create (or refresh) the demo study set under ``root``; returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    expected: list[tuple[str, str]] = []
    for folder, names, expect in (
        ("chest", RG1, "NOT_SCREENED OUT_OF_DISTRIBUTION (real radiograph; reference model saw phantoms only)"),
        ("leg", RG3, "NOT_SCREENED UNSUPPORTED_BODY_PART"),
    ):
        for name in names:
            src = _registry_file(name)
            if src is None:
                logger.warning("pydicom-data is not installed: demo radiograph skipped")
                continue
            (root / folder).mkdir(exist_ok=True)
            shutil.copyfile(src, root / folder / name)
            expected.append((f"{folder}/{name}", expect))

    for name, folder, expect in RELABELLED:
        src = _registry_file(name)
        if src is None:
            continue
        (root / folder).mkdir(exist_ok=True)
        target = f"{Path(name).stem}_labelled_chest.dcm"
        _relabel_as_chest(src, root / folder / target)
        expected.append((f"{folder}/{target}", expect))

    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    synth = root / "synthetic" / "chest"
    generate_cxr_dataset(synth, 6, DEMO_SEED, prevalence=0.35)
    with (synth / "Data_Entry.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            expected.append((f"synthetic/chest/{row['Image Index']}", f"SCREENED; truth: {row['Finding Labels']}"))
    rng = np.random.default_rng(DEMO_SEED)
    image, _ = render_cxr(
        rng,
        (512, 512),
        dict.fromkeys(("cardiomegaly", "pleural_effusion", "pneumothorax", "nodule_mass", "consolidation"), False),
    )
    lateral = DicomSpec("CR", "CHEST", "LL", "MONOCHROME2", 12, False, True, 900, DEMO_SEED, "SYNTHETIC LATERAL")
    write_image(synth / "lateral_view.dcm", image, lateral, rng)
    expected.append(("synthetic/chest/lateral_view.dcm", "NOT_SCREENED UNSUPPORTED_VIEW"))

    whole = (synth / sorted(p.name for p in synth.glob("cxr_*.dcm"))[0]).read_bytes()
    (bad / "truncated.dcm").write_bytes(whole[: int(len(whole) * 0.6)])
    expected.append(("bad/truncated.dcm", "NOT_SCREENED CORRUPT_FILE or DECODE_FAILED"))
    (bad / "not_dicom.dcm").write_bytes(b"%PDF-1.4\n" + rng.bytes(4096))
    expected.append(("bad/not_dicom.dcm", "NOT_SCREENED NOT_DICOM"))

    if with_endoscopy:
        try:
            from models.synthetic.endoscopy import generate_endoscopy_demo
        except ImportError:
            pass
        else:
            expected.extend(generate_endoscopy_demo(root / "synthetic" / "endoscopy", DEMO_SEED))

    with (root / "expected.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "expected"])
        writer.writerows(expected)
    return root
