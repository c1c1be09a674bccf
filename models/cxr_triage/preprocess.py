"""Preprocessing of the chest radiograph model, the only copy (training wraps it, serving calls it)."""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray

from models.errors import InvalidPixelData, ReasonCode
from models.pixels import PixelFrame, letterbox

CXR_V1_SIZE: Final = 224


def cxr_v1(frame: PixelFrame) -> NDArray[np.float32]:
    """Display-ready grayscale frame -> ``(1, 224, 224)`` float32 in [0, 1], letterboxed.

    Bright means dense (``PixelFrame`` has already inverted MONOCHROME1).

    Raises:
        InvalidPixelData: ``UNSUPPORTED_PHOTOMETRIC`` for a colour frame.
    """
    if frame.pixels.ndim != 2:
        raise InvalidPixelData(ReasonCode.UNSUPPORTED_PHOTOMETRIC, "cxr_v1 needs a grayscale frame")
    return letterbox(frame.pixels, CXR_V1_SIZE)[np.newaxis]
