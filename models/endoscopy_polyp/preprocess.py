"""Preprocessing of the endoscopy polyp model, the only copy (training wraps it, serving calls it)."""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray

from models.errors import InvalidPixelData, ReasonCode
from models.pixels import PixelFrame, resize_area

ENDO_V1_SIZE: Final = 256


def endo_v1(frame: PixelFrame) -> NDArray[np.float32]:
    """Display-ready RGB frame -> ``(3, 256, 256)`` float32 in [0, 1] (plain resize, no letterbox:
    endoscope frames are masks inside a fixed field of view and the mask must map back 1:1).

    Raises:
        InvalidPixelData: ``UNSUPPORTED_PHOTOMETRIC`` for a grayscale frame.
    """
    if frame.pixels.ndim != 3 or frame.pixels.shape[2] != 3:
        raise InvalidPixelData(ReasonCode.UNSUPPORTED_PHOTOMETRIC, "endo_v1 needs an RGB frame")
    resized = resize_area(frame.pixels, ENDO_V1_SIZE, ENDO_V1_SIZE)
    return np.ascontiguousarray(resized.transpose(2, 0, 1))
