"""Procedural colonoscopy frames with polyps (and their masks), written as real DICOM.

A frame is mucosa (pink-red, textured, with folds, vessels and a dark lumen) inside a round
field of view, lit from the scope tip, with specular highlights. A polyp is a raised blob with
an irregular border, its own colour and shading and a highlight of its own; its mask is the
ground truth. Frames without polyps keep the same confusers (highlights, folds).

``generate_kvasir_folder`` writes the Kvasir-SEG layout (``images/`` + ``masks/``), with images
as VL Endoscopic Image DICOM; ``write_video`` writes a multi-frame, video-endoscopic-style
instance (JPEG baseline, one polyp drifting through the view).
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset

from models.pixels import f32
from models.synthetic.dicom_writer import (
    VIDEO_ENDOSCOPIC_IMAGE_STORAGE,
    VL_ENDOSCOPIC_IMAGE_STORAGE,
    DicomSpec,
    _encode,
    _finish,
    base_dataset,
)


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> NDArray[np.float32]:
    n = rng.standard_normal(shape).astype(np.float32)
    out = f32(cv2.GaussianBlur(n, (0, 0), sigma))
    return f32(out / (out.std() + 1e-6))


def render_frame(
    rng: np.random.Generator,
    size: int,
    polyp: bool,
    *,
    center: tuple[float, float] | None = None,
    radius: float | None = None,
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """One RGB frame in [0, 1] (H, W, 3) and its polyp mask (H, W)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = np.array([0.78, 0.38, 0.33], np.float32) + rng.normal(0, 0.04, 3).astype(np.float32)
    tex = _noise(rng, (size, size), 6.0)
    img = base[None, None, :] * (1.0 + 0.08 * tex[..., None])
    # lumen: a dark region somewhere off-centre, light falls off towards it
    lx, ly = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)
    dist = np.sqrt((xx - lx) ** 2 + (yy - ly) ** 2)
    img *= (0.35 + 0.65 * np.clip(dist / 0.45, 0, 1))[..., None]
    # folds: darker curved bands
    for _ in range(int(rng.integers(2, 5))):
        r0 = rng.uniform(0.15, 0.5)
        band = np.exp(-(((dist - r0) / 0.015) ** 2))
        img *= (1.0 - 0.25 * band)[..., None]
    # vessels: thin dark lines
    vessels = np.abs(_noise(rng, (size, size), 2.5)) < 0.05
    img[vessels] *= np.array([0.8, 0.6, 0.65], np.float32)
    mask = np.zeros((size, size), bool)
    if polyp:
        cx, cy = center if center else (rng.uniform(0.25, 0.75), rng.uniform(0.25, 0.75))
        r = radius if radius else rng.uniform(0.06, 0.18)
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = 1.0 + 0.12 * np.sin(3 * angle + rng.uniform(0, 6)) + 0.06 * np.sin(5 * angle + rng.uniform(0, 6))
        ratio = np.sqrt((xx - cx) ** 2 + ((yy - cy) / rng.uniform(0.75, 1.0)) ** 2) / (r * wobble)
        mask = ratio <= 1.0
        colour = np.array([0.86, 0.48, 0.42], np.float32) + rng.normal(0, 0.05, 3).astype(np.float32)
        shade = np.clip(1.15 - 0.35 * ratio + 0.2 * ((xx - cx) + (yy - cy)) / r * -0.5, 0.6, 1.3)
        surface = colour[None, None, :] * shade[..., None] * (1.0 + 0.05 * _noise(rng, (size, size), 2.0)[..., None])
        edge = np.clip((1.0 - ratio) / 0.08, 0, 1)[..., None]
        img = np.where(mask[..., None], img * (1 - edge) + surface * edge, img)
        hx, hy = cx - 0.3 * r, cy - 0.3 * r
        glint = np.exp(-(((xx - hx) ** 2 + (yy - hy) ** 2) / (0.02 * r) ** 2))
        img += glint[..., None] * 0.8
    # specular highlights elsewhere (confusers)
    for _ in range(int(rng.integers(2, 8))):
        hx, hy, s = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.004, 0.012)
        img += (np.exp(-(((xx - hx) ** 2 + (yy - hy) ** 2) / s**2)) * 0.9)[..., None]
    fov = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) <= 0.49**2
    img *= fov[..., None]
    mask &= fov
    return np.clip(img, 0.0, 1.0).astype(np.float32), mask


