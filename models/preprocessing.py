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
    """A named preprocessing function, the long side (pixels) it resizes to, and the value
    range of what it returns (an imported model's manifest declares both; ``dxassist models
    import`` checks them against the graph)."""

    name: str
    size: int
    fn: Callable[[PixelFrame], NDArray[np.float32]]
    value_range: tuple[float, float] = (0.0, 1.0)
    channels: int = 1

    @property
    def decode_size(self) -> int:
        """Long side to decode to (JPEG 2000 resolution levels): twice the model input, so the
        final area resize, not the codec's low-pass, does the anti-aliasing (as at full size)."""
        return 2 * self.size

    def __call__(self, frame: PixelFrame) -> NDArray[np.float32]:
        return self.fn(frame)


#: torchxrayvision's input scale: ``xrv.utils.normalize`` maps [0, maxval] to [-1024, 1024]
XRV_V1_RANGE: Final = (-1024.0, 1024.0)


def xrv_v1(frame: PixelFrame) -> NDArray[np.float32]:
    """Grayscale frame -> ``(1, 224, 224)`` in [-1024, 1024], the scale torchxrayvision's
    DenseNets were trained on (``xrv.utils.normalize``: ``(2 * x / maxval - 1) * 1024``).

    The geometry is ``cxr_v1``'s letterbox (torchxrayvision centre-crops; letterboxing keeps the
    whole lung fields and maps heatmaps back exactly); the display pipeline before it (Modality
    LUT, VOI window, MONOCHROME1 inverted) is the same as for every radiograph model.
    """
    unit = cxr_v1(frame)
    scaled: NDArray[np.float32] = (unit * np.float32(2.0) - np.float32(1.0)) * np.float32(1024.0)
    return scaled


PIPELINES: Final[dict[str, Pipeline]] = {
    "cxr_v1": Pipeline("cxr_v1", CXR_V1_SIZE, cxr_v1),
    "endo_v1": Pipeline("endo_v1", ENDO_V1_SIZE, endo_v1, channels=3),
    "xrv_v1": Pipeline("xrv_v1", CXR_V1_SIZE, xrv_v1, value_range=XRV_V1_RANGE),
}


def get_pipeline(name: str) -> Pipeline:
    try:
        return PIPELINES[name]
    except KeyError:
        raise ManifestError(f"unknown preprocessing {name!r}; known: {sorted(PIPELINES)}") from None
