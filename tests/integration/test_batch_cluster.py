"""A batch job on a real multi-node Ray cluster on this machine, with nothing shared (ADR 0020).

A head and two worker nodes (``ray start``, one CPU each); each worker runs in its own mount
namespace with tmpfs over the input folder and over the model registry, so it sees neither. The
workers' registry is not empty but holds an impostor: a ``cxr-triage/1.2.0`` made of 1.1.0's
weights (its own digests consistent), as a node would after someone registered 1.2.0 on the head
only and copied something else by hand. Results go to PostgreSQL. A worker is killed mid-job and
the job is interrupted; the rerun finishes it. Every study must be screened exactly once, by the
version its result names (its scores are the real 1.2.0's, not the impostor's), none lost.

Needs root and ``unshare`` (the CI runs the suite as root); skipped with the reason otherwise.
A longer run: ``DXASSIST_CLUSTER_STUDIES=200 scripts/run_tests.sh tests/integration/test_batch_cluster.py``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from models.manifest import load_manifest
from models.predictor import OnnxPredictor
from models.registry import REGISTRY_ROOT, resolve
from models.synthetic.cxr import generate_cxr_dataset
from serving.batch.job import run_batch_job
from serving.core.screening import StudyScreener, screen_paths
from serving.persistence.ledger import Ledger
from serving.persistence.results import ResultsStore
from tests.integration.conftest import PostgresServer
from tests.integration.ray_cluster import LocalCluster, cluster_root

pytestmark = [pytest.mark.integration, pytest.mark.cluster, pytest.mark.own_process]

STUDIES = int(os.environ.get("DXASSIST_CLUSTER_STUDIES", "10"))
KEY = "cluster-test-key"


@pytest.fixture
def root() -> Iterator[Path]:
    yield from cluster_root("dxc-")


def _impostor(root: Path) -> Path:
    """``cxr-triage/1.2.0`` with other weights (the classifier's bias shifted), its manifest's
    digest made to match: a consistent version folder that is not the head's 1.2.0."""
    import hashlib

    import numpy as np
    import onnx
    from onnx import numpy_helper

    real = resolve("cxr-triage", "1.2.0")
    folder = root / "impostor"
    folder.mkdir()
    model = onnx.load(str(real.artifact_path))
    labels = len(real.manifest.labels)
    bias = next(i for i in reversed(model.graph.initializer) if int(np.prod(i.dims)) == labels)
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + np.float32(3.0), bias.name))
    artifact = folder / real.manifest.artifact.file
    onnx.save(model, str(artifact))
    digest = hashlib.sha256(artifact.read_bytes()).hexdigest()
    if real.manifest.ood is not None:
        shutil.copyfile(real.directory / real.manifest.ood.stats_file, folder / real.manifest.ood.stats_file)
    text = (real.directory / "manifest.yaml").read_text()
    (folder / "manifest.yaml").write_text(text.replace(real.manifest.artifact.sha256, digest))
    assert load_manifest(folder).manifest.artifact.sha256 == digest
    return folder


def _scores(screener: StudyScreener, files: list[Path]) -> dict[str, list[float]]:
    return {r.study_instance_uid: [f.score for f in r.findings] for r in screen_paths(screener, files)}


def test_batch_job_on_three_nodes_without_shared_files(root: Path, postgres: PostgresServer) -> None:
    import ray

    archive = root / "archive"
    generate_cxr_dataset(archive, STUDIES, seed=515, size=(384, 384), prevalence=0.4, encodings=("explicit", "rle"))
    files = sorted(archive.glob("cxr_*.dcm"))
    impostor = _impostor(root)
    real = resolve("cxr-triage", "latest")
    assert real.manifest.version == "1.2.0", "the head's latest version changed: update the test"
    # the test can tell the versions apart: the impostor scores differently
    truth = _scores(StudyScreener([OnnxPredictor(real, providers="cpu")], study_ref_key=KEY.encode()), files)
    fake = _scores(
        StudyScreener([OnnxPredictor(load_manifest(impostor), providers="cpu")], study_ref_key=KEY.encode()), files
    )
    assert len(truth) == STUDIES
    assert any(truth[uid] != pytest.approx(fake[uid], abs=1e-3) for uid in truth)

    settings = root / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "cpu"}],
                "results": {"url": postgres.new_database()},
                "security": {"study_ref_key": KEY},
                "batch": {"topology": "fused"},
                "screening": {"batch_size": 1, "decode_isolation": "inline"},
            }
        )
    )
    cluster = LocalCluster(root)
    registry = REGISTRY_ROOT
    plant = f"mkdir -p {registry}/cxr-triage && cp -r {impostor} {registry}/cxr-triage/1.2.0"
    try:
        cluster.start_head()
        head = cluster.connect()
        workers = [cluster.add_worker(name, hidden=[archive, registry], setup=plant) for name in ("w1", "w2")]
        assert head not in workers

        # the trap is real: a worker sees no inputs, and its registry's 1.2.0 is the impostor
        @ray.remote(num_cpus=0)
        def look() -> tuple[list[str], str]:
            from models.registry import resolve as local_resolve

            return sorted(os.listdir(archive)), local_resolve("cxr-triage").manifest.artifact.sha256

        seen, sha = ray.get(look.options(label_selector={"ray.io/node-id": workers[1]}).remote())
        assert seen == [] and sha != real.manifest.artifact.sha256

        killed: list[str] = []

        def kill_w1(done: int, total: int) -> None:
            if done == 3 and not killed:
                cluster.node("w1").kill()
                killed.append(workers[0])

        out = root / "job"
        first = run_batch_job([archive], out, settings_path=str(settings), stop_after=STUDIES - 3, on_progress=kill_w1)
        assert killed and first.screened_now == STUDIES - 3
        assert not first.errors
        assert len([n for n in first.nodes if n]) >= 2, first.nodes  # the workers screened too
        assert set(first.nodes) & set(workers), first.nodes
        second = run_batch_job([archive], out, settings_path=str(settings))
        assert second.skipped == STUDIES - 3 and second.screened_now == 3 and not second.errors
        third = run_batch_job([archive], out, settings_path=str(settings))
        assert third.screened_now == 0 and third.skipped == STUDIES
    finally:
        cluster.stop()

    ledger = Ledger(out / "ledger.sqlite3")
    keys = [k for k, _ in ledger.results()]
    ledger.close()
    assert sorted(keys) == sorted(truth)  # 0 lost, 0 duplicated in the job's ledger
    store = ResultsStore(yaml.safe_load(settings.read_text())["results"]["url"])
    try:
        assert store.count() == STUDIES
        for uid, scores in truth.items():
            records = store.screenings_for(uid)
            assert len(records) == 1, "screened exactly once"
            result = records[0].result
            assert result.models == ["cxr-triage@1.2.0"]
            assert {(f.model_version, f.manifest_sha256) for f in result.findings} == {("1.2.0", real.manifest_sha256)}
            # ... and really screened by it: the real 1.2.0's scores, not the impostor's
            assert [f.score for f in result.findings] == pytest.approx(scores, abs=1e-4)
    finally:
        store.close()
