"""Procedural chest radiograph phantom written as real DICOM, with findings placed by construction.

Anatomy: body outline, two lungs with vessel markings, ribs, clavicles, mediastinum, spine,
heart and diaphragm domes. Findings (each independent, ~25 % prevalence by default):

* ``cardiomegaly``     heart widened to a cardiothoracic ratio of 0.55-0.66 (normal 0.38-0.47)
* ``pleural_effusion`` dense fluid at a lung base with a meniscus, costophrenic angle blunted
* ``pneumothorax``     peripheral lucent rim without lung markings, with a visceral pleural line
* ``nodule_mass``      1-3 round opacities (nodule < 3 cm, mass >= 3 cm, as ChestX-ray14 splits them)
* ``consolidation``    a patchy airspace opacity with air bronchograms

Acquisition varies: CR or DX, PA or AP, MONOCHROME1 or 2, 12/14/16 bits stored, rescale
slope/intercept, window present or not, exposure, noise, patient size and rotation.

Everything is seeded: ``generate_cxr_dataset(out, n, seed)`` writes the same files for the
same arguments. Labels go to a ChestX-ray14-style ``Data_Entry.csv`` (plus ``BBox_List.csv``) so
the training loader reads real ChestX-ray14/NIH-style data the same way.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from numpy.typing import NDArray

from models.pixels import f32
from models.synthetic.dicom_writer import DicomSpec, write_image

LABELS = ("cardiomegaly", "pleural_effusion", "pneumothorax", "nodule_mass", "consolidation")
#: ChestX-ray14 label names for each of our keys (nodule_mass is "Nodule" or "Mass" by size).
CHESTXRAY14_NAMES = {
    "cardiomegaly": "Cardiomegaly",
    "pleural_effusion": "Effusion",
    "pneumothorax": "Pneumothorax",
    "consolidation": "Consolidation",
}


@dataclass
class CxrCase:
    """What the generator decided for one image (the ground truth)."""

    labels: dict[str, int]
    chestxray14: list[str]
    boxes: list[tuple[str, tuple[float, float, float, float]]] = field(default_factory=list)
    view_position: str = "PA"
    photometric: str = "MONOCHROME2"


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> NDArray[np.float32]:
    noise = rng.standard_normal(shape).astype(np.float32)
    k = int(sigma * 4) | 1
    out = f32(cv2.GaussianBlur(noise, (k, k), sigma))
    return f32(out / (out.std() + 1e-6))


def _ellipse(
    xx: NDArray[np.float32], yy: NDArray[np.float32], cx: float, cy: float, ax: float, ay: float
) -> NDArray[np.float32]:
    return (((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2).astype(np.float32)


def render_cxr(
    rng: np.random.Generator, size: tuple[int, int], want: dict[str, bool]
) -> tuple[NDArray[np.float32], CxrCase]:
    """Render one attenuation map in [0, 1] (bright = dense) and its ground truth."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx /= w
    yy /= h
    shift = rng.normal(0.0, 0.012)  # patient rotation / centring
    scale = rng.uniform(0.92, 1.06)
    xx = (xx - 0.5 - shift) / scale + 0.5
    yy = (yy - 0.5) / scale + 0.5

    case = CxrCase(labels=dict.fromkeys(LABELS, 0), chestxray14=[])
    img = np.full((h, w), 0.04, np.float32)
    body = _ellipse(xx, yy, 0.5, 0.62, 0.47, 0.62) <= 1.0
    img[body] = 0.42 + rng.uniform(-0.04, 0.04)

    # Lungs: left/right ellipses cut by a diaphragm dome.
    lung_cy, lung_ay = 0.43 + rng.normal(0, 0.01), rng.uniform(0.27, 0.31)
    lung_ax = rng.uniform(0.15, 0.175)
    lungs = np.zeros((h, w), bool)
    lung_masks = []
    dome_y = []
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.175, 0.195)
        m = _ellipse(xx, yy, cx, lung_cy, lung_ax, lung_ay) <= 1.0
        dome = lung_cy + lung_ay * 0.72 - 0.06 * np.exp(-(((xx - cx) / 0.09) ** 2))
        m &= yy < dome
        m &= np.abs(xx - 0.5) > 0.06  # mediastinum
        lung_masks.append(m)
        dome_y.append(dome)
        lungs |= m
    markings = np.clip(_smooth_noise(rng, (h, w), 2.0) * 0.5 + _smooth_noise(rng, (h, w), 6.0) * 0.5, -2, 2)
    hilum = np.exp(-(((np.abs(xx - 0.5) - 0.1) / 0.12) ** 2) - ((yy - 0.42) / 0.18) ** 2)
    lung_val = 0.13 + 0.035 * markings * (0.4 + hilum) + 0.05 * hilum
    img[lungs] = lung_val[lungs]

    # Heart (cardiothoracic ratio drives cardiomegaly).
    thorax_width = 2 * (0.185 + lung_ax)
    ctr = rng.uniform(0.55, 0.66) if want["cardiomegaly"] else rng.uniform(0.38, 0.47)
    heart_ax = ctr * thorax_width / 2
    heart_cx = 0.5 + 0.03 + rng.normal(0, 0.008)
    heart_cy = lung_cy + lung_ay * 0.45
    heart_ay = rng.uniform(0.12, 0.14)
    heart = _ellipse(xx, yy, heart_cx, heart_cy, heart_ax, heart_ay) <= 1.0
    img[heart] = np.maximum(img[heart], 0.5)
    media = (np.abs(xx - 0.5) < 0.055) & (yy > 0.08) & (yy < heart_cy)
    img[media] = np.maximum(img[media], 0.5)
    if want["cardiomegaly"]:
        case.labels["cardiomegaly"] = 1
        case.chestxray14.append("Cardiomegaly")
        case.boxes.append(("Cardiomegaly", (heart_cx - heart_ax, heart_cy - heart_ay, 2 * heart_ax, 2 * heart_ay)))
    spine = np.abs(xx - 0.5) < 0.03
    img[spine & body] += 0.05

    # Ribs and clavicles drawn over everything inside the body.
    ribs = np.zeros((h, w), np.float32)
    for side in (-1, 1):
        cx = 0.5 + side * 0.02
        for k in range(10):
            y0 = 0.16 + k * lung_ay * 0.2 + rng.normal(0, 0.004)
            curve = y0 + 0.9 * (xx - cx) ** 2 - 0.02 * k * np.abs(xx - cx)
            band = np.abs(yy - curve) < 0.009
            band &= (side * (xx - 0.5) > 0.02) & (side * (xx - 0.5) < 0.42)
            ribs[band] = 0.09
        clav = np.abs(yy - (0.13 + 0.12 * side * (xx - 0.5))) < 0.012
        clav &= (side * (xx - 0.5) > 0.03) & (side * (xx - 0.5) < 0.3)
        ribs[clav] = 0.12
    img += ribs * body

    def box_of(mask: NDArray[np.bool_]) -> tuple[float, float, float, float]:
        ys, xs = np.nonzero(mask)
        return (xs.min() / w, ys.min() / h, (xs.max() - xs.min() + 1) / w, (ys.max() - ys.min() + 1) / h)

    sides = [0, 1]
    if want["pneumothorax"]:
        s = int(rng.integers(0, 2))
        lung = lung_masks[s]
        cx = 0.5 + (s * 2 - 1) * 0.185
        # distance inward from the lung's outer (lateral/apical) boundary
        dist = cv2.distanceTransform(lung.astype(np.uint8), cv2.DIST_L2, 5) / w
        outer = ((xx - cx) * (s * 2 - 1) > -0.05) | (yy < lung_cy - 0.1)
        rim = rng.uniform(0.025, 0.06)
        ptx = lung & (dist < rim) & outer
        img[ptx] = 0.06 + 0.01 * rng.standard_normal(int(ptx.sum())).astype(np.float32)
        edge = lung & (np.abs(dist - rim) < 0.0035) & outer
        img[edge] = np.maximum(img[edge], 0.3)
        case.labels["pneumothorax"] = 1
        case.chestxray14.append("Pneumothorax")
        case.boxes.append(("Pneumothorax", box_of(ptx)))
        sides = [1 - s]  # keep effusion off the collapsed side
    if want["pleural_effusion"]:
        s = int(rng.choice(sides))
        lung = lung_masks[s]
        ys = np.nonzero(lung)[0]
        top, bottom = ys.min() / h, ys.max() / h
        level = bottom - rng.uniform(0.18, 0.38) * (bottom - top)
        lateral = (xx - 0.5) * (s * 2 - 1)
        meniscus = level - 0.12 * np.clip(lateral - 0.15, 0, None)
        fluid = lung & (yy > meniscus)
        blend = np.clip((yy - meniscus) / 0.02, 0, 1)
        img[fluid] = (img * (1 - blend) + 0.5 * blend)[fluid]
        case.labels["pleural_effusion"] = 1
        case.chestxray14.append("Effusion")
        case.boxes.append(("Effusion", box_of(fluid)))
    if want["nodule_mass"]:
        n = int(rng.integers(1, 4))
        names = set()
        for _ in range(n):
            s = int(rng.integers(0, 2))
            lung_idx = np.argwhere(lung_masks[s])
            py, px = lung_idx[rng.integers(len(lung_idx))]
            cyn, cxn = py / h, px / w
            mass = rng.random() < 0.3
            r = rng.uniform(0.035, 0.06) if mass else rng.uniform(0.017, 0.03)
            d = _ellipse(xx, yy, cxn, cyn, r, r * rng.uniform(0.85, 1.15))
            blob = np.clip(1.2 - d, 0, 1) ** 0.6
            img += (rng.uniform(0.18, 0.3) * blob).astype(np.float32)
            names.add("Mass" if mass else "Nodule")
            case.boxes.append(("Mass" if mass else "Nodule", (cxn - r, cyn - r, 2 * r, 2 * r)))
        case.labels["nodule_mass"] = 1
        case.chestxray14.extend(sorted(names))
    if want["consolidation"]:
        s = int(rng.integers(0, 2))
        lung = lung_masks[s]
        lung_idx = np.argwhere(lung)
        py, px = lung_idx[rng.integers(len(lung_idx))]
        region = _ellipse(xx, yy, px / w, py / h, rng.uniform(0.06, 0.1), rng.uniform(0.06, 0.12)) <= 1.0
        patch = region & lung & (_smooth_noise(rng, (h, w), 5.0) > -0.6)
        bronchi = np.abs(_smooth_noise(rng, (h, w), 3.0)) < 0.12
        opacity = np.where(bronchi, 0.12, rng.uniform(0.22, 0.3)).astype(np.float32)
        img[patch] += opacity[patch]
        if patch.any():
            case.labels["consolidation"] = 1
            case.chestxray14.append("Consolidation")
            case.boxes.append(("Consolidation", box_of(patch)))

    blurred = cv2.GaussianBlur(img, (0, 0), 1.0)
    return np.clip(blurred, 0.0, 1.0).astype(np.float32), case


