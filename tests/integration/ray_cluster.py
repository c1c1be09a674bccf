"""A multi-node Ray cluster on this one machine, for tests: a head and worker nodes started with
``ray start`` (each its own raylet, object store and workers), every worker in its own mount
namespace with tmpfs mounted over the given paths, so it sees none of the head's files there (as
another machine would not). Needs root and ``unshare`` (``mount_namespace_unavailable`` says
why not). Every port is loopback and picked free; a node is stopped by killing its own process
session (never ``ray stop``, which would stop every Ray on the machine).
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_root(prefix: str) -> Iterator[Path]:
    """For a multi-node test's ``root`` fixture: a short temporary folder (Ray's socket paths must
    stay under the Unix limit), removed afterwards; the test is skipped, with the reason, where
    private mount namespaces are unavailable."""
    import pytest

    why = mount_namespace_unavailable()
    if why:
        pytest.skip(f"multi-node test needs private mount namespaces: {why}")
    path = Path(tempfile.mkdtemp(prefix=prefix))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mount_namespace_unavailable() -> str | None:
    """Why workers cannot get their own mount namespace here (None: they can)."""
    if os.geteuid() != 0:
        return "needs root to mount tmpfs in a private mount namespace (the CI runs the suite as root)"
    if shutil.which("unshare") is None:
        return "unshare (util-linux) is not installed"
    probe = tempfile.mkdtemp(prefix="dxns-")
    try:
        done = subprocess.run(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", f"mount -t tmpfs tmpfs {probe}"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        os.rmdir(probe)
    if done.returncode != 0:
        return f"unshare -m with a tmpfs mount failed here: {done.stderr.decode(errors='replace').strip()[:200]}"
    return None


def warm_up_imports() -> None:
    """Import what Ray's per-node agents import once, so that their start reads warm files."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import ray.dashboard.agent, ray._private.runtime_env.agent.main, ray.dashboard.modules.reporter.reporter_agent",
        ],
        capture_output=True,
        timeout=300,
        check=False,
    )


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    pids.append(int(entry))
            except (ProcessLookupError, PermissionError):
                continue
    return pids


@dataclass
class RayNode:
    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def started(self) -> None:
        """Its processes back to the normal priority once the node is up."""
        for pid in _session_pids(self.process.pid):
            try:
                os.setpriority(os.PRIO_PROCESS, pid, 0)
            except (ProcessLookupError, PermissionError):
                pass

    def kill(self) -> None:
        """Kill the node at once (raylet, object store, workers): a machine that died."""
        sid = self.process.pid  # start_new_session: the session id is the leader's pid
        for _ in range(5):
            pids = _session_pids(sid)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.process.wait(timeout=30)


@dataclass
class LocalCluster:
    """``ray start`` nodes on loopback; ``address`` is the head's GCS. Token authentication
    with a token of its own (``RAY_AUTH_TOKEN``, for every node and the driver); ``env`` adds
    environment variables for the nodes."""

    root: Path
    env: Mapping[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    nodes: list[RayNode] = field(default_factory=list)
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    _saved_env: dict[str, str | None] = field(default_factory=dict)

    def node_env(self) -> dict[str, str]:
        return {
            **self.env,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            # a loaded host starts Ray's agents slowly (see start_head)
            "RAY_agent_register_timeout_ms": "300000",
        }

    def connect(self) -> str:
        """``ray.init`` this process as the cluster's driver (on the head: Ray prefers the head
        among nodes of one address); returns the head's node id."""
        import ray
        from ray._private.authentication_test_utils import reset_auth_token_state

        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            self._saved_env.setdefault(key, os.environ.get(key))
        os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token})
        reset_auth_token_state()  # Ray caches the mode and token per process
        ray.init(address=self.address, log_to_driver=False, logging_level="WARNING")
        return str(ray.get_runtime_context().get_node_id())

    def disconnect(self) -> None:
        import ray
        from ray._private.authentication_test_utils import reset_auth_token_state

        if ray.is_initialized():
            ray.shutdown()
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()
        reset_auth_token_state()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _start(self, name: str, args: Sequence[str], hidden: Sequence[Path] = (), setup: str = "") -> RayNode:
        ports = [
            "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            "--object-store-memory=200000000",
            "--disable-usage-stats",
            "--block",
        ]
        command = [RAY, "start", *args, *ports]
        if os.geteuid() == 0:  # start ahead of a busy host's other work; back to normal once up
            command = ["nice", "-n", "-10", *command]
        if hidden:
            mounts = " && ".join(f"mount -t tmpfs tmpfs {shlex.quote(str(p))}" for p in hidden)
            script = f"{mounts} && {setup or 'true'} && exec {shlex.join(command)}"
            command = ["unshare", "-m", "--propagation", "private", "sh", "-c", script]
        log = self.root / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.node_env()},
                start_new_session=True,
            )
        node = RayNode(name, process, log)
        self.nodes.append(node)
        return node

    def start_head(self, num_cpus: int = 1, attempts: int = 4, timeout_s: float = 120.0) -> RayNode:
        """Start the head and wait until it is up. Ray 2.60's raylet aborts when its dashboard
        agent has not written its port within a fixed 15 s (not configurable), which a loaded
        host misses now and then (the agent's imports); such a start is retried on a fresh port."""
        warm_up_imports()
        for attempt in range(attempts):
            node = self._start(
                "head",
                [
                    "--head",
                    f"--port={self.port}",
                    f"--num-cpus={num_cpus}",
                    "--include-dashboard=false",
                    f"--ray-client-server-port={free_port()}",
                    f"--temp-dir={self.root / 'ray'}",
                ],
            )
            deadline = time.monotonic() + timeout_s
            while node.process.poll() is None and time.monotonic() < deadline:
                if "Ray runtime started" in node.log.read_text(errors="replace"):
                    node.started()
                    return node
                time.sleep(0.5)
            node.kill()
            self.nodes.remove(node)
            self.port = free_port()
            if attempt == attempts - 1:
                raise RuntimeError(f"the Ray head did not start: {node.log.read_text(errors='replace')[-2000:]}")
        raise AssertionError("unreachable")

    def add_worker(
        self,
        name: str,
        hidden: Sequence[Path],
        setup: str = "",
        num_cpus: int = 1,
        attempts: int = 4,
        timeout_s: float = 120.0,
    ) -> str:
        """Start a worker node (the driver is connected) and return its Ray node id once alive
        (retried as ``start_head`` is)."""
        import ray

        before = {n["NodeID"] for n in ray.nodes()}
        for attempt in range(attempts):
            node = self._start(name, [f"--address={self.address}", f"--num-cpus={num_cpus}"], hidden, setup)
            deadline = time.monotonic() + timeout_s
            while node.process.poll() is None and time.monotonic() < deadline:
                new = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] not in before]
                if new:
                    node.started()
                    return str(new[0])
                time.sleep(1.0)
            log = node.log.read_text(errors="replace")
            node.kill()
            self.nodes.remove(node)
            before = {n["NodeID"] for n in ray.nodes()}
            if attempt == attempts - 1:
                raise RuntimeError(f"Ray worker {name} did not start: {log[-2000:]}")
        raise AssertionError("unreachable")

    def node(self, name: str) -> RayNode:
        return next(n for n in self.nodes if n.name == name)

    def stop(self) -> None:
        self.disconnect()
        for node in reversed(self.nodes):
            if node.process.poll() is None or _session_pids(node.process.pid):
                node.kill()
