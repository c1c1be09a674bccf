"""dxassist against the serving frameworks a hospital engineer would pick instead, in one run.

    python scripts/bench_peers.py [--studies 48] [--rounds 1] [--only fastapi,dxassist]

Every system serves the same ONNX model (cxr-triage) with the project's own decode and
preprocessing (scripts/peers/common.py) on this machine; dxassist does more per request (input QA
and the out-of-distribution gate, a durable job, regions, the results record). The same client
uploads the same studies (synthetic 1024 px CR plus the real NEMA chest RG1, 7 MB) to each:

  cold start       process start to the first answer
  single client    p50/p99 of one upload at a time
  8 and 32 clients throughput (studies/s) and p50/p99 latency
  CPU per study    core-ms of the server's whole process tree over the 8-client phase (the
                   steadiest figure on a shared machine)
  peak RSS         of the whole process tree over the run
  burst            200 uploads at 32 clients, then RSS after 10 s against the idle baseline

plus the in-process figure (decode + preprocess + infer, one study, no service) and the CPU-work
bound of this machine, measured in the same run. Systems run one at a time, alternating order
between rounds. Peers run in their own virtual environments under var/bench/venvs (created on
first use; LitServe, BentoML and PyTriton pin dependencies that clash with Ray). Not a test: it
asserts nothing, it reports. On a GPU node the same command runs; the model then runs on CUDA
in every system and the CPU-per-study figure measures everything but inference.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PEERS = REPO / "scripts" / "peers"
VENVS = REPO / "var" / "bench" / "venvs"
COMMON = [
    "numpy<3",
    "pydicom==3.0.2",
    "pylibjpeg==2.1.0",
    "pylibjpeg-libjpeg==2.5.0",
    "pylibjpeg-openjpeg==2.6.0",
    "pylibjpeg-rle==2.2.0",
    "pillow==13.0.0",
    "opencv-python-headless==5.0.0.93",
    "onnxruntime-gpu==1.31.1",
    "pydantic>=2.10,<3",
    "pyyaml",
]
PINS = {"litserve": ["litserve==0.2.19", "python-multipart"], "bentoml": ["bentoml>=1.4,<1.5"]}
#: PyTriton 0.7 needs numpy 1.x: its venv takes the codec and OpenCV releases that still support it
PYTRITON = [
    "numpy<2",
    "pydicom==3.0.2",
    "pylibjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-rle",
    "pillow",
    "opencv-python-headless<4.11",
    "onnxruntime-gpu==1.31.1",
    "pydantic>=2.10,<3",
    "pyyaml",
    "nvidia-pytriton==0.7.0",
]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def venv_python(name: str) -> str:
    """The peer's own interpreter, created on first use (the project venv for FastAPI)."""
    if name == "fastapi":
        return sys.executable
    python = VENVS / name / "bin" / "python"
    if not python.exists():
        # PyTriton's Triton Python stub is built against Debian's Python 3.11: its venv must use it
        base = "/usr/bin/python3" if name == "pytriton" else sys.executable
        subprocess.run([base, "-m", "venv", str(VENVS / name)], check=True)
        packages = PYTRITON if name == "pytriton" else [*COMMON, *PINS[name]]
        subprocess.run([str(python), "-m", "pip", "install", "-q", *packages], check=True)
    return str(python)


@dataclass
class System:
    name: str
    command: list[str]
    port: int
    kind: str  # "multipart" (/predict), "kserve" (PyTriton), "dxassist"
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = PEERS
    token: str = ""


@dataclass
class Figures:
    cold_start_s: float = float("nan")
    single: list[float] = field(default_factory=list)
    c8: list[float] = field(default_factory=list)
    c8_rate: float = 0.0
    c32: list[float] = field(default_factory=list)
    c32_rate: float = 0.0
    cpu_ms_per_study: float = float("nan")
    peak_rss_gb: float = 0.0
    idle_rss_gb: float = 0.0
    after_burst_rss_gb: float = 0.0
    errors: int = 0


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def tree_rss(pid: int) -> int:
    total = 0
    for p in tree(pid):
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in tree(pid):
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            pass
    return total


