"""The Ray Serve application on a cluster, without a cluster (issue #19): settings resolved once
and carried to the replicas, models pinned on the driver and refused by a node that differs,
handle calls retried when their replica dies, the ingress's view of its application."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from ray.exceptions import ActorDiedError, ActorUnavailableError

from models.errors import InferenceFailed, PinnedVersionMismatch, ReplicaUnavailable
from models.registry import register_version
from serving.rayserve.app import (
    AppArgs,
    AppStatus,
    ServePipeline,
    build_application,
    check_pins,
    deployment_checks,
    fetcher_capacity,
    follow_capacity,
    inflight_limit,
    pin_models,
)
from serving.rayserve.local_cluster import driver_settings, read_serve_config
from serving.settings import REPO_ROOT, ModelSettings, Settings
from tests.conftest import build_tiny_onnx, tiny_manifest_dict

SECRET_URL = "postgresql://dxassist:pw-NEVER-LOGGED-41@db.example:5432/dxassist"
SECRET_TOKEN = "tok-NEVER-LOGGED-" + "x" * 30


def _version(folder: Path, version: str, *, labels: int = 2) -> Path:
    """A staged tiny-test version (its own artifact bytes per label count)."""
    folder.mkdir(parents=True)
    onnx_path = build_tiny_onnx(folder / "tiny.onnx", labels=labels)
    manifest = tiny_manifest_dict(hashlib.sha256(onnx_path.read_bytes()).hexdigest(), labels=labels)
    manifest["version"] = version
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return folder


@pytest.fixture
def driver_registry(tmp_path: Path) -> Path:
    root = tmp_path / "driver-registry"
    register_version(_version(tmp_path / "staged-1", "0.1.0"), root)
    register_version(_version(tmp_path / "staged-2", "0.2.0", labels=3), root)
    return root


def _settings(**extra: Any) -> Settings:
    return Settings.from_mapping({"environment": "test", "models": [{"id": "tiny-test"}], **extra})


# -- settings travel -----------------------------------------------------------------------


def test_the_driver_resolves_settings_once_and_a_replica_environment_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: `dxassist serve` did not pass DXASSIST_RESULTS__URL on, so results went to
    SQLite on the ingress node; a relative settings path was resolved from each node's cwd."""
    settings_file = tmp_path / "site.yaml"
    settings_file.write_text(
        yaml.safe_dump({"environment": "test", "models": [{"id": "cxr-triage"}], "api": {"spool_dir": "var/spool-x"}})
    )
    monkeypatch.chdir(tmp_path)
    shipped = driver_settings("site.yaml", {"DXASSIST_RESULTS__URL": SECRET_URL, "DXASSIST_SERVE__TOPOLOGY": "staged"})
    assert shipped.results.url is not None and shipped.results.url.get_secret_value() == SECRET_URL
    assert shipped.serve.topology == "staged"
    assert shipped.api.spool_dir == Path("var/spool-x")  # relative: each node resolves it against its install
    # on a replica: another environment (other URL, other topology), another working directory
    monkeypatch.setenv("DXASSIST_RESULTS__URL", "postgresql://elsewhere/other")
    monkeypatch.setenv("DXASSIST_SERVE__TOPOLOGY", "inline")
    monkeypatch.chdir("/")
    on_replica = pickle.loads(pickle.dumps(shipped)).resolved()
    assert on_replica.results.url is not None and on_replica.results.url.get_secret_value() == SECRET_URL
    assert on_replica.serve.topology == "staged"
    assert on_replica.api.spool_dir == REPO_ROOT / "var/spool-x"
    # the key of study refs is the driver's, not each node's own install key
    assert on_replica.security.study_ref_key == shipped.security.study_ref_key


