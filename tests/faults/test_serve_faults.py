"""Faults against the real thing: ``dxassist serve`` started as its own process, in both
runtimes (``asgi``: one uvicorn process; ``ray``: Ray, Serve, the HTTP proxy and the inline
ingress), with SQLite, driven over HTTP by client threads.

- Ray exposure: every socket the started process tree listens on is a loopback one.
- Replica kill (ray): ``kill -9`` of the ingress replica while screenings run. Ray starts a new
  replica; without any request, its constructor resumes the unfinished jobs.
- SIGTERM under load (both): admission stops at once (503 + Retry-After), running work
  finishes, the process exits 0; the next start finishes what was queued.

Each ends with the ledger of ``tests.faults.tally``: 0 lost, 0 duplicated, 0 dropped.
CI runs these bounded (tens of studies, a few minutes on 2 cores); ``DXASSIST_FAULT_STUDIES``
sets a longer run (the README gives the figures of one).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from tests.conftest import write_synthetic_cxr
from tests.faults.tally import Tally, unfinished
from tests.integration.conftest import free_port

pytestmark = pytest.mark.integration

TOKEN = "fault-suite-" + "q8w7e6r5t4y3" * 3
STUDIES = int(os.environ.get("DXASSIST_FAULT_STUDIES", "24"))


@dataclass
class Site:
    root: Path
    logs: Path  # DXASSIST_FAULT_LOG_DIR keeps the service logs past pytest's temporary folders
    db: Path
    uids: list[str]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    import pydicom

    root = tmp_path_factory.mktemp("fault-site")
    uids = []
    for i in range(2 * STUDIES + 1):  # the last one: the kill test's waiting client
        path = write_synthetic_cxr(root / "store" / f"f{i}.dcm", seed=1000 + i)
        uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID))
    for runtime in ("asgi", "ray"):
        (root / f"settings-{runtime}.yaml").write_text(
            yaml.safe_dump(
                {
                    "environment": "test",
                    "models": [{"id": "cxr-triage", "providers": "cpu"}],
                    "store": {"path": str(root / "store")},
                    "results": {"sqlite_path": str(root / "results.sqlite3")},
                    "api": {"spool_dir": str(root / "spool"), "max_inflight": 2, "drain_timeout_s": 40},
                    "serve": {"runtime": runtime},
                }
            )
        )
    logs = Path(os.environ.get("DXASSIST_FAULT_LOG_DIR", str(root)))
    logs.mkdir(parents=True, exist_ok=True)
    return Site(root, logs, root / "results.sqlite3", uids)


@contextmanager
def dxassist_serve(site: Site, runtime: str, port: int, log_name: str) -> Iterator[subprocess.Popen[bytes]]:
    """``dxassist serve`` in its own session; yields once /readyz answers 200. Whatever is left
    of the process group at the end is killed (only what this fixture started)."""
    log = (site.logs / log_name).open("wb")
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dxassist"),
            "serve",
            "--settings",
            str(site.root / f"settings-{runtime}.yaml"),
            "--port",
            str(port),
        ],
        env={**os.environ, "DXASSIST_API__TOKENS": TOKEN},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"dxassist serve exited early ({proc.returncode}):\n" + log_tail(Path(log.name))
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "dxassist serve not ready"
            time.sleep(0.5)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers of this session only
        except ProcessLookupError:
            pass
        log.close()


def log_tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def submit_in_background(
    base: str, uids: list[str], tally: Tally, threads: int = 4
) -> tuple[list[threading.Thread], threading.Event]:
    """Client threads posting one screening per study until the list ends or ``stop`` is set;
    like any client should, they honour ``Retry-After`` after a 503 (a draining service says
    30 s, so a client told to back off sends nothing more before the process exits)."""
    stop = threading.Event()
    queue = list(uids)
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as http:
            while not stop.is_set():
                with lock:
                    if not queue:
                        return
                    uid = queue.pop(0)
                    tally.submitted += 1
                try:
                    answer = http.post("/v1/screenings", json={"study_instance_uid": uid})
                except httpx.ConnectError:
                    with lock:
                        tally.unreachable += 1
                    continue
                except httpx.TransportError as exc:
                    with lock:
                        tally.dropped += 1
                        tally.dropped_kinds.append(type(exc).__name__)
                    continue
                retry_after = 0.0
                with lock:
                    if answer.status_code == 202:
                        tally.accepted.append(answer.json()["screening_id"])
                    elif answer.status_code == 503 and "Retry-After" in answer.headers:
                        tally.refused += 1
                        retry_after = float(answer.headers["Retry-After"])
                    else:
                        tally.dropped += 1
                        tally.dropped_kinds.append(f"{answer.status_code} {answer.text[:60]!r}")
                # a well-behaved client: after a refusal it waits as told (draining says 30 s)
                stop.wait(retry_after or 0.02)

    workers = [threading.Thread(target=client, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    return workers, stop


@dataclass
class Waiter:
    """A client holding ``POST /v1/screenings?wait=60`` open: what it got, and when."""

    thread: threading.Thread
    status: int | None = None
    screening_id: str | None = None
    location: str | None = None
    body_outcome: str = "nothing"


def waiting_client(base: str, uid: str) -> Waiter:
    """Start a waiting POST; returns once its status line and headers have arrived."""
    headers_in = threading.Event()
    waiter = Waiter(threading.Thread(daemon=True))

    def run() -> None:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        try:
            with httpx.Client(base_url=base, headers=auth, timeout=90) as http:
                body = {"study_instance_uid": uid}
                with http.stream("POST", "/v1/screenings", params={"wait": 60}, json=body) as answer:
                    waiter.status = answer.status_code
                    waiter.screening_id = answer.headers.get("x-screening-id")
                    waiter.location = answer.headers.get("location")
                    headers_in.set()
                    try:
                        answer.read()
                        waiter.body_outcome = "the job as a complete body"
                    except httpx.HTTPError as exc:
                        waiter.body_outcome = f"a cut body ({type(exc).__name__})"
        finally:
            headers_in.set()

    waiter.thread = threading.Thread(target=run, daemon=True)
    waiter.thread.start()
    assert headers_in.wait(60), "the waiting client got no headers"
    return waiter


def listening_sockets(root_pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening TCP socket of ``root_pid``'s tree."""
    tree = [psutil.Process(root_pid), *psutil.Process(root_pid).children(recursive=True)]
    pids = {p.pid: p.name() for p in tree}
    return [
        (c.laddr.ip, c.laddr.port, pids[c.pid])
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]


