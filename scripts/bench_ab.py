"""Interleaved A/B of dxassist settings: several `dxassist serve` at once, requests alternating.

    python scripts/bench_ab.py NAME:VAR=VALUE[;VAR=VALUE] [NAME:...] [--rounds 6] [--studies 24]

``bench_peers.py --variant`` runs each setting after the other, so on a machine whose speed
drifts by 10-30 % within minutes (a shared VM) a few milliseconds of difference drown. Here
every variant (and ``base``, the defaults) is started and warmed first, then, round after round:
one single-client pass over the studies, requests alternating between the variants one by one
(only one request in flight on the machine), and one 8-client pass per variant in turn (its
server CPU per study from its process tree). Idle variants cost nothing. Prints p50/p99 of the
single-client latencies, the 8-client throughput and the CPU per study, pooled over the rounds.
Not a test: it asserts nothing, it reports.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench_peers import Client, System, dxassist_system, first_answer, pct, start_system, tree_cpu  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="+", metavar="NAME:VAR=VALUE[;VAR=VALUE]")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--studies", type=int, default=24)
    args = parser.parse_args()

    from models.synthetic.cxr import generate_cxr_dataset

    work = Path(tempfile.mkdtemp(prefix="dxassist-ab-"))
    generate_cxr_dataset(work / "studies", args.studies, seed=777, size=(1024, 1024))
    blobs = [f.read_bytes() for f in sorted((work / "studies").glob("*.dcm"))]
    systems: dict[str, System] = {"base": dxassist_system(work / "base", 8140)}
    for i, spec in enumerate(args.variants):
        name, _, assignments = spec.partition(":")
        variant = dxassist_system(work / name, 8141 + i)
        variant.env.update(dict(a.split("=", 1) for a in assignments.split(";") if a))
        systems[name] = variant
    procs = {name: start_system(s) for name, s in systems.items()}
    clients = {name: Client(s) for name, s in systems.items()}
    single: dict[str, list[float]] = {name: [] for name in systems}
    rate: dict[str, list[float]] = {name: [] for name in systems}
    cpu: dict[str, list[float]] = {name: [] for name in systems}
    try:
        for name, client in clients.items():
            first_answer(systems[name], procs[name], client, blobs[0])
            client.run(blobs[:8], 4)
        names = list(systems)
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for blob in blobs:
                for name in order:
                    single[name].append(clients[name].send(blob))
            for name in order:
                before = tree_cpu(procs[name].pid)
                done, per_s, _errors = clients[name].run([blobs[i % len(blobs)] for i in range(48)], 8)
                cpu[name].append((tree_cpu(procs[name].pid) - before) * 1000 / max(1, len(done)))
                rate[name].append(per_s)
            print(f"round {r + 1} done", flush=True)
    finally:
        for client in clients.values():
            client.close()
        for proc in procs.values():
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
    print(f"\n{len(blobs)} studies (1024 px CR), {args.rounds} rounds, {os.cpu_count()} cores")
    print(f"{'variant':12s} {'p50 1':>7s} {'p99 1':>7s} {'8: /s':>7s} {'core-ms':>8s}")
    for name in systems:
        print(
            f"{name:12s} {pct(single[name], 50) * 1000:7.1f} {pct(single[name], 99) * 1000:7.1f}"
            f" {float(np.mean(rate[name])):7.1f} {float(np.mean(cpu[name])):8.1f}"
        )


if __name__ == "__main__":
    main()
