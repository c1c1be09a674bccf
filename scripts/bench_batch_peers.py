"""dxassist's batch job against what an ML engineer would write instead, in one run.

    python scripts/bench_batch_peers.py [--studies 300] [--size 1024] [--rounds 2]

On the archive of ``bench_batch.py`` (synthetic CR studies cycling through five encodings:
uncompressed, deflate, RLE, JPEG 2000 lossless and lossy), each of these runs as its own
command, from process start to exit, one at a time, in alternating order between rounds:

  dxassist   ``dxassist screen ARCHIVE --out DIR`` as users run it: Ray Data, input QA and the
             content gate, the ledger (resume), the results database, CSV/Parquet and the HTML
             report
  pool       ``scripts/peers/batch_pool.py``: a multiprocessing pool (one worker per core) over
             files, each worker with its own ORT session (one intra-op thread)
  raydata    ``scripts/peers/batch_raydata.py``: Ray Data read_binary_files + map_batches with
             an ORT actor pool (one actor per core, one intra-op thread each)

All three run the same ONNX model (cxr-triage) on the same model input (the project's decode and
preprocessing, reduced-resolution JPEG 2000 decode included), batch 4. Printed per system:
studies/s (the whole command: start-up and outputs included), CPU per study (core-ms of the
command's whole process tree, sampled), peak RSS of the tree, and dxassist's ratio to the faster
peer. On a shared machine throughput moves with the neighbours' load; CPU per study is the
steadiest figure. Not a test: it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from bench_batch import build_archive  # noqa: E402


@dataclass
class Run:
    seconds: float
    cpu_s: float
    peak_rss: int
    rc: int
    by_kind: dict[str, float]  # CPU seconds by kind of process (``kind_of``)


def kind_of(p: psutil.Process) -> str:
    """What a process of the tree is: Ray's own (``gcs_server``, ``raylet``...), a Ray worker by
    its title (``ray::MapWorker(...)``), a decode worker, or the command itself."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    if not cmd:
        return p.name()
    first = cmd[0]
    if first.startswith("ray::"):
        return first.split(".")[0][:60]
    if "models.decode_pool" in cmd:
        return "decode worker"
    for part in cmd[:3]:
        if "/ray/" in part:
            return Path(part).name
    return Path(first).name if len(cmd) == 1 else " ".join(Path(c).name for c in cmd[:2])


