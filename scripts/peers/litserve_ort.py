"""Peer: LitServe with dynamic batching (decode per request, one ORT call per batch)."""

from __future__ import annotations

import argparse

import litserve as ls
import numpy as np

from common import PeerModel


class CxrApi(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.model = PeerModel()

    def decode_request(self, request):  # type: ignore[no-untyped-def]
        upload = request["files"]
        return self.model.tensor(upload.file.read())

    def batch(self, inputs):  # type: ignore[no-untyped-def]
        return np.stack(inputs)

    def predict(self, x):  # type: ignore[no-untyped-def]
        return self.model.scores(x if x.ndim == 4 else x[np.newaxis])

    def unbatch(self, output):  # type: ignore[no-untyped-def]
        return list(output)

    def encode_response(self, output):  # type: ignore[no-untyped-def]
        return self.model.answer(np.asarray(output).reshape(-1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8102)
    args = parser.parse_args()
    server = ls.LitServer(CxrApi(max_batch_size=4, batch_timeout=0.005), accelerator="cpu", workers_per_device=1)
    server.run(port=args.port, host="127.0.0.1", generate_client_file=False)
