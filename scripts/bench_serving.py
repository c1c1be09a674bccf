"""Serving benchmark: every figure measured in this one run, on this machine.

    python scripts/bench_serving.py [--studies 48] [--concurrency 8]

Prints, for the chest model (DenseNet121, 224):
  1. raw ONNX Runtime throughput on pre-decoded tensors (batch 1 and 4): the ceiling
  2. PyTorch-eager MONAI inference (same weights): the baseline
  3. in-process decode + preprocess + inference per study (the "no service" latency)
  4. end to end through the HTTP API on Ray Serve: single-study latency p50/p99, and
     throughput + latency at concurrency
and the ratios the project tracks (service vs raw ORT, service latency vs in-process), plus the
CPU-work bound: the best any pipeline could do on these cores if nothing but decode +
preprocess and inference used CPU (on a CPU-only machine decode and inference share the cores,
so raw ORT on pre-decoded tensors is not reachable end to end).
Not a test: it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.pixels import load_frames  # noqa: E402
from models.predictor import OnnxPredictor  # noqa: E402
from models.preprocessing import get_pipeline  # noqa: E402
from models.registry import resolve  # noqa: E402
from models.synthetic.cxr import generate_cxr_dataset  # noqa: E402


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def prepare_seconds(files: list[Path]) -> float:
    """Mean single-thread seconds per study of the service's own stage 1 (read, QA, decode,
    preprocess), on this machine."""
    from models.decode_pool import InlineDecoder
    from serving.core.screening import InstanceInput, StudyScreener

    # in-process: process_time() must see the decode work (a DecodePool does it in its workers)
    screener = StudyScreener([], manifests=[resolve("cxr-triage")], study_ref_key=b"bench", decoder=InlineDecoder())
    screener.prepare(InstanceInput(files[0], "warm"))
    start = time.process_time()
    for path in files:
        screener.prepare(InstanceInput(path, "x"))
    return (time.process_time() - start) / len(files)


def cpu_bound(prepare_s: float, ceiling_img_s: float, cores: int) -> float:
    """Studies/s if every core-second went to decode+preprocess or inference, nothing else:
    raw ORT at ``ceiling_img_s`` uses all ``cores``, so one image costs cores/ceiling core-s."""
    return cores / (prepare_s + cores / ceiling_img_s)


def raw_ort(predictor: OnnxPredictor, batch: int, seconds: float = 6.0) -> float:
    x = np.random.default_rng(0).random((batch, 1, 224, 224), dtype=np.float32)
    predictor.predict(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        predictor.predict(x)
        n += batch
    return n / (time.perf_counter() - start)


def torch_eager(batch: int, seconds: float = 6.0) -> float | None:
    try:
        import torch

        from training.networks import CxrWithCam, cxr_network
    except ImportError:
        return None
    loaded = resolve("cxr-triage")
    net = cxr_network(len(loaded.manifest.labels))
    weights = loaded.directory / loaded.manifest.provenance.weights_file
    if weights.is_file():
        net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model = CxrWithCam(net).eval()
    x = torch.rand(batch, 1, 224, 224)
    with torch.no_grad():
        model(x)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            n += batch
    return n / (time.perf_counter() - start)


def in_process(predictor: OnnxPredictor, files: list[Path]) -> list[float]:
    pipeline = get_pipeline(predictor.manifest.input.preprocessing)
    times = []
    for path in files:
        start = time.perf_counter()
        frame = load_frames(path, target_size=pipeline.decode_size)[0]
        predictor.predict(pipeline(frame)[np.newaxis])
        times.append(time.perf_counter() - start)
    return times


def http_run(base: str, token: str, uids: list[str], concurrency: int) -> tuple[list[float], float]:
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    local = threading.local()  # one keep-alive connection per client thread, as an integration would
    clients: list[httpx.Client] = []

    def one(uid: str) -> float:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=base, headers=headers, timeout=120)
            clients.append(client)
        start = time.perf_counter()
        # one round trip: the POST holds the answer until the screening ends (long-poll if not)
        body = client.post(
            "/v1/screenings", params={"wait": 30}, json={"study_instance_uid": uid, "priority": "routine"}
        ).json()
        while body["status"] not in ("DONE", "FAILED"):
            body = client.get(f"/v1/screenings/{body['screening_id']}", params={"wait": 30}).json()
        if body["status"] != "DONE":
            raise RuntimeError(body)
        return time.perf_counter() - start

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, uids))
    rate = len(uids) / (time.perf_counter() - start)
    for client in clients:
        client.close()
    return latencies, rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    import pydicom
    import yaml

    from serving.rayserve.local_cluster import local_serve

    work = Path(tempfile.mkdtemp(prefix="dxassist-bench-"))
    store = work / "store"
    generate_cxr_dataset(store, args.studies, seed=777, size=(1024, 1024))
    files = sorted(store.glob("*.dcm"))
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files]
    settings = work / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "auto"}],
                "store": {"path": str(store)},
                "results": {"sqlite_path": str(work / "results.sqlite3")},
                "api": {"spool_dir": str(work / "spool"), "max_inflight": args.concurrency},
            }
        )
    )
    predictor = OnnxPredictor(resolve("cxr-triage"))
    print(f"model {predictor.manifest.ref} on {predictor.provider}; {args.studies} synthetic 1024x1024 CR studies")
    ort1, ort4 = raw_ort(predictor, 1), raw_ort(predictor, 4)
    eager1, eager4 = torch_eager(1), torch_eager(4)
    local = in_process(predictor, files[:24])
    prep_s = prepare_seconds(files[:24])
    cores = os.cpu_count() or 1
    bound = cpu_bound(prep_s, ort4, cores)
    print(f"raw ORT           batch 1: {ort1:6.1f} img/s   batch 4: {ort4:6.1f} img/s")
    if eager1 and eager4:
        print(
            f"PyTorch eager     batch 1: {eager1:6.1f} img/s   batch 4: {eager4:6.1f} img/s   (ORT/eager {ort4 / eager4:.2f}x)"
        )
    print(f"in-process decode+preprocess+infer per study: p50 {pct(local, 50) * 1000:.1f} ms")
    print(
        f"CPU-work bound on {cores} cores: {bound:5.1f} studies/s = {bound / ort4:.2f} x raw ORT"
        f"  (stage 1 {prep_s * 1000:.1f} core-ms/study + inference {cores / ort4 * 1000:.1f} core-ms/img)"
    )
    token = secrets.token_urlsafe(16)
    del predictor  # free the cores for the service
    with local_serve(str(settings), api_token=token) as base:
        http_run(base, token, uids[:4], 1)  # warm the path
        single, _ = http_run(base, token, uids[: min(24, len(uids))], 1)
        loaded, throughput = http_run(base, token, uids, args.concurrency)
    print(f"service, one at a time:   p50 {pct(single, 50) * 1000:.1f} ms  p99 {pct(single, 99) * 1000:.1f} ms")
    print(
        f"service, {args.concurrency} concurrent: {throughput:.1f} studies/s  p50 {pct(loaded, 50) * 1000:.1f} ms"
        f"  p99 {pct(loaded, 99) * 1000:.1f} ms"
    )
    print("ratios (goal):")
    print(f"  service throughput / raw ORT batch 4      = {throughput / ort4:.2f}  (>= 0.90)")
    print(f"  service throughput / CPU-work bound        = {throughput / bound:.2f}")
    print(
        f"  single-study latency / in-process          = {statistics.median(single) / statistics.median(local):.2f}  (<= 1.30)"
    )
    if eager4:
        print(f"  service throughput / PyTorch eager batch 4 = {throughput / eager4:.2f}")


if __name__ == "__main__":
    main()
