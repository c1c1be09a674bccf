"""What decode isolation costs: the service's stage 1 on the demo studies, in-process vs in
worker processes, measured in this one run on this machine.

    python scripts/bench_decode_isolation.py [--repeat 5]

For every demo file (built with the demo set when missing) it times ``StudyScreener.prepare``
(read, header, QA, decode, preprocess) with ``InlineDecoder`` and with ``DecodePool``:
  1. sequential latency per file (one caller, one worker): mean, p50, p99, and per encoding;
  2. throughput with two callers (two workers vs two threads in one process);
  3. the one-off cost of starting a worker.
Prints the ratios (pool / inline). Not a test: it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from models.decode_pool import DecodePool, InlineDecoder  # noqa: E402
from models.registry import resolve  # noqa: E402


def demo_files() -> list[Path]:
    root = REPO / "var" / "store" / "demo"
    if not (root / "expected.csv").exists():
        from serving.cli.demo import build_demo_set

        build_demo_set(root)
    return sorted(p for p in root.rglob("*.dcm") if p.is_file())


def screener(decoder: object) -> object:
    from serving.core.screening import StudyScreener

    manifests = [resolve("cxr-triage"), resolve("endoscopy-polyp")]
    return StudyScreener([], manifests=manifests, study_ref_key=b"bench", decoder=decoder)  # type: ignore[arg-type]


def sequential(files: list[Path], decoder: object, repeat: int) -> dict[str, list[float]]:
    from serving.core.screening import InstanceInput

    s = screener(decoder)
    for path in files:  # warm: worker started, codecs loaded, page cache hot
        s.prepare(InstanceInput(path, "warm"))  # type: ignore[attr-defined]
    times: dict[str, list[float]] = defaultdict(list)
    for _ in range(repeat):
        for path in files:
            start = time.perf_counter()
            s.prepare(InstanceInput(path, "x"))  # type: ignore[attr-defined]
            times[str(path.relative_to(REPO / "var" / "store" / "demo"))].append(time.perf_counter() - start)
    return times


def throughput(files: list[Path], decoder: object, repeat: int, callers: int) -> float:
    from serving.core.screening import InstanceInput

    s = screener(decoder)
    work = [InstanceInput(p, "x") for p in files] * repeat
    with cf.ThreadPoolExecutor(callers) as pool:
        list(pool.map(s.prepare, work[:callers]))  # type: ignore[attr-defined]
        start = time.perf_counter()
        list(pool.map(s.prepare, work))  # type: ignore[attr-defined]
        return len(work) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    files = demo_files()
    print(f"{len(files)} demo files, {args.repeat} rounds each\n")

    started = time.perf_counter()
    with DecodePool(1) as cold:
        cold.warm()
    start_s = time.perf_counter() - started

    inline = sequential(files, InlineDecoder(), args.repeat)
    with DecodePool(1) as pool:
        isolated = sequential(files, pool, args.repeat)

    def flat(d: dict[str, list[float]]) -> list[float]:
        return [t for ts in d.values() for t in ts]

    a, b = np.asarray(flat(inline)) * 1000, np.asarray(flat(isolated)) * 1000
    print("1. sequential latency per file (ms)      mean    p50    p99")
    print(f"   in-process (InlineDecoder)          {a.mean():6.1f} {np.median(a):6.1f} {np.percentile(a, 99):6.1f}")
    print(f"   worker process (DecodePool)         {b.mean():6.1f} {np.median(b):6.1f} {np.percentile(b, 99):6.1f}")
    print(
        f"   overhead per file: {b.mean() - a.mean():+.1f} ms mean ({b.mean() / a.mean():.2f}x), "
        f"{np.median(b) - np.median(a):+.1f} ms p50\n"
    )
    print("   per file (median ms): inline -> pool")
    for name in sorted(inline):
        x, y = statistics.median(inline[name]) * 1000, statistics.median(isolated[name]) * 1000
        print(f"   {name:48s} {x:7.1f} -> {y:7.1f}  ({y - x:+.1f})")

    t_inline = throughput(files, InlineDecoder(), args.repeat, 2)
    with DecodePool(2) as pool2:
        t_pool = throughput(files, pool2, args.repeat, 2)
    print(
        f"\n2. throughput, 2 callers: in-process threads {t_inline:.1f} files/s, "
        f"2 workers {t_pool:.1f} files/s ({t_pool / t_inline:.2f}x)"
    )
    print(f"3. starting one worker (interpreter, imports, address-space cap): {start_s * 1000:.0f} ms, once per worker")


if __name__ == "__main__":
    main()
