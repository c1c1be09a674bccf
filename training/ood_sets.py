"""Image sets for fitting and evaluating the out-of-distribution gate (models/ood.py).

* in-distribution: the model's own training / validation / held-out test images, read through
  the model's preprocessing (the same tensors the model saw);
* far-OOD: what ships with this checkout and is certainly not the model's input: pydicom's
  and pydicom-data's MR, CT, ultrasound, nuclear medicine, segmentation, secondary-capture
  images and the real lower-leg CR ``RG3``; real radiographs the reference models never saw
  (``RG1``); and project-generated non-chest phantoms (limb, head, abdomen, hand);
* near-OOD: the model's own held-out images changed the way real inputs go wrong: rotated,
  upside down, mirrored, polarity inverted, heavy noise, cropped (and for colour frames,
  greyscale).

Files are found by name with ``pydicom.data.get_testdata_file(NAME)`` only; the glob form
tries to download and is never used. Colour images are shown to a greyscale model as their
luminance and greyscale images to a colour model as three equal channels, so that every image
reaches the network (the content check would refuse most of them first; the evaluation
measures the gate on its own).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from models.errors import InputRejected
from models.pixels import PixelFrame, f32, load_frames
from models.preprocessing import Pipeline
from models.synthetic.cxr import LABELS, render_cxr
from models.synthetic.endoscopy import render_frame

logger = logging.getLogger(__name__)

#: pydicom / pydicom-data files used as far-OOD inputs (name -> what it is).
FAR_OOD_FILES: dict[str, str] = {
    "RG3_UNCR": "real lower-leg CR",
    "RG3_UNCI": "real lower-leg CR",
    "RG3_J2KR": "real lower-leg CR",
    "RG3_J2KI": "real lower-leg CR",
    "MR_small": "MR slice",
    "MR2_UNCR": "MR slice",
    "MR-SIEMENS-DICOM-WithOverlays": "MR slice",
    "emri_small": "enhanced MR slices",
    "CT_small": "CT slice",
    "693_UNCR": "CT slice",
    "eCT_Supplemental": "enhanced CT slices",
    "US1_UNCR": "ultrasound (colour)",
    "JPGLosslessP14SV1_1s_1f_8b": "ultrasound (greyscale)",
    "gdcm-US-ALOKA-16": "ultrasound (palette)",
    "OBXXXX1A": "ultrasound (palette)",
    "examples_palette": "ultrasound (palette)",
    "liver": "segmentation mask (1 bit)",
    "JPEG-LL": "nuclear medicine whole body",
    "JPGExtended": "nuclear medicine whole body",
    "mlut_18": "secondary capture test pattern",
    "image_dfl": "secondary capture",
    "examples_rgb_color": "colour secondary capture",
    "examples_ybr_color": "colour secondary capture",
}
#: real chest radiographs: out of distribution for a model trained on phantoms only.
REAL_CHEST_FILES = ("RG1_UNCR", "RG1_UNCI", "RG1_J2KR", "RG1_J2KI")


@dataclass
class ImageSet:
    """Preprocessed model inputs ``(N, C, H, W)`` and a short name for each row."""

    name: str
    tensors: NDArray[np.float32]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.tensors)


def testdata_path(name: str) -> Path | None:
    """A pydicom / pydicom-data test file by exact name (never the glob: it downloads)."""
    from pydicom.data import get_testdata_file

    try:
        found = get_testdata_file(f"{name}.dcm")
    except Exception:  # a missing optional file is not an error for the evaluation
        return None
    return Path(str(found)) if found else None


def adapt(pixels: NDArray[np.float32], channels: int) -> NDArray[np.float32]:
    """Greyscale <-> colour so that any frame fits a model's channel count."""
    if channels == 1 and pixels.ndim == 3:
        return f32(pixels @ np.array([0.299, 0.587, 0.114], np.float32))
    if channels == 3 and pixels.ndim == 2:
        return f32(np.repeat(pixels[..., None], 3, axis=2))
    return pixels


def to_tensor(
    pixels: NDArray[np.float32], pipeline: Pipeline, channels: int, template: PixelFrame
) -> NDArray[np.float32]:
    frame = PixelFrame(pixels=np.ascontiguousarray(adapt(pixels, channels)), header=template.header, frame_index=0)
    return pipeline(frame)


