"""Where the server's CPU goes under load: py-spy over `dxassist serve`'s whole process tree.

    python scripts/profile_serving.py [--studies 48] [--clients 8] [--repeat 3] [--out var/profile]

Starts `dxassist serve` with the settings `scripts/bench_peers.py` uses, uploads the same studies
(synthetic 1024 px CR plus the real NEMA RG1) once to warm up, then records with py-spy (sampling,
idle frames excluded, native frames off) while `--clients` clients upload them `--repeat` times.
Prints the share of samples by the file and function where each sample's own time was spent, and
by the outermost frame of this project (models/ or serving/) on each stack: what the request
path spends its CPU on. The collapsed stacks are written under --out for a flame graph. Not a
test, not a benchmark of throughput: a profiler slows the server down.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom.data

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_peers import Client, dxassist_system  # noqa: E402

from models.synthetic.cxr import generate_cxr_dataset  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=48)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=REPO / "var" / "profile")
    parser.add_argument(
        "--gil",
        action="store_true",
        help="sample only the thread holding the GIL: Python's own CPU (native work that releases it, "
        "such as ONNX Runtime's inference, is left out)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dxassist-profile-"))
    generate_cxr_dataset(work / "studies", args.studies, seed=777, size=(1024, 1024))
    rg1 = Path(str(pydicom.data.get_testdata_file("RG1_UNCR.dcm", read=False)))
    blobs = [f.read_bytes() for f in sorted((work / "studies").glob("*.dcm"))] + [rg1.read_bytes()]
    system = dxassist_system(work, 8119)
    server = subprocess.Popen(
        system.command,
        cwd=REPO,
        env={**os.environ, **system.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    collapsed = args.out / "dxassist.collapsed.txt"
    try:
        client = Client(system)
        deadline = time.monotonic() + 120
        while True:
            try:
                client.send(blobs[0])
                break
            except Exception:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        client.run(blobs, args.clients)  # warm: sessions, decode workers, caches
        spy = subprocess.Popen(
            [
                *(str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(server.pid)),
                *("--subprocesses", "--rate", str(args.rate), "--format", "raw", "--output", str(collapsed)),
                *(["--gil"] if args.gil else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(2.0)
        done, rate, errors = client.run(blobs * args.repeat, args.clients)
        spy.send_signal(2)
        spy.wait(60)
        client.close()
        print(
            f"{len(done)} uploads at {args.clients} clients under the profiler: {rate:.1f} studies/s, {errors} errors"
        )
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        shutil.rmtree(work, ignore_errors=True)
    report(collapsed)


def report(collapsed: Path, top: int = 40) -> None:
    own: collections.Counter[str] = collections.Counter()
    ours: collections.Counter[str] = collections.Counter()
    process: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        head = frames[0] if frames else "?"
        process["decode worker" if "models.decode_pool" in head else head.partition(":")[0]] += count
        own[frames[-1]] += count
        project = [f for f in frames[1:] if "(models/" in f or "(serving/" in f]
        ours[project[-1] if project else "(outside models/ and serving/)"] += count
    if not total:
        print("no samples")
        return
    print(f"\n{total} samples; by process:")
    for name, n in process.most_common(8):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\nself time by function (file:line of the sampled frame):")
    for name, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}")
    print("\nby the innermost project frame on the stack (the project code that asked for the work):")
    for name, n in ours.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