def _endo_spec(index: int, seed: int, study_key: str = "") -> DicomSpec:
    return DicomSpec(
        modality="ES",
        body_part="COLON",
        view_position="",
        photometric="RGB",
        bits_stored=8,
        rescale=False,
        window=False,
        patient_index=index,
        seed=seed,
        series_description="SYNTHETIC COLONOSCOPY",
        study_key=study_key,
    )


def _colour_dataset(spec: DicomSpec, sop_class: str, frames: NDArray[np.uint8], instance: int = 1) -> Dataset:
    ds = base_dataset(spec, sop_class, instance)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = frames.shape[-3], frames.shape[-2]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if frames.ndim == 4:
        ds.NumberOfFrames = frames.shape[0]
        ds.FrameTime = 40.0
    return ds


def write_frame(path: Path, rgb: NDArray[np.float32], spec: DicomSpec, *, encoding: str = "explicit") -> Dataset:
    """A VL Endoscopic Image (uncompressed RGB, or JPEG baseline as endoscopy towers send)."""
    arr = np.round(rgb * 255).astype(np.uint8)
    ds = _colour_dataset(spec, VL_ENDOSCOPIC_IMAGE_STORAGE, arr)
    ts = _encode(ds, arr, encoding)
    _finish(ds, path, ts)
    return ds


def write_video(path: Path, frames: NDArray[np.float32], spec: DicomSpec) -> Dataset:
    """A multi-frame, video-endoscopic-style instance: JPEG baseline, one fragment per frame."""
    arr = np.round(frames * 255).astype(np.uint8)
    ds = _colour_dataset(spec, VIDEO_ENDOSCOPIC_IMAGE_STORAGE, arr)
    ts = _encode(ds, arr, "jpeg")
    _finish(ds, path, ts)
    return ds


def generate_kvasir_folder(out: Path, n: int, seed: int, *, size: int = 320, prevalence: float = 0.6) -> Path:
    """Kvasir-SEG layout: ``images/<name>.dcm`` + ``masks/<name>.png`` (+ ``labels.csv``)."""
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        has = bool(rng.random() < prevalence)
        rgb, mask = render_frame(rng, size, has)
        name = f"endo_{seed}_{i:05d}"
        write_frame(out / "images" / f"{name}.dcm", rgb, _endo_spec(i, seed), encoding="jpeg" if i % 2 else "explicit")
        cv2.imwrite(str(out / "masks" / f"{name}.png"), mask.astype(np.uint8) * 255)
        rows.append([name, int(mask.any())])
    with (out / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "polyp"])
        writer.writerows(rows)
    return out


def generate_endoscopy_demo(out: Path, seed: int) -> list[tuple[str, str]]:
    """Two single frames (with/without polyp) and a 12-frame video; returns expected outcomes."""
    rng = np.random.default_rng(seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    expected = []
    for i, has in enumerate((True, False)):
        rgb, _ = render_frame(rng, 320, has, radius=0.14 if has else None)
        name = f"frame_{'polyp' if has else 'clear'}.dcm"
        write_frame(out / name, rgb, _endo_spec(800 + i, seed), encoding="jpeg")
        expected.append((f"synthetic/endoscopy/{name}", f"SCREENED; truth: {'polyp' if has else 'no polyp'}"))
    frames = []
    for t in range(12):
        rgb, _ = render_frame(
            np.random.default_rng(seed * 100 + t), 320, 4 <= t <= 9, center=(0.3 + 0.04 * t, 0.5), radius=0.12
        )
        frames.append(rgb)
    write_video(out / "video.dcm", np.stack(frames), _endo_spec(810, seed))
    expected.append(("synthetic/endoscopy/video.dcm", "SCREENED; truth: polyp in frames 4-9"))
    return expected