class Client:
    """One keep-alive connection per client thread, the same for every system."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.local = threading.local()
        self.clients: list[httpx.Client] = []

    def _client(self) -> httpx.Client:
        client = getattr(self.local, "client", None)
        if client is None:
            headers = {"Authorization": f"Bearer {self.system.token}"} if self.system.token else {}
            client = httpx.Client(base_url=f"http://127.0.0.1:{self.system.port}", headers=headers, timeout=120)
            self.local.client = client
            self.clients.append(client)
        return client

    def send(self, data: bytes) -> float:
        client, start = self._client(), time.perf_counter()
        if self.system.kind == "dxassist":
            r = client.post(
                "/v1/screenings/upload",
                params={"wait": 60},
                files=[("files", ("study.dcm", data, "application/dicom"))],
            )
            r.raise_for_status()
            if r.json()["status"] != "DONE":
                raise RuntimeError(r.json()["status"])
        elif self.system.kind == "kserve":
            header = json.dumps(
                {
                    "inputs": [
                        {
                            "name": "dicom",
                            "shape": [1, 1],
                            "datatype": "BYTES",
                            "parameters": {"binary_data_size": len(data) + 4},
                        }
                    ],
                    "outputs": [{"name": "scores", "parameters": {"binary_data": False}}],
                }
            ).encode()
            body = header + len(data).to_bytes(4, "little") + data
            r = client.post(
                "/v2/models/cxr/infer",
                content=body,
                headers={
                    "Inference-Header-Content-Length": str(len(header)),
                    "Content-Type": "application/octet-stream",
                },
            )
            r.raise_for_status()
        else:
            r = client.post("/predict", files=[("files", ("study.dcm", data, "application/dicom"))])
            r.raise_for_status()
        return time.perf_counter() - start

    def run(self, blobs: list[bytes], concurrency: int) -> tuple[list[float], float, int]:
        errors = 0

        def one(data: bytes) -> float | None:
            nonlocal errors
            try:
                return self.send(data)
            except (httpx.HTTPError, RuntimeError, KeyError):
                errors += 1
                return None

        start = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            got = list(pool.map(one, blobs))
        elapsed = time.perf_counter() - start
        done = [g for g in got if g is not None]
        return done, len(done) / elapsed, errors

    def close(self) -> None:
        for c in self.clients:
            c.close()


def dxassist_system(work: Path, port: int) -> System:
    """`dxassist serve` (its default runtime) with results, spool and store under ``work``, a
    fresh API token, the reference cxr-triage model."""
    import yaml

    token = secrets.token_urlsafe(32)
    work.mkdir(parents=True, exist_ok=True)
    settings = work / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "auto"}],
                "store": {"path": str(work / "store")},
                "results": {"sqlite_path": str(work / "results.sqlite3")},
                "api": {"spool_dir": str(work / "spool")},
            }
        )
    )
    command = [str(Path(sys.executable).parent / "dxassist"), "serve", "--settings", str(settings), "--port", str(port)]
    return System(
        "dxassist serve", command, port, "dxassist", env={"DXASSIST_API__TOKENS": token}, cwd=REPO, token=token
    )


def start_system(system: System) -> subprocess.Popen[bytes]:
    """Start a system's server in its own session (stopped with its whole process group)."""
    env = {**os.environ, "DXASSIST_REPO": str(REPO), "PYTHONPATH": str(PEERS), **system.env}
    return subprocess.Popen(
        system.command,
        cwd=system.cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def first_answer(system: System, proc: subprocess.Popen[bytes], client: Client, blob: bytes) -> None:
    """Send ``blob`` until the server answers (4 minutes at most, or until it exits)."""
    deadline = time.monotonic() + 240
    while True:
        try:
            client.send(blob)
            return
        except (httpx.HTTPError, RuntimeError, KeyError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{system.name} did not answer (exit {proc.poll()})") from None
            time.sleep(0.1)


def measure(system: System, blobs: list[bytes], burst: int) -> Figures:
    fig = Figures()
    started = time.perf_counter()
    proc = start_system(system)
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.05):
            peak[0] = max(peak[0], tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    client = Client(system)
    try:
        first_answer(system, proc, client, blobs[0])
        fig.cold_start_s = time.perf_counter() - started
        client.run(blobs[:8], 4)  # warm every path
        time.sleep(2)
        fig.idle_rss_gb = tree_rss(proc.pid) / 1e9
        fig.single, _, e1 = client.run(blobs[:24], 1)
        cpu0 = tree_cpu(proc.pid)
        n8 = max(len(blobs), 96)
        fig.c8, fig.c8_rate, e2 = client.run([blobs[i % len(blobs)] for i in range(n8)], 8)
        fig.cpu_ms_per_study = (tree_cpu(proc.pid) - cpu0) * 1000 / max(1, len(fig.c8))
        fig.c32, fig.c32_rate, e3 = client.run([blobs[i % len(blobs)] for i in range(n8)], 32)
        _, _, e4 = client.run([blobs[i % len(blobs)] for i in range(burst)], 32)
        time.sleep(10)
        fig.after_burst_rss_gb = tree_rss(proc.pid) / 1e9
        fig.errors = e1 + e2 + e3 + e4
    finally:
        stop.set()
        sampler.join()
        fig.peak_rss_gb = peak[0] / 1e9
        client.close()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return fig


def in_process_and_bound(files: list[Path]) -> tuple[float, float]:
    """p50 seconds of decode + preprocess + infer for one study in this process, and the CPU-work
    bound in studies/s (what the cores could do if only that work used them)."""
    from bench_serving import cpu_bound, in_process, prepare_seconds, raw_ort

    from models.predictor import OnnxPredictor
    from models.registry import resolve

    predictor = OnnxPredictor(resolve("cxr-triage"))
    local = in_process(predictor, files[:24])
    ceiling = raw_ort(predictor, 4, seconds=4.0)
    bound = cpu_bound(prepare_seconds(files[:24]), ceiling, os.cpu_count() or 1)
    return pct(local, 50), bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--only", default="fastapi,litserve,bentoml,pytriton,dxassist")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:VAR=VALUE[;VAR=VALUE]",
        help="also run dxassist with these settings variables (an A/B of one setting in the same run), "
        "e.g. inline:DXASSIST_SCREENING__DECODE_ISOLATION=inline",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO / "scripts"))

    import pydicom.data

    from models.synthetic.cxr import generate_cxr_dataset

    work = Path(tempfile.mkdtemp(prefix="dxassist-peers-"))
    generate_cxr_dataset(work / "studies", args.studies, seed=777, size=(1024, 1024))
    files = sorted((work / "studies").glob("*.dcm"))
    rg1 = Path(pydicom.data.get_testdata_file("RG1_UNCR.dcm", read=False))  # type: ignore[arg-type]
    shutil.copy(rg1, work / "studies" / "rg1.dcm")
    blobs = [f.read_bytes() for f in files] + [(work / "studies" / "rg1.dcm").read_bytes()]

    py = {name: venv_python(name) for name in args.only.split(",") if name != "dxassist"}
    systems = {
        "fastapi": System(
            "FastAPI + uvicorn + ORT", [py.get("fastapi", ""), "fastapi_ort.py", "--port", "8101"], 8101, "multipart"
        ),
        "litserve": System(
            "LitServe (dynamic batching)",
            [py.get("litserve", ""), "litserve_ort.py", "--port", "8102"],
            8102,
            "multipart",
        ),
        "bentoml": System(
            "BentoML (adaptive batching)",
            [
                str(Path(py.get("bentoml", "x")).parent / "bentoml"),
                "serve",
                "bentoml_ort:Cxr",
                "--port",
                "8103",
                "--host",
                "127.0.0.1",
            ],
            8103,
            "multipart",
        ),
        "pytriton": System(
            "PyTriton (Triton dynamic batcher)",
            [py.get("pytriton", ""), "pytriton_ort.py", "--port", "8104"],
            8104,
            "kserve",
        ),
        "dxassist": dxassist_system(work, 8110),
    }
    chosen = [systems[n] for n in args.only.split(",")]
    for i, spec in enumerate(args.variant):
        name, _, assignments = spec.partition(":")
        variant = dxassist_system(work / f"variant-{i}", 8120 + i)
        variant.name = f"dxassist {name}"
        variant.env.update(dict(a.split("=", 1) for a in assignments.split(";") if a))
        systems[variant.name] = variant
        chosen.append(variant)
    local_p50, bound = in_process_and_bound(files)
    results: dict[str, list[Figures]] = {s.name: [] for s in chosen}
    for r in range(args.rounds):
        order = chosen if r % 2 == 0 else list(reversed(chosen))
        for system in order:
            print(f"round {r + 1}: {system.name} ...", flush=True)
            results[system.name].append(measure(system, blobs, args.burst))

    def mean(name: str, attr: str) -> float:
        values = [getattr(f, attr) for f in results[name]]
        return float(np.mean(values))

    def mean_pct(name: str, attr: str, q: float) -> float:
        return float(np.mean([pct(getattr(f, attr), q) for f in results[name]]))

    print(
        f"\n{datetime.now(UTC):%Y-%m-%d}, {os.cpu_count()} cores, {len(blobs)} studies (1024 px CR + RG1), {args.rounds} round(s)"
    )
    print(
        f"in-process decode + preprocess + infer: p50 {local_p50 * 1000:.1f} ms; CPU-work bound {bound:.1f} studies/s"
    )
    head = f"{'system':36} {'p50 1':>7} {'p99 1':>7} {'8: /s':>7} {'p50 8':>7} {'p99 8':>7} {'32: /s':>7} {'p50 32':>7} {'p99 32':>7} {'core-ms':>8} {'peakGB':>7} {'idleGB':>7} {'burstGB':>8} {'cold s':>7} {'err':>4}"
    print(head)
    for s in chosen:
        n = s.name
        print(
            f"{n:36} {mean_pct(n, 'single', 50) * 1000:7.1f} {mean_pct(n, 'single', 99) * 1000:7.1f} {mean(n, 'c8_rate'):7.1f}"
            f" {mean_pct(n, 'c8', 50) * 1000:7.0f} {mean_pct(n, 'c8', 99) * 1000:7.0f} {mean(n, 'c32_rate'):7.1f}"
            f" {mean_pct(n, 'c32', 50) * 1000:7.0f} {mean_pct(n, 'c32', 99) * 1000:7.0f} {mean(n, 'cpu_ms_per_study'):8.1f}"
            f" {mean(n, 'peak_rss_gb'):7.2f} {mean(n, 'idle_rss_gb'):7.2f} {mean(n, 'after_burst_rss_gb'):8.2f}"
            f" {mean(n, 'cold_start_s'):7.1f} {int(mean(n, 'errors')):4d}"
        )
    ours = systems["dxassist"].name
    if ours in results and len(chosen) > 1:
        print("\nratios, each peer / dxassist (goal: throughput and CPU >= 1 means dxassist is at least as good):")
        for s in chosen:
            if s.name == ours:
                continue
            n = s.name
            print(
                f"  {n:34} throughput@8 {mean(ours, 'c8_rate') / mean(n, 'c8_rate'):5.2f}x (dxassist/peer)"
                f"  CPU/study {mean(n, 'cpu_ms_per_study') / mean(ours, 'cpu_ms_per_study'):5.2f}x (peer/dxassist)"
                f"  p50 {mean_pct(ours, 'single', 50) / mean_pct(n, 'single', 50):5.2f}x (dxassist/peer)"
                f"  peak RSS {mean(ours, 'peak_rss_gb') / mean(n, 'peak_rss_gb'):5.2f}x (dxassist/peer)"
            )
        idle, after = mean(ours, "idle_rss_gb"), mean(ours, "after_burst_rss_gb")
        print(
            f"  dxassist memory after a {args.burst}-upload burst: {after:.2f} GB vs idle {idle:.2f} GB ({(after / idle - 1) * 100:+.0f}%)"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
