"""What decode isolation costs: the service's stage 1 on the demo studies, in-process vs in
worker processes, measured in this one run on this machine.

    python scripts/bench_decode_isolation.py [--repeat 5]

For every demo file (built with the demo set when missing) it times ``StudyScreener.prepare``
(read, header, QA, decode, preprocess) with ``InlineDecoder`` and with ``DecodePool``:
  1. sequential latency per file (one caller, one worker; the two interleaved file by file so
     that load changes hit both alike): mean, p50, p99, and per file;
  2. throughput with two callers (two workers vs two threads in one process), median of three
     alternating trials;
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


def sequential(files: list[Path], repeat: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Per-file latency, in-process and in a worker, interleaved file by file (alternating which
    goes first) so that the machine's load changes hit both alike."""
    from serving.core.screening import InstanceInput

    with DecodePool(1) as pool:
        both = {"inline": screener(InlineDecoder()), "pool": screener(pool)}
        for s in both.values():  # warm: worker started, codecs loaded, page cache hot
            for path in files:
                s.prepare(InstanceInput(path, "warm"))  # type: ignore[attr-defined]
        times: dict[str, dict[str, list[float]]] = {"inline": defaultdict(list), "pool": defaultdict(list)}
        for round_ in range(repeat):
            for i, path in enumerate(files):
                order = ("inline", "pool") if (i + round_) % 2 == 0 else ("pool", "inline")
                for kind in order:
                    start = time.perf_counter()
                    both[kind].prepare(InstanceInput(path, "x"))  # type: ignore[attr-defined]
                    name = str(path.relative_to(REPO / "var" / "store" / "demo"))
                    times[kind][name].append(time.perf_counter() - start)
    return times["inline"], times["pool"]


def throughput(files: list[Path], decoder: object, repeat: int, callers: int) -> float:
    from serving.core.screening import InstanceInput

    s = screener(decoder)
    work = [InstanceInput(p, "x") for p in files] * repeat
    with cf.ThreadPoolExecutor(callers) as pool:
        list(pool.map(s.prepare, work[:callers]))  # type: ignore[attr-defined]
        start = time.perf_counter()
        list(pool.map(s.prepare, work))  # type: ignore[attr-defined]
        return len(work) / (time.perf_counter() - start)


def throughputs(files: list[Path], repeat: int, callers: int, trials: int = 3) -> tuple[float, float]:
    """Median files/s in-process and with ``callers`` workers, trials alternating."""
    inline, isolated = [], []
    with DecodePool(callers) as pool:
        for _ in range(trials):
            inline.append(throughput(files, InlineDecoder(), repeat, callers))
            isolated.append(throughput(files, pool, repeat, callers))
    return statistics.median(inline), statistics.median(isolated)


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

    inline, isolated = sequential(files, args.repeat)

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

    t_inline, t_pool = throughputs(files, args.repeat, 2)
    print(
        f"\n2. throughput, 2 callers: in-process threads {t_inline:.1f} files/s, "
        f"2 workers {t_pool:.1f} files/s ({t_pool / t_inline:.2f}x)"
    )
    print(f"3. starting one worker (interpreter, imports, address-space cap): {start_s * 1000:.0f} ms, once per worker")


if __name__ == "__main__":
    main()