def run_tree(command: list[str], env: dict[str, str] | None = None) -> Run:
    """Run ``command`` to its end; CPU and RSS of its whole process tree, sampled every 50 ms.

    CPU: the last reading of each process seen (the time a process spends after its last
    sample is lost: at most 50 ms each), plus what its reaped children reported."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    root = psutil.Process(proc.pid)
    cpu: dict[tuple[int, float], float] = {}
    kinds: dict[tuple[int, float], str] = {}
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while True:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            rss = 0
            for p in procs:
                try:
                    with p.oneshot():
                        t = p.cpu_times()
                        rss += p.memory_info().rss
                        key = (p.pid, p.create_time())
                        cpu[key] = t.user + t.system
                        kind = kind_of(p)  # a Ray worker takes its title when it gets work
                        if key not in kinds or (kind.startswith("ray::") and kind != "ray::IDLE"):
                            kinds[key] = kind
                except psutil.Error:
                    pass
            peak[0] = max(peak[0], rss)
            if stop.wait(0.05):
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - started
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        lines = [x for x in err.decode(errors="replace").splitlines() if "logging.cc" not in x]
        sys.stderr.write("\n".join(lines[-15:]) + "\n")
    by_kind: dict[str, float] = {}
    for key, seconds_used in cpu.items():
        by_kind[kinds.get(key, "?")] = by_kind.get(kinds.get(key, "?"), 0.0) + seconds_used
    return Run(seconds, sum(cpu.values()), peak[0], proc.returncode, by_kind)


def completed(name: str, rc: int, output: Path) -> bool:
    """Whether a run screened the whole archive. ``dxassist screen`` exits 1 when any study ended
    NOT_SCREENED (on a large synthetic archive the out-of-distribution gate refuses a few): its
    tables are written all the same."""
    if name == "dxassist":
        return rc in (0, 1) and (output / "results.csv").is_file()
    return rc == 0


def commands(archive: Path, work: Path, cores: int) -> dict[str, tuple[list[str], Path]]:
    """Each system's command and its output (removed before each run: dxassist would resume)."""
    python = sys.executable
    dxassist = str(Path(python).with_name("dxassist"))
    settings = work / "settings.yaml"
    settings.write_text(
        f"models:\n  - id: cxr-triage\nresults:\n  sqlite_path: {work / 'results.sqlite3'}\n", encoding="utf-8"
    )
    peers = REPO / "scripts" / "peers"
    return {
        "dxassist": (
            [dxassist, "screen", str(archive), "--out", str(work / "dx-out"), "--settings", str(settings)],
            work / "dx-out",
        ),
        "pool": (
            [python, str(peers / "batch_pool.py"), str(archive), str(work / "pool.csv"), "--workers", str(cores)],
            work / "pool.csv",
        ),
        "raydata": (
            [python, str(peers / "batch_raydata.py"), str(archive), str(work / "ray-out"), "--actors", str(cores)],
            work / "ray-out",
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--only", default="dxassist,pool,raydata")
    parser.add_argument("--archive", type=Path, help="an archive built before (bench_batch.build_archive)")
    parser.add_argument("--by-process", action="store_true", help="also print CPU by kind of process")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dxassist-batch-peers-"))
    archive = args.archive or build_archive(work, args.studies, args.size)
    n = len(list(archive.rglob("*.dcm")))
    cores = os.cpu_count() or 1
    systems = commands(archive, work, cores)
    names = [s for s in systems if s in args.only.split(",")]
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for r in range(args.rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            command, output = systems[name]

            def fresh(output: Path = output) -> None:  # no ledger, table or database from a run before
                if output.is_dir():
                    shutil.rmtree(output)
                output.unlink(missing_ok=True)
                (work / "results.sqlite3").unlink(missing_ok=True)

            fresh()
            run = run_tree(command)
            if not completed(name, run.rc, output):  # on a loaded machine Ray's start can time out: once more
                print(f"round {r + 1} {name}: exit {run.rc}, running it again", flush=True)
                fresh()
                run = run_tree(command)
            if completed(name, run.rc, output):  # a failed run (Ray's start timed out twice) stays out
                runs[name].append(run)
            print(
                f"round {r + 1} {name:9s}: {n / run.seconds:6.2f} studies/s  {run.cpu_s * 1000 / n:6.1f} core-ms/study"
                f"  peak RSS {run.peak_rss / 1e9:4.2f} GB  ({run.seconds:.1f} s, exit {run.rc})",
                flush=True,
            )
            if args.by_process:
                for kind, used in sorted(run.by_kind.items(), key=lambda kv: -kv[1])[:12]:
                    print(f"    {used:7.2f} core-s  {kind}")

    def mean(name: str, key: str) -> float:
        values = [getattr(x, key) for x in runs[name]]
        return sum(values) / len(values)

    names = [name for name in names if runs[name]]
    rate = {name: n / mean(name, "seconds") for name in names}
    cpu = {name: mean(name, "cpu_s") * 1000 / n for name in names}
    rss = {name: max(x.peak_rss for x in runs[name]) / 1e9 for name in names}
    print(f"\n{datetime.now(UTC):%Y-%m-%d}, {cores} cores, {n} studies of {args.size} px, mean of {args.rounds} rounds")
    print(f"{'system':10s} {'studies/s':>10s} {'core-ms/study':>14s} {'peak RSS GB':>12s}")
    for name in names:
        print(f"{name:10s} {rate[name]:10.2f} {cpu[name]:14.1f} {rss[name]:12.2f}")
    peers = [p for p in names if p != "dxassist"]
    if "dxassist" in names and peers:
        best = max(peers, key=lambda p: rate[p])
        print(
            f"dxassist / faster peer ({best}): throughput {rate['dxassist'] / rate[best]:.2f}x (goal >= 1.2), "
            f"CPU per study {cpu['dxassist'] / cpu[best]:.2f}x, peak RSS {rss['dxassist'] / rss[best]:.2f}x"
        )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