def wait_until_settled(site: Site, ids: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while left := unfinished(site.db, ids):
        assert time.monotonic() < deadline, f"{len(left)} accepted screenings never ended"
        time.sleep(0.2)


def test_ray_listens_on_loopback_only_and_a_killed_replica_loses_nothing(site: Site) -> None:
    """Findings: Ray's services and exporters listened on all interfaces; after a replica was
    killed, resumed jobs waited for the next API call."""
    port = free_port()
    tally = Tally()
    with dxassist_serve(site, "ray", port, "serve-kill.log") as proc:
        sockets = listening_sockets(proc.pid)
        assert sockets, "no listening socket found in the process tree"
        exposed = [s for s in sockets if s[0] not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
        assert not exposed, f"listening beyond loopback: {exposed}"
        assert any(p == port for _, p, _ in sockets), "the HTTP proxy's port is not in the tree"

        workers, stop = submit_in_background(f"http://127.0.0.1:{port}", site.uids[:STUDIES], tally)
        deadline = time.monotonic() + 60
        while len(tally.accepted) < STUDIES // 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        stop.set()  # from the kill on, no request reaches the service
        for w in workers:
            w.join(60)
        waiter = waiting_client(f"http://127.0.0.1:{port}", site.uids[-1])
        pending_at_kill = len(unfinished(site.db, tally.accepted))
        replicas = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "ServeReplica:dxassist:ingress" in " ".join(p.cmdline()) or "ingress" in p.name()
        ]
        assert replicas, "ingress replica process not found among " + repr(
            [(c.name(), c.cmdline()[:2]) for c in psutil.Process(proc.pid).children(recursive=True)]
        )
        for replica in replicas:
            replica.send_signal(signal.SIGKILL)
        waiter.thread.join(120)
        # the client that was waiting on POST ?wait= holds a typed answer naming its screening
        assert waiter.status == 202 and waiter.screening_id, waiter
        assert waiter.location == f"/v1/screenings/{waiter.screening_id}"
        tally.submitted += 1
        tally.accepted.append(waiter.screening_id)
        # no request from here on: the new replica resumes the saved jobs by itself
        wait_until_settled(site, tally.accepted, 180)
    tally.settle(site.db)
    print(
        tally.line("replica kill")
        + f", unfinished at the kill {pending_at_kill}, the waiting client got {waiter.status} "
        + f"with its id and then {waiter.body_outcome}"
    )
    assert pending_at_kill > 0, "the kill found no work to lose: the test proves nothing"
    assert (tally.lost, tally.duplicated) == (0, 0)
    assert tally.done == len(tally.accepted) > 0


@pytest.mark.parametrize("runtime", ["asgi", "ray"])
def test_sigterm_under_load_drains_exits_zero_and_loses_nothing(site: Site, runtime: str) -> None:
    """Findings: SIGTERM killed `dxassist serve` in about 3 s, the graceful timeout was never
    used, and in the first second after SIGTERM it still accepted jobs whose clients then saw
    dropped connections."""
    port = free_port()
    tally = Tally()
    ours = site.uids[STUDIES : 2 * STUDIES]
    uids = ours[: STUDIES // 2] if runtime == "asgi" else ours[STUDIES // 2 :]
    with dxassist_serve(site, runtime, port, f"serve-sigterm-{runtime}.log") as proc:
        workers, stop = submit_in_background(f"http://127.0.0.1:{port}", uids, tally)
        deadline = time.monotonic() + 60
        while len(tally.accepted) < STUDIES // 4:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        returncode = proc.wait(120)
        stopped_after = time.monotonic() - sent
        stop.set()
        for w in workers:
            w.join(60)
    assert returncode == 0, f"exit status {returncode}:\n" + log_tail(site.logs / f"serve-sigterm-{runtime}.log")
    left_queued = unfinished(site.db, tally.accepted)
    # the next start finishes what the drain left queued, without being asked
    with dxassist_serve(site, runtime, free_port(), f"serve-restart-{runtime}.log"):
        wait_until_settled(site, tally.accepted, 180)
    tally.settle(site.db)
    print(
        tally.line(f"SIGTERM under load ({runtime})")
        + f", stopped after {stopped_after:.1f} s, resumed {len(left_queued)}"
    )
    assert (tally.lost, tally.duplicated, tally.dropped) == (0, 0, 0)
    assert tally.done == len(tally.accepted) > 0