def test_settings_given_as_a_mapping_take_no_environment_and_paths_are_the_installs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DXASSIST_SERVE__TOPOLOGY", "inline")
    args = AppArgs(settings={"environment": "test", "models": [{"id": "cxr-triage"}], "serve": {"topology": "staged"}})
    assert args.load().serve.topology == "staged"
    monkeypatch.chdir(tmp_path)  # a config's relative settings_path is the install's, not the cwd's
    from_file = AppArgs(settings_path="configs/settings/dev.yaml").load()
    assert from_file.models and from_file.serve.topology == "inline"  # a file's settings: the builder's env applies
    with pytest.raises(ValueError, match="not both"):
        AppArgs(settings_path="x.yaml", settings={"models": []})


def test_secrets_travel_but_are_never_printed_or_logged(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = driver_settings(
        REPO_ROOT / "configs/settings/dev.yaml",
        {"DXASSIST_RESULTS__URL": SECRET_URL, "DXASSIST_API__TOKENS": f"ris:integration:{SECRET_TOKEN}"},
    )
    app = build_application(
        settings.model_copy(update={"serve": settings.serve.model_copy(update={"topology": "staged"})})
    )
    shown = repr(settings) + str(settings) + repr(app) + repr(settings.model_dump()) + caplog.text
    assert SECRET_URL not in shown and "pw-NEVER-LOGGED" not in shown and SECRET_TOKEN not in shown
    revived = pickle.loads(pickle.dumps(settings))  # what a replica gets: the secrets themselves
    assert revived.api.tokens[0].secret.get_secret_value() == SECRET_TOKEN


# -- versions pinned at deploy time ----------------------------------------------------------


def test_the_driver_pins_latest_and_a_node_without_that_version_refuses(tmp_path: Path, driver_registry: Path) -> None:
    """Finding: each node resolved `latest` in its own registry: results labelled with the new
    version were screened by the old one on a node that lacked it."""
    pinned = pin_models(_settings(), driver_registry).models[0]
    assert pinned.version == "0.2.0" and pinned.manifest_sha256 and pinned.artifact_sha256
    check_pins([pinned], driver_registry)  # the driver's own registry holds it

    behind = tmp_path / "node-b"  # a node that has only 0.1.0
    register_version(driver_registry / "tiny-test" / "0.1.0", behind)
    with pytest.raises(PinnedVersionMismatch, match=r"tiny-test@0\.2\.0 was pinned .* cannot provide it"):
        check_pins([pinned], behind)


def test_a_node_whose_copy_of_the_version_differs_refuses(tmp_path: Path, driver_registry: Path) -> None:
    pinned = pin_models(_settings(), driver_registry).models[0]
    # same version number, other bytes (a hand-copied, re-exported artifact and its manifest)
    other = tmp_path / "node-c"
    register_version(_version(tmp_path / "rebuilt", "0.2.0", labels=4), other)
    with pytest.raises(PinnedVersionMismatch, match="manifest"):
        check_pins([pinned], other)
    # the same manifest, the artifact changed on disk afterwards
    tampered = tmp_path / "node-d"
    shutil.copytree(driver_registry, tampered)
    (tampered / "tiny-test" / "0.2.0" / "tiny.onnx").write_bytes(b"not the model")
    with pytest.raises(PinnedVersionMismatch, match="does not verify"):
        check_pins([pinned], tampered)
    # an identical copy is accepted
    same = tmp_path / "node-e"
    shutil.copytree(driver_registry, same)
    check_pins([pinned], same)


def test_pins_already_in_the_settings_must_match_the_drivers_registry(driver_registry: Path) -> None:
    wrong = ModelSettings(id="tiny-test", version="0.2.0", manifest_sha256="0" * 64, artifact_sha256="1" * 64)
    with pytest.raises(PinnedVersionMismatch):
        pin_models(_settings().model_copy(update={"models": [wrong]}), driver_registry)
    check_pins([ModelSettings(id="tiny-test", version="9.9.9")], driver_registry)  # unpinned: not checked here


# -- handle calls retried when their replica dies ---------------------------------------------


class _Method:
    def __init__(self, outcomes: list[Any]) -> None:
        self.outcomes = outcomes
        self.calls = 0

    def remote(self, *args: Any) -> Any:
        self.calls += 1
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]

        async def answer() -> Any:
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome

        return answer()


