"""The seed corpus the fuzzer mutates: synthetic images made here and pydicom's test files.

Synthetic seeds come from ``models.synthetic`` (the generators of the demo set and the training
data) in every encoding dxassist accepts; pydicom's files are taken **by name** with
``get_testdata_file`` (never ``get_testdata_files("*")``, which tries to download). Seeds are
small (<= 300 kB, mostly a few kB) so that thousands of cases run in minutes.
"""

from __future__ import annotations

import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Final

import numpy as np

from models.synthetic.cxr import render_cxr
from models.synthetic.dicom_writer import DicomSpec, write_image
from models.synthetic.endoscopy import render_frame, write_frame, write_video

#: pydicom test files by name: transfer syntaxes, photometrics, LUTs, multi-frame, non-images.
PYDICOM_SEEDS: Final = (
    "MR_small.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
    "JPEG2000.dcm",
    "JPGExtended.dcm",
    "SC_rgb.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_rgb_jpeg_dcmtk.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "SC_rgb_small_odd.dcm",
    "examples_palette.dcm",
    "vlut_04.dcm",
    "image_dfl.dcm",
    "CT_small.dcm",
    "rtplan.dcm",
    "emri_small.dcm",
    "JPGLosslessP14SV1_1s_1f_8b.dcm",
)

_WANT: Final = {
    "cardiomegaly": True,
    "pleural_effusion": False,
    "pneumothorax": True,
    "nodule_mass": False,
    "consolidation": False,
}


def _cxr(
    folder: Path,
    name: str,
    *,
    encoding: str = "explicit",
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    rescale: bool = False,
    window: bool = True,
    size: tuple[int, int] = (160, 144),
    seed: int = 3,
) -> bytes:
    rng = np.random.default_rng(seed)
    image, _ = render_cxr(rng, size, dict(_WANT))
    spec = DicomSpec("CR", "CHEST", "PA", photometric, bits, rescale, window, seed, seed, "FUZZ SEED")
    path = folder / f"{name}.dcm"
    write_image(path, image, spec, rng, encoding=encoding)
    return path.read_bytes()


def _endo(folder: Path, name: str, *, encoding: str = "explicit", video: bool = False) -> bytes:
    rng = np.random.default_rng(11)
    path = folder / f"{name}.dcm"
    spec = DicomSpec("ES", "COLON", "", "RGB", 8, False, False, 1, 11, "FUZZ SEED")
    if video:
        frames = np.stack([render_frame(rng, 96, polyp=i % 2 == 0)[0] for i in range(3)])
        write_video(path, frames, spec)
    else:
        write_frame(path, render_frame(rng, 96, polyp=True)[0], spec, encoding=encoding)
    return path.read_bytes()


@lru_cache(maxsize=1)
def synthetic_seeds() -> tuple[tuple[str, bytes], ...]:
    """Small synthetic chest and endoscopy images in every encoding the service accepts."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        seeds = [
            ("cxr-explicit", _cxr(folder, "a")),
            ("cxr-m1-rescale", _cxr(folder, "b", photometric="MONOCHROME1", rescale=True)),
            ("cxr-nowindow-16", _cxr(folder, "c", bits=16, window=False)),
            ("cxr-deflate", _cxr(folder, "d", encoding="deflate")),
            ("cxr-rle", _cxr(folder, "e", encoding="rle")),
            ("cxr-j2k", _cxr(folder, "f", encoding="j2k")),
            ("cxr-j2k-lossy", _cxr(folder, "g", encoding="j2k-lossy", size=(600, 560))),
            ("endo-rgb", _endo(folder, "h")),
            ("endo-jpeg", _endo(folder, "i", encoding="jpeg")),
            ("endo-video", _endo(folder, "j", video=True)),
        ]
    return tuple(seeds)


@lru_cache(maxsize=1)
def pydicom_seeds() -> tuple[tuple[str, bytes], ...]:
    """pydicom's own test files, each fetched by its exact name."""
    from pydicom.data import get_testdata_file

    out = []
    for name in PYDICOM_SEEDS:
        path = get_testdata_file(name)
        if path:
            out.append((name, Path(str(path)).read_bytes()))
    return tuple(out)


def all_seeds() -> tuple[tuple[str, bytes], ...]:
    return synthetic_seeds() + pydicom_seeds()
