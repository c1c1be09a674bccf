"""What an ML engineer writes instead of a batch job on Ray: read_binary_files + map_batches.

    python scripts/peers/batch_raydata.py ARCHIVE OUT_DIR [--actors N] [--threads 1] [--batch 4]

A plain Ray Data pipeline: the archive's files as bytes, an actor pool of ONNX Runtime sessions
(same model, cxr-triage) decoding with the project's own decode and preprocessing
(``PeerModel``: the same model input as dxassist), one ORT call per batch, scores written as
Parquet. Nothing else: no input QA, no content gate, no ledger (no resume), no results
database, no report. Used by ``scripts/bench_batch_peers.py``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import ray
from common import PeerModel


class OrtActor:
    def __init__(self, threads: int) -> None:
        self.model = PeerModel(threads=threads)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        tensors = np.stack([self.model.tensor(bytes(b)) for b in batch["bytes"]])
        return {"path": batch["path"], "scores": self.model.scores(tensors)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("archive", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads per actor")
    parser.add_argument("--batch", type=int, default=4, help="files per ORT call")
    args = parser.parse_args()
    ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # reading files and writing Parquet are light: a quarter CPU each, the actors share the rest
    # (with a whole CPU per actor the reads wait for a CPU that never frees: a hang; with none,
    # Ray starts a worker process per pending read)
    io_cpus = 0.25
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    ds = ray.data.read_binary_files(
        str(args.archive), include_paths=True, file_extensions=["dcm"], num_cpus=io_cpus, concurrency=1
    )
    ds = ds.map_batches(
        OrtActor,
        fn_constructor_args=(args.threads,),
        batch_size=args.batch,
        compute=ray.data.ActorPoolStrategy(size=args.actors),
        num_cpus=min(1.0, (cpus - 2 * io_cpus) / args.actors),
    )
    ds.write_parquet(str(args.out), ray_remote_args={"num_cpus": io_cpus}, concurrency=1)
    ray.shutdown()


if __name__ == "__main__":
    main()
