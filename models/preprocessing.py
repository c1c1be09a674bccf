"""Registry of preprocessing pipelines by the name a manifest gives in ``input.preprocessing``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

from models.cxr_triage.preprocess import CXR_V1_SIZE, cxr_v1
from models.endoscopy_polyp.preprocess import ENDO_V1_SIZE, endo_v1
from models.errors import ManifestError
from models.pixels import PixelFrame


@dataclass(frozen=True, slots=True)
class Pipeline:
    """A named preprocessing function and the long side (pixels) it resizes to."""

    name: str
    size: int
    fn: Callable[[PixelFrame], NDArray[np.float32]]

    @property
    def decode_size(self) -> int:
        """Long side to decode to (JPEG 2000 resolution levels): twice the model input, so the
        final area resize, not the codec's low-pass, does the anti-aliasing (as at full size)."""
        return 2 * self.size

    def __call__(self, frame: PixelFrame) -> NDArray[np.float32]:
        return self.fn(frame)


PIPELINES: Final[dict[str, Pipeline]] = {
    "cxr_v1": Pipeline("cxr_v1", CXR_V1_SIZE, cxr_v1),
    "endo_v1": Pipeline("endo_v1", ENDO_V1_SIZE, endo_v1),
}


def get_pipeline(name: str) -> Pipeline:
    try:
        return PIPELINES[name]
    except KeyError:
        raise ManifestError(f"unknown preprocessing {name!r}; known: {sorted(PIPELINES)}") from None
