"""Peer: NVIDIA PyTriton (Triton's dynamic batcher in front of a Python callable)."""

from __future__ import annotations

import argparse

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

from common import PeerModel

model = PeerModel()


@batch
def infer(dicom: np.ndarray) -> dict[str, np.ndarray]:
    tensors = np.stack([model.tensor(bytes(item[0])) for item in dicom])
    return {"scores": model.scores(tensors).astype(np.float32)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8104)
    args = parser.parse_args()
    config = TritonConfig(http_address="127.0.0.1", http_port=args.port, grpc_port=args.port + 20, metrics_port=args.port + 30)
    with Triton(config=config) as triton:
        triton.bind(
            model_name="cxr",
            infer_func=infer,
            inputs=[Tensor(name="dicom", dtype=np.bytes_, shape=(1,))],
            outputs=[Tensor(name="scores", dtype=np.float32, shape=(-1,))],
            config=ModelConfig(max_batch_size=4, batcher=DynamicBatcher(max_queue_delay_microseconds=2000)),
            strict=False,
        )
        triton.serve()
