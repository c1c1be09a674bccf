"""Peer: BentoML with adaptive batching (decode in the API service, a batchable model service)."""

from __future__ import annotations

import sys
from pathlib import Path

import bentoml
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PeerModel  # noqa: E402


@bentoml.service(workers=1)
class Model:
    def __init__(self) -> None:
        self.model = PeerModel()

    @bentoml.api(batchable=True, max_batch_size=4, max_latency_ms=1000)
    def infer(self, tensors: np.ndarray) -> np.ndarray:
        return self.model.scores(tensors)


@bentoml.service(workers=1, threads=8)
class Cxr:
    model = bentoml.depends(Model)

    def __init__(self) -> None:
        self.peer = PeerModel(session=False)  # decode + preprocess here; inference in the batching service

    @bentoml.api
    async def predict(self, files: list[Path]) -> dict[str, float]:
        tensor = self.peer.tensor(files[0].read_bytes())
        scores = await self.model.to_async.infer(tensor[np.newaxis])
        return self.peer.answer(np.asarray(scores)[0])
