"""Peer: BentoML with adaptive batching (decode in the API, a batchable model method)."""

from __future__ import annotations

import sys
from pathlib import Path

import bentoml
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeerModel  # noqa: E402


@bentoml.service(workers=1, threads=8)
class Cxr:
    def __init__(self) -> None:
        self.model = PeerModel()

    @bentoml.api(batchable=True, max_batch_size=4, max_latency_ms=1000)
    def infer(self, tensors: np.ndarray) -> np.ndarray:
        return self.model.scores(tensors)

    @bentoml.api
    async def predict(self, files: list[Path]) -> dict[str, float]:
        tensor = self.model.tensor(files[0].read_bytes())
        scores = await self.infer.to_async(tensor[np.newaxis])
        return self.model.answer(np.asarray(scores)[0])