def frames_of(path: Path, pipeline: Pipeline, max_frames: int = 3) -> list[PixelFrame]:
    """Up to ``max_frames`` decoded frames, or none when the file does not decode."""
    try:
        frames = load_frames(path, target_size=pipeline.decode_size)
    except InputRejected:
        return []
    return frames[:max_frames]


def file_set(name: str, files: Iterable[str], pipeline: Pipeline, channels: int) -> ImageSet:
    tensors, sources = [], []
    for stem in files:
        path = testdata_path(stem)
        if path is None:
            logger.info("test file %s not installed; skipped", stem)
            continue
        for frame in frames_of(path, pipeline):
            tensors.append(to_tensor(frame.pixels, pipeline, channels, frame))
            sources.append(stem)
    return ImageSet(name, _stack(tensors, pipeline, channels), sources)


def _stack(tensors: Sequence[NDArray[np.float32]], pipeline: Pipeline, channels: int) -> NDArray[np.float32]:
    if not tensors:
        return np.zeros((0, channels, pipeline.size, pipeline.size), np.float32)
    return np.stack(tensors).astype(np.float32, copy=False)


# ------------------------------------------------------------------------------------------
# project-generated non-chest phantoms (attenuation maps in [0, 1], bright = dense)


def _grid(size: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    return xx, yy


def _finish(img: NDArray[np.float32], rng: np.random.Generator, noise: float = 0.02) -> NDArray[np.float32]:
    img = img + rng.normal(0, noise, img.shape).astype(np.float32)
    return f32(np.clip(cv2.GaussianBlur(img, (0, 0), 1.0), 0.0, 1.0))


def limb_phantom(rng: np.random.Generator, size: int = 512) -> NDArray[np.float32]:
    """A lower leg or forearm radiograph: two long bones in soft tissue, collimated edges."""
    xx, yy = _grid(size)
    angle = rng.uniform(-0.15, 0.15)
    u = (xx - 0.5) * np.cos(angle) - (yy - 0.5) * np.sin(angle)
    soft = np.exp(-((u / rng.uniform(0.16, 0.24)) ** 4)) * 0.35
    img = soft.copy()
    for offset, width in ((rng.uniform(-0.08, -0.03), rng.uniform(0.035, 0.06)), (rng.uniform(0.03, 0.08), 0.025)):
        shaft = np.abs(u - offset) / width
        cortex = np.clip(1.0 - np.abs(shaft - 0.8) / 0.25, 0, 1) * 0.5 + (shaft < 1.0) * 0.25
        img = img + cortex.astype(np.float32)
    edge = rng.uniform(0.05, 0.2)
    img[(xx < edge) | (xx > 1 - edge)] = 1.0  # collimator blades: unexposed, shown bright
    return _finish(img.astype(np.float32), rng)


def head_phantom(rng: np.random.Generator, size: int = 512) -> NDArray[np.float32]:
    """An axial head slice: skull ring around brain on a black background (CT-like)."""
    xx, yy = _grid(size)
    r = np.sqrt(((xx - 0.5) / rng.uniform(0.32, 0.4)) ** 2 + ((yy - 0.5) / rng.uniform(0.38, 0.45)) ** 2)
    img = np.where(r < 1.0, 0.45 + 0.05 * np.sin(xx * 40) * np.sin(yy * 37), 0.0)
    img = img + np.clip(1.0 - np.abs(r - 1.0) / 0.06, 0, 1) * 0.55
    ventricles = np.sqrt(((xx - 0.5) / 0.05) ** 2 + ((yy - 0.48) / 0.12) ** 2) < 1.0
    img[ventricles] = 0.3
    return _finish(img.astype(np.float32), rng)


def abdomen_phantom(rng: np.random.Generator, size: int = 512) -> NDArray[np.float32]:
    """An abdominal radiograph: soft tissue, bowel gas bubbles, spine and pelvis outline."""
    xx, yy = _grid(size)
    body = np.exp(-(((xx - 0.5) / 0.42) ** 6)) * 0.5
    img = body.astype(np.float32)
    for _ in range(int(rng.integers(8, 20))):
        cx, cy, rad = rng.uniform(0.25, 0.75), rng.uniform(0.2, 0.7), rng.uniform(0.02, 0.06)
        img[((xx - cx) ** 2 + (yy - cy) ** 2) < rad**2] -= 0.25
    spine = (np.abs(xx - 0.5) < 0.04) & ((yy * 12) % 1.0 < 0.8)
    img[spine] += 0.35
    pelvis = np.abs(np.sqrt(((xx - 0.5) / 0.3) ** 2 + ((yy - 1.0) / 0.25) ** 2) - 1.0) < 0.05
    img[pelvis] += 0.4
    return _finish(img, rng)


def hand_phantom(rng: np.random.Generator, size: int = 512) -> NDArray[np.float32]:
    """A hand radiograph: palm and five fingers of short bones on a dark background."""
    xx, yy = _grid(size)
    img = np.zeros((size, size), np.float32)
    palm = (((xx - 0.5) / 0.2) ** 2 + ((yy - 0.72) / 0.16) ** 2) < 1.0
    img[palm] = 0.35
    for i, cx in enumerate(np.linspace(0.34, 0.66, 5)):
        top = 0.2 + 0.1 * abs(i - 2) / 2 + rng.uniform(-0.03, 0.03)
        finger = (np.abs(xx - cx) < 0.03) & (yy > top) & (yy < 0.65)
        img[finger] = 0.35
        bone = (np.abs(xx - cx) < 0.015) & (yy > top + 0.02) & (yy < 0.85) & ((yy * 14) % 1.0 < 0.85)
        img[bone] = 0.8
    return _finish(img, rng)


PHANTOMS: dict[str, Callable[[np.random.Generator, int], NDArray[np.float32]]] = {
    "limb": limb_phantom,
    "head": head_phantom,
    "abdomen": abdomen_phantom,
    "hand": hand_phantom,
}


def phantom_set(
    pipeline: Pipeline, channels: int, template: PixelFrame, n_each: int = 25, seed: int = 4242
) -> ImageSet:
    """Non-chest phantoms, plus endoscopy frames for a greyscale model and chest radiograph
    phantoms for a colour model."""
    rng = np.random.default_rng(seed)
    tensors, sources = [], []
    for name, make in PHANTOMS.items():
        for _ in range(n_each):
            tensors.append(to_tensor(make(rng, 512), pipeline, channels, template))
            sources.append(f"phantom:{name}")
    if channels == 1:
        for _ in range(n_each):
            rgb, _ = render_frame(rng, 320, bool(rng.random() < 0.5))
            tensors.append(to_tensor(rgb, pipeline, channels, template))
            sources.append("phantom:endoscopy")
    else:
        for _ in range(n_each):
            chest, _ = render_cxr(rng, (512, 512), dict.fromkeys(LABELS, False))
            tensors.append(to_tensor(chest, pipeline, channels, template))
            sources.append("phantom:chest radiograph")
    return ImageSet(
        "non-chest phantoms" if channels == 1 else "non-endoscopy phantoms",
        _stack(tensors, pipeline, channels),
        sources,
    )


# ------------------------------------------------------------------------------------------
# near-OOD: the model's own held-out frames, changed


def _noisy(p: NDArray[np.float32], rng: np.random.Generator) -> NDArray[np.float32]:
    return f32(np.clip(p + rng.normal(0, 0.25, p.shape).astype(np.float32), 0, 1))


def _crop(p: NDArray[np.float32], rng: np.random.Generator) -> NDArray[np.float32]:
    h, w = p.shape[:2]
    y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    return np.ascontiguousarray(p[y : y + h // 2, x : x + w // 2])


NEAR_OOD: dict[str, Callable[[NDArray[np.float32], np.random.Generator], NDArray[np.float32]]] = {
    "rotated 90 degrees": lambda p, rng: np.ascontiguousarray(np.rot90(p)),
    "upside down": lambda p, rng: np.ascontiguousarray(p[::-1]),
    "mirrored left-right": lambda p, rng: np.ascontiguousarray(p[:, ::-1]),
    "polarity inverted": lambda p, rng: f32(1.0 - p),
    "heavy noise (sd 0.25)": _noisy,
    "cropped to a quarter": _crop,
}


def near_ood_sets(frames: Sequence[PixelFrame], pipeline: Pipeline, channels: int, seed: int = 77) -> list[ImageSet]:
    """One set per change in ``NEAR_OOD`` (plus greyscale for a colour model)."""
    rng = np.random.default_rng(seed)
    changes = dict(NEAR_OOD)
    if channels == 3:
        changes["greyscale"] = lambda p, rng: f32(np.repeat(adapt(p, 1)[..., None], 3, axis=2))
    sets = []
    for name, change in changes.items():
        tensors = [to_tensor(change(f.pixels, rng), pipeline, channels, f) for f in frames]
        sets.append(ImageSet(name, _stack(tensors, pipeline, channels), [name] * len(tensors)))
    return sets