class _Fetcher:
    def __init__(self, outcomes: list[Any]) -> None:
        self.prepare = _Method(outcomes)


def test_a_call_whose_replica_died_is_sent_again_and_an_application_error_is_not() -> None:
    """Finding: a study on a killed node ended FAILED for good (ActorUnavailableError)."""
    fetcher = _Fetcher([ActorDiedError(), ActorUnavailableError("node lost", None), "prepared"])
    model = _Method([InferenceFailed("non-finite scores")])
    pipeline = ServePipeline(fetcher, {"m": model}, retries=3, backoff_s=0.001)
    assert asyncio.run(pipeline.prepare_study(None)) == "prepared"  # type: ignore[arg-type]
    assert fetcher.prepare.calls == 3 and pipeline.retried == {"fetcher": 2}
    with pytest.raises(InferenceFailed):  # the replica answered: its own error is the answer
        asyncio.run(pipeline.infer("m", None))  # type: ignore[arg-type]
    assert model.calls == 1 and "model-m" not in pipeline.retried


def test_retries_are_bounded_and_end_in_a_typed_error() -> None:
    fetcher = _Fetcher([ActorDiedError()])
    pipeline = ServePipeline(fetcher, {}, retries=2, backoff_s=0.001)
    with pytest.raises(ReplicaUnavailable, match="fetcher: no replica answered in 3 attempts"):
        asyncio.run(pipeline.prepare_study(None))  # type: ignore[arg-type]
    assert fetcher.prepare.calls == 3


# -- what the ingress knows of its application ------------------------------------------------


def _deployment(status: str, states: list[str], max_ongoing: int | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {"name": "x"}
    if max_ongoing is not None:
        config["max_ongoing_requests"] = max_ongoing
    return {
        "status": status,
        "deployment_config": config,
        "target_num_replicas": len(states),
        "replicas": [{"state": s, "actor_name": f"SERVE_REPLICA::app#x#{i}"} for i, s in enumerate(states)],
    }


def _details(**deployments: dict[str, Any]) -> dict[str, Any]:
    return {"applications": {"dxassist": {"deployments": {k.replace("_", "-"): v for k, v in deployments.items()}}}}


def test_readiness_follows_what_serve_status_says_of_the_downstream_deployments() -> None:
    """Finding: `serve status` said UNHEALTHY while /readyz said ready."""
    names = ["fetcher", "model-cxr"]
    healthy = _details(
        fetcher=_deployment("HEALTHY", ["RUNNING"]), model_cxr=_deployment("UPSCALING", ["RUNNING", "STARTING"])
    )
    assert deployment_checks(healthy, "dxassist", names) == {"deployment:fetcher": "ok", "deployment:model-cxr": "ok"}
    unhealthy = _details(
        fetcher=_deployment("HEALTHY", ["RUNNING"]), model_cxr=_deployment("UNHEALTHY", ["RUNNING", "STARTING"])
    )
    assert (
        deployment_checks(unhealthy, "dxassist", names)["deployment:model-cxr"] == "UNHEALTHY: 1 of 2 replicas running"
    )
    gone = _details(fetcher=_deployment("UPDATING", ["STARTING"]))
    checks = deployment_checks(gone, "dxassist", names)
    assert checks == {"deployment:fetcher": "no running replica (UPDATING)", "deployment:model-cxr": "not deployed"}


def test_the_inflight_limit_follows_the_running_fetcher_replicas() -> None:
    """Finding: one ingress never had more than 3 studies in flight, whatever the replicas."""
    two = _details(fetcher=_deployment("HEALTHY", ["RUNNING", "RUNNING"], max_ongoing=4))
    four = _details(fetcher=_deployment("HEALTHY", ["RUNNING"] * 4 + ["STARTING"], max_ongoing=4))
    assert fetcher_capacity(two, "dxassist") == 8 and fetcher_capacity(four, "dxassist") == 16
    assert fetcher_capacity(_details(fetcher=_deployment("HEALTHY", ["RUNNING"])), "dxassist") == 8  # the default
    states = [two, four, _details(fetcher=_deployment("UNHEALTHY", ["STARTING"], max_ongoing=4))]
    limits: list[int] = []

    async def follow() -> None:
        status = AppStatus("dxassist", ["fetcher"], 0.001, read=lambda: states.pop(0) if len(states) > 1 else states[0])
        task = asyncio.create_task(follow_capacity(status, limits.append))
        while len(limits) < 2:
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.05)  # none running: the last limit stays
        task.cancel()

    asyncio.run(follow())
    assert limits[:2] == [inflight_limit(8), inflight_limit(16)] == [9, 17]
    assert set(limits[2:]) <= {17}


