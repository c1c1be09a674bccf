"""Batch screening benchmark: one run, one machine, three figures and their ratios.

    python scripts/bench_batch.py [--studies 500] [--size 1024]

1. the batch job (Ray Data, reduced-resolution J2K decode, decode overlapped with inference) over
   a generated archive with mixed encodings (uncompressed, deflate, RLE, JPEG 2000 lossless/lossy)
2. the ceiling: raw ONNX Runtime throughput on pre-decoded tensors (same model, batch 4)
3. the baseline: a PyTorch-eager MONAI pipeline over the same files (LoadImage with pydicom,
   intensity scaling, MONAI Resize, DenseNet121 eager)
4. the CPU-work bound: studies/s if every core-second went to stage 1 (read, QA, decode,
   preprocess, measured single-threaded on these files) or to inference at the ceiling's cost
Goals: job >= 0.85x the ceiling and >= 2x the baseline. Not a test: it reports.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.predictor import OnnxPredictor  # noqa: E402
from models.registry import resolve  # noqa: E402
from models.synthetic.cxr import generate_cxr_dataset  # noqa: E402

ENCODINGS = ("explicit", "deflate", "rle", "j2k", "j2k-lossy")


def ceiling(batch: int = 4) -> float:
    from bench_serving import raw_ort  # same folder: one raw-ORT loop for both benchmarks

    # the best raw configuration: all cores, ORT threads spinning (nothing else runs)
    return raw_ort(OnnxPredictor(resolve("cxr-triage"), providers="cpu", allow_spinning=True), batch)


def monai_eager_baseline(files: list[Path], limit: int) -> float:
    """Studies/s of a straightforward MONAI + PyTorch-eager pipeline (no ONNX, no reduced decode)."""
    import torch
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Resize, ScaleIntensity

    from training.networks import CxrWithCam, cxr_network

    loaded = resolve("cxr-triage")
    net = cxr_network(len(loaded.manifest.labels))
    net.load_state_dict(torch.load(loaded.directory / "weights.pt", map_location="cpu", weights_only=True))
    model = CxrWithCam(net).eval()
    load = Compose(
        [
            LoadImage(reader="PydicomReader", image_only=True),
            EnsureChannelFirst(),
            ScaleIntensity(),
            Resize((224, 224), anti_aliasing=True),
        ]
    )
    torch.set_num_threads(2)
    start = time.perf_counter()
    with torch.no_grad():
        batch = []
        for path in files[:limit]:
            batch.append(torch.as_tensor(np.asarray(load(str(path))), dtype=torch.float32))
            if len(batch) == 4:
                model(torch.stack(batch))
                batch = []
        if batch:
            model(torch.stack(batch))
    return limit / (time.perf_counter() - start)


def build_archive(work: Path, studies: int, size: int) -> Path:
    """The benchmark archive: ``studies`` synthetic CR studies of ``size`` px, cycling through
    the five encodings (shared with ``bench_batch_peers.py``)."""
    archive = work / "archive"
    t = time.perf_counter()
    generate_cxr_dataset(archive, studies, seed=909, size=(size, size), encodings=ENCODINGS)
    print(
        f"archive: {studies} studies, {size}px, encodings {', '.join(ENCODINGS)} ({time.perf_counter() - t:.0f} s to generate)"
    )
    return archive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=500)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--baseline-studies", type=int, default=60)
    args = parser.parse_args()

    import yaml

    from serving.batch.job import run_batch_job

    work = Path(tempfile.mkdtemp(prefix="dxassist-batch-bench-"))
    archive = build_archive(work, args.studies, args.size)
    settings = work / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "auto"}],
                "results": {"sqlite_path": str(work / "results.sqlite3")},
            }
        )
    )
    from bench_serving import cpu_bound, prepare_seconds

    ceil = ceiling()
    files = sorted(archive.glob("*.dcm"))
    prep_s = prepare_seconds(files[:100])  # the archive cycles through the encodings
    cores = os.cpu_count() or 1
    bound = cpu_bound(prep_s, ceil, cores)
    base = monai_eager_baseline(files, args.baseline_studies)
    summary = run_batch_job([archive], work / "job", settings_path=str(settings), save_to_results_store=False)
    job = summary.studies_per_s
    print(
        f"batch job (Ray Data)           : {job:6.2f} studies/s  ({summary.screened_now} studies in {summary.seconds:.1f} s)"
    )
    print(f"ceiling: raw ORT, pre-decoded  : {ceil:6.2f} img/s (batch 4)")
    print(f"baseline: MONAI + torch eager  : {base:6.2f} studies/s (first {args.baseline_studies} files)")
    print(
        f"CPU-work bound on {cores} cores  : {bound:6.2f} studies/s = {bound / ceil:.2f} x ceiling"
        f"  (stage 1 {prep_s * 1000:.1f} core-ms/study + inference {cores / ceil * 1000:.1f} core-ms/img)"
    )
    print(f"ratio job / ceiling  = {job / ceil:.2f}  (goal >= 0.85)")
    print(f"ratio job / baseline = {job / base:.2f}  (goal >= 2)")
    print(f"ratio job / bound    = {job / bound:.2f}")


if __name__ == "__main__":
    main()