def cxr_dicom_spec(rng: np.random.Generator, index: int, case: CxrCase, seed: int) -> DicomSpec:
    """Acquisition and header choices for one synthetic radiograph."""
    modality = "CR" if rng.random() < 0.6 else "DX"
    return DicomSpec(
        modality=modality,
        body_part="CHEST",
        view_position=case.view_position,
        photometric=case.photometric,
        bits_stored=int(rng.choice([12, 14, 16])),
        rescale=rng.random() < 0.3,
        window=rng.random() < 0.75,
        patient_index=index,
        seed=seed,
        series_description="SYNTHETIC PHANTOM CHEST",
    )


def generate_cxr_dataset(
    out_dir: Path,
    n: int,
    seed: int,
    *,
    size: tuple[int, int] = (512, 512),
    prevalence: float = 0.25,
    encodings: tuple[str, ...] = ("explicit",),
    start_index: int = 0,
) -> Path:
    """Write ``n`` synthetic chest radiographs and ``Data_Entry.csv``; returns the CSV path.

    Args:
        encodings: transfer syntaxes to cycle through (see ``dicom_writer.ENCODINGS``).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    entries = []
    boxes = []
    for i in range(start_index, start_index + n):
        want = {k: bool(rng.random() < prevalence) for k in LABELS}
        hh = int(size[0] + rng.integers(-32, 33))
        ww = int(size[1] + rng.integers(-32, 33))
        image, case = render_cxr(rng, (hh, ww), want)
        case.view_position = "PA" if rng.random() < 0.7 else "AP"
        case.photometric = "MONOCHROME1" if rng.random() < 0.4 else "MONOCHROME2"
        spec = cxr_dicom_spec(rng, i, case, seed)
        name = f"cxr_{seed}_{i:06d}.dcm"
        encoding = encodings[i % len(encodings)]
        write_image(out_dir / name, image, spec, rng, encoding=encoding)
        labels = case.chestxray14 or ["No Finding"]
        entries.append(
            [
                name,
                "|".join(labels),
                0,
                f"SYN{seed}-{i:06d}",
                int(rng.integers(20, 90)),
                "M" if rng.random() < 0.5 else "F",
                case.view_position,
                ww,
                hh,
                0.35,
                0.35,
            ]
        )
        for label, (bx, by, bw, bh) in case.boxes:
            boxes.append([name, label, round(bx * ww, 1), round(by * hh, 1), round(bw * ww, 1), round(bh * hh, 1)])
    csv_path = out_dir / "Data_Entry.csv"
    mode = "a" if start_index and csv_path.exists() else "w"
    with csv_path.open(mode, newline="") as fh:
        writer = csv.writer(fh)
        if mode == "w":
            writer.writerow(CHESTXRAY14_COLUMNS)
        writer.writerows(entries)
    with (out_dir / "BBox_List.csv").open(mode, newline="") as fh:
        writer = csv.writer(fh)
        if mode == "w":
            writer.writerow(["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]"])
        writer.writerows(boxes)
    return csv_path


#: The columns of NIH ChestX-ray14's ``Data_Entry.csv``, in its order (generator and export)
CHESTXRAY14_COLUMNS = (
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
)


def label_vector(finding_labels: str, keys: Sequence[str] = LABELS) -> NDArray[np.float32]:
    """ChestX-ray14 ``Finding Labels`` text -> a label vector in the order of ``keys`` (a model's
    manifest labels; the generator's ``LABELS`` by default)."""
    names = {s.strip() for s in finding_labels.split("|")}
    vec = np.zeros(len(keys), np.float32)
    for i, key in enumerate(keys):
        if key == "nodule_mass":
            vec[i] = float(bool(names & {"Nodule", "Mass"}))
        else:
            vec[i] = float(CHESTXRAY14_NAMES[key] in names)
    return vec
