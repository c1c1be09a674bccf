"""What an ML engineer writes instead of a batch job: a multiprocessing pool over files calling ORT.

    python scripts/peers/batch_pool.py ARCHIVE OUT.csv [--workers N] [--threads 1] [--batch 4]

Each worker opens the same ONNX model (cxr-triage) with ONNX Runtime and decodes with pydicom
and the project's own decode and preprocessing (``PeerModel``: the same model input as
dxassist); the parent writes one CSV row of scores per file. Nothing else: no input QA, no
content gate, no ledger (no resume), no results database, no report. Used by
``scripts/bench_batch_peers.py``.
"""

from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
from common import PeerModel

_model: PeerModel | None = None


def _init(threads: int) -> None:
    global _model
    _model = PeerModel(threads=threads)


def _screen(paths: list[str]) -> list[list[str]]:
    """One chunk of files: decode each, one ORT call for the chunk; a file that fails gets its error."""
    assert _model is not None
    rows: list[list[str]] = []
    tensors, ok = [], []
    for path in paths:
        try:
            tensors.append(_model.tensor(Path(path).read_bytes()))
            ok.append(path)
        except Exception as exc:  # a bad file costs its row, not the job
            rows.append([path, f"error: {type(exc).__name__}"])
    if tensors:
        scores = _model.scores(np.stack(tensors))
        rows += [[path, *(f"{s:.6f}" for s in row)] for path, row in zip(ok, scores, strict=True)]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("archive", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads per worker")
    parser.add_argument("--batch", type=int, default=4, help="files per ORT call")
    args = parser.parse_args()
    files = sorted(str(p) for p in args.archive.rglob("*.dcm"))
    chunks = [files[i : i + args.batch] for i in range(0, len(files), args.batch)]
    labels = PeerModel(session=False).labels
    with (
        mp.get_context("fork").Pool(args.workers, initializer=_init, initargs=(args.threads,)) as pool,
        args.out.open("w", newline="") as fh,
    ):
        writer = csv.writer(fh)
        writer.writerow(["file", *labels])
        for rows in pool.imap_unordered(_screen, chunks):
            writer.writerows(rows)


if __name__ == "__main__":
    main()