def test_the_application_state_unreachable_is_not_ready() -> None:
    def broken() -> dict[str, Any]:
        raise ConnectionError("controller gone")

    status = AppStatus("dxassist", ["fetcher"], 60.0, read=broken)
    assert asyncio.run(status.checks()) == {"serve": "application state unavailable (ConnectionError)"}


# -- the cluster Serve config ------------------------------------------------------------------


def test_the_cluster_config_fits_one_cpu_nodes_and_needs_postgresql(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: no cluster Serve config shipped; the dev config's ingress needs 1.5 CPU and never
    deploys on 1-CPU nodes."""
    config = read_serve_config(REPO_ROOT / "configs/serve/cluster.yaml")
    assert config.settings_path is not None
    for name, options in config.deployments.items():
        assert options.get("ray_actor_options", {}).get("num_cpus", 1) <= 1, name
    total = sum(o["num_replicas"] * o["ray_actor_options"]["num_cpus"] for o in config.deployments.values())
    assert total <= 3  # three 1-CPU nodes
    assert config.deployments["fetcher"]["num_replicas"] >= 2
    assert all(config.deployments[f"model-{m}"]["num_replicas"] >= 1 for m in ("cxr-triage", "endoscopy-polyp"))
    assert config.deployments["model-cxr-triage"]["num_replicas"] >= 2
    monkeypatch.setenv("DXASSIST_API__TOKENS", f"ops:admin:{SECRET_TOKEN}")
    monkeypatch.setenv("DXASSIST_SECURITY__STUDY_REF_KEY", "k" * 40)
    monkeypatch.setenv("DXASSIST_RESULTS__URL", SECRET_URL)
    settings = AppArgs(settings_path=config.settings_path).load()
    assert settings.serve.topology == "staged" and settings.store.kind == "dicomweb"
    assert settings.results.url is not None
    assert {m.id for m in settings.models} == {"cxr-triage", "endoscopy-polyp"}
    monkeypatch.delenv("DXASSIST_RESULTS__URL")
    assert AppArgs(settings_path=config.settings_path).load().results.url is None  # the CLI refuses this


def test_serve_address_refuses_a_cluster_without_postgresql_or_open_without_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finding: `dxassist serve` had no --address, and results went to SQLite on the ingress node."""
    from typer.testing import CliRunner

    from serving.cli.main import app

    for name in ("DXASSIST_RESULTS__URL", "DXASSIST_API__TOKENS"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "serve.yaml"
    config.write_text(
        (REPO_ROOT / "configs/serve/cluster.yaml")
        .read_text()
        .replace("configs/settings/cluster.yaml", "configs/settings/dev.yaml")
    )
    runner = CliRunner()
    sqlite = runner.invoke(app, ["serve", "--address", "127.0.0.1:1", "--serve-config", str(config)])
    assert sqlite.exit_code == 2 and "DXASSIST_RESULTS__URL" in sqlite.output
    monkeypatch.setenv("DXASSIST_RESULTS__URL", SECRET_URL)
    open_api = runner.invoke(app, ["serve", "--address", "127.0.0.1:1", "--serve-config", str(config)])
    assert open_api.exit_code == 2 and "no API tokens" in open_api.output
    assert "pw-NEVER-LOGGED" not in sqlite.output + open_api.output
    alone = runner.invoke(app, ["serve", "--serve-config", str(config)])
    assert alone.exit_code == 2 and "--address" in alone.output
