"""Golden tests: the model input for fixed DICOMs does not change unless a new model version does.

Checked directly (serving path) and through the MONAI wrapper used by training, so the two can
never drift apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.golden.make_goldens import CASES, HERE, INPUTS, compute

# stored as float16: 1e-3 covers its rounding; any real change in preprocessing is far larger
ATOL = 1.5e-3


@pytest.mark.parametrize("name", sorted(CASES))
def test_preprocessing_matches_golden(name: str) -> None:
    expected = np.load(HERE / f"{name}.npy").astype(np.float32)
    got = compute(name)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=ATOL)


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_wrapper_gives_the_serving_input(name: str) -> None:
    from training.transforms import ApplyModelPreprocessd

    file, pipeline = CASES[name]
    out = ApplyModelPreprocessd("image", pipeline)({"image": str(INPUTS / file)})["image"]
    np.testing.assert_array_equal(out, compute(name))


def test_golden_inputs_cover_the_variants() -> None:
    from models.pixels import header_of, read_dataset

    headers = [header_of(read_dataset(INPUTS / f, header_only=True)) for f, _ in CASES.values()]
    assert {h.photometric_interpretation for h in headers} >= {"MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL_422"}
    assert {h.bits_stored for h in headers} >= {8, 12, 14, 16}
    assert any(h.transfer_syntax_uid == "1.2.840.10008.1.2.4.90" for h in headers)
    assert Path(INPUTS).is_dir()
