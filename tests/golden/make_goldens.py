"""Regenerate the preprocessing goldens. Run only when a preprocessing change is intended:

    python -m tests.golden.make_goldens

Inputs are small DICOMs committed under tests/golden/inputs/ (written once by this script if
missing); outputs are the expected model inputs as .npy. A changed golden needs a new model
version (ADR 0004): the model was trained on the old preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from models.pixels import load_frames
from models.preprocessing import PIPELINES

HERE = Path(__file__).resolve().parent
INPUTS = HERE / "inputs"

#: golden name -> (input file, pipeline)
CASES = {
    "cxr_m1_12bit": ("cxr_m1_12bit.dcm", "cxr_v1"),
    "cxr_m2_16bit_rescale": ("cxr_m2_16bit_rescale.dcm", "cxr_v1"),
    "cxr_m2_14bit_nowindow": ("cxr_m2_14bit_nowindow.dcm", "cxr_v1"),
    "cxr_j2k_m1": ("cxr_j2k_m1.dcm", "cxr_v1"),
    "endo_rgb": ("endo_rgb.dcm", "endo_v1"),
    "endo_jpeg_ybr": ("endo_jpeg_ybr.dcm", "endo_v1"),
}


def write_inputs() -> None:
    from models.synthetic.endoscopy import _endo_spec, render_frame, write_frame
    from tests.conftest import write_synthetic_cxr

    INPUTS.mkdir(exist_ok=True)
    size = (300, 280)
    write_synthetic_cxr(INPUTS / "cxr_m1_12bit.dcm", seed=101, photometric="MONOCHROME1", bits=12, size=size)
    write_synthetic_cxr(
        INPUTS / "cxr_m2_16bit_rescale.dcm", seed=102, bits=16, rescale=True, size=size, findings={"cardiomegaly": True}
    )
    write_synthetic_cxr(
        INPUTS / "cxr_m2_14bit_nowindow.dcm",
        seed=103,
        bits=14,
        window=False,
        size=size,
        findings={"pneumothorax": True},
    )
    write_synthetic_cxr(
        INPUTS / "cxr_j2k_m1.dcm",
        seed=104,
        photometric="MONOCHROME1",
        bits=16,
        encoding="j2k",
        size=(600, 560),
        findings={"nodule_mass": True},
    )
    rng = np.random.default_rng(105)
    rgb, _ = render_frame(rng, 200, True)
    write_frame(INPUTS / "endo_rgb.dcm", rgb, _endo_spec(1, 105))
    write_frame(INPUTS / "endo_jpeg_ybr.dcm", rgb, _endo_spec(2, 105), encoding="jpeg")


def compute(name: str) -> np.ndarray:
    file, pipeline_name = CASES[name]
    pipeline = PIPELINES[pipeline_name]
    frame = load_frames(INPUTS / file, target_size=pipeline.decode_size)[0]
    return pipeline(frame)


def main() -> None:
    if not INPUTS.exists():
        write_inputs()
    for name in CASES:
        np.save(HERE / f"{name}.npy", compute(name).astype(np.float16))
        print("wrote", name)


if __name__ == "__main__":
    main()
