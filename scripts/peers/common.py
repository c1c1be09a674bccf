"""What every serving peer runs per request: the project's own decode, preprocessing and model.

The peers stand for what a hospital engineer would build instead of dxassist: the same ONNX
model (cxr-triage) with the same decode (``models.pixels.load_frames``, reduced J2K decode
included) and preprocessing (the manifest's registered pipeline), and nothing else: no input QA,
no durable job, no regions, no results database. Imported by each peer server with the
repository on ``sys.path`` (each peer runs in its own virtual environment).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(os.environ.get("DXASSIST_REPO", Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(REPO))

from models.pixels import load_frames  # noqa: E402
from models.predictor import OnnxPredictor  # noqa: E402
from models.preprocessing import get_pipeline  # noqa: E402
from models.registry import resolve  # noqa: E402


class PeerModel:
    """Decode + preprocess + infer, thread-safe (ONNX Runtime sessions are)."""

    def __init__(self, model_id: str = "cxr-triage", *, session: bool = True, threads: int | None = None) -> None:
        """``session=False``: decode and preprocess only (a process that does not infer);
        ``threads``: ORT intra-op threads (default: one per core)."""
        loaded = resolve(model_id)
        self.predictor = OnnxPredictor(loaded, providers="auto", intra_op_threads=threads) if session else None
        self.pipeline = get_pipeline(loaded.manifest.input.preprocessing)
        self.labels = [label.key for label in loaded.manifest.labels]

    def tensor(self, data: bytes) -> np.ndarray:
        frame = load_frames(data, frame_indices=[0], target_size=self.pipeline.decode_size)[0]
        return np.asarray(self.pipeline(frame), dtype=np.float32)

    def scores(self, tensors: np.ndarray) -> np.ndarray:
        if self.predictor is None:
            raise RuntimeError("this PeerModel has no session")
        return self.predictor.scores(self.predictor.predict(tensors))

    def answer(self, scores: np.ndarray) -> dict[str, float]:
        return {key: round(float(s), 6) for key, s in zip(self.labels, scores, strict=True)}

    def screen(self, data: bytes) -> dict[str, float]:
        return self.answer(self.scores(self.tensor(data)[np.newaxis])[0])
