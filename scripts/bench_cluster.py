"""Batch throughput on 1, 2 and 3 Ray nodes of one CPU each, on this one machine (ADR 0020).

    .venv/bin/python scripts/bench_cluster.py [--studies 120] [--size 384] [--nodes 1 2 3]

Each configuration is a fresh cluster: a head (``ray start --head --num-cpus 1``) and worker
nodes (``--num-cpus 1``); as root, each worker runs in its own mount namespace with tmpfs over the
input folder and the model registry (it sees neither: inputs and model bytes reach it through
Ray's object store). The same archive is screened (``fused`` topology, one actor per node) and
the figures are studies/s over the whole job (actor start and model load included, as an
operator sees them) with the ratio against one node measured in the same run.

Caveat: the nodes share one host (its cores, memory bandwidth and disk); on separate machines the
scaling is bounded by the driver node's reads and network instead. Run it on an otherwise idle
host with at least as many cores as nodes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from models.registry import REGISTRY_ROOT
from models.synthetic.cxr import generate_cxr_dataset
from tests.integration.ray_cluster import LocalCluster, mount_namespace_unavailable


def run(nodes: int, archive: Path, settings: Path, root: Path, hide: bool) -> tuple[float, dict[str, int]]:
    from serving.batch.job import run_batch_job

    folder = root / f"cluster-{nodes}"
    folder.mkdir()
    cluster = LocalCluster(folder)
    try:
        cluster.start_head()
        cluster.connect()
        for n in range(1, nodes):
            cluster.add_worker(f"w{n}", hidden=[archive, REGISTRY_ROOT] if hide else [])
        summary = run_batch_job([archive], folder / "job", settings_path=str(settings), save_to_results_store=False)
        if summary.errors or summary.screened_now != summary.planned:
            raise SystemExit(f"{nodes} nodes: {len(summary.errors)} errors, {summary.screened_now} screened")
        return summary.studies_per_s, summary.nodes
    finally:
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=120)
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    why = mount_namespace_unavailable()
    hide = why is None
    print(f"workers in their own mount namespaces: {'yes' if hide else f'no ({why})'}; host cores: {os.cpu_count()}")
    root = Path(tempfile.mkdtemp(prefix="dxb-"))
    try:
        archive = root / "archive"
        t = time.perf_counter()
        generate_cxr_dataset(archive, args.studies, seed=717, size=(args.size, args.size), encodings=("explicit",))
        print(f"archive: {args.studies} studies, {args.size}px ({time.perf_counter() - t:.0f} s to generate)")
        settings = root / "settings.yaml"
        settings.write_text(
            yaml.safe_dump(
                {
                    "environment": "test",
                    "models": [{"id": "cxr-triage", "providers": "cpu"}],
                    "security": {"study_ref_key": "bench-cluster-key"},
                    "batch": {"topology": "fused"},
                    "screening": {"decode_isolation": "inline"},
                }
            )
        )
        rates: dict[int, float] = {}
        for nodes in args.nodes:
            rate, spread = run(nodes, archive, settings, root, hide)
            rates[nodes] = rate
            base = rates.get(args.nodes[0], rate)
            per_node = "/".join(str(v) for v in sorted(spread.values(), reverse=True))
            print(
                f"{nodes} node(s): {rate:.2f} studies/s  x{rate / base:.2f} vs {args.nodes[0]} node(s)  "
                f"(studies per node {per_node})",
                flush=True,
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
