"""Real servers for integration tests on 127.0.0.1: Orthanc (Debian package, DICOMweb plugin)
and PostgreSQL (Debian package; a private cluster per test session).

Orthanc has no bind-address option and listens on every interface: ``scripts/run_tests.sh``
runs the suite in a loopback-only network namespace. Each test gets a fresh Orthanc with its
own storage, started in under a second.
"""

from __future__ import annotations

import glob
import itertools
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OrthancServer:
    http_port: int
    dicom_port: int
    aet: str
    user: str
    password: str
    root: Path
    #: the port Orthanc's DicomModalities name for dxassist's C-STORE SCP (AE DXASSIST): its C-MOVE destination
    dxassist_port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, auth=(self.user, self.password), timeout=10)

    def upload(self, path: Path) -> None:
        with self.client() as c:
            c.post("/instances", content=path.read_bytes()).raise_for_status()

    def study_instances(self, study_uid: str) -> list[dict]:
        with self.client() as c:
            found = c.post(
                "/tools/find", json={"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
            )
            found.raise_for_status()
            return found.json()


def start_orthanc(
    root: Path,
    *,
    modalities: dict[str, list] | None = None,
    lua: Path | None = None,
    stable_age: int = 1,
    extra: dict[str, object] | None = None,
) -> tuple[OrthancServer, subprocess.Popen]:
    if not Path(ORTHANC).exists() or not Path(DICOMWEB_PLUGIN).exists():
        pytest.fail("Orthanc + orthanc-dicomweb are required (scripts/install_servers.sh installs them)")
    server = OrthancServer(free_port(), free_port(), "ORTHANC", "dxassist", "test-only-password", root)
    config = {
        "Name": "dxassist-test",
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        "HttpPort": server.http_port,
        "DicomPort": server.dicom_port,
        "DicomAet": server.aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {server.user: server.password},
        "Plugins": [DICOMWEB_PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "StudiesMetadata": "Full"},
        "StableAge": stable_age,
        "DicomModalities": modalities or {},
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowGet": True,
        "DicomCheckCalledAet": False,
        "LuaScripts": [str(lua)] if lua else [],
        "HttpTimeout": 10,
    } | (extra or {})
    root.mkdir(parents=True, exist_ok=True)
    (root / "orthanc.json").write_text(json.dumps(config))
    with (root / "orthanc.log").open("w") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen([ORTHANC, str(root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with server.client() as c:
                if c.get("/system").status_code == 200:
                    return server, proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"Orthanc did not start: {(root / 'orthanc.log').read_text()[-2000:]}")


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    """A fresh Orthanc that knows dxassist's SCP as modality ``dxassist`` (C-MOVE destination)."""
    port = free_port()
    server, proc = start_orthanc(tmp_path / "orthanc", modalities={"dxassist": ["DXASSIST", "127.0.0.1", port]})
    server.dxassist_port = port
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


# -- PostgreSQL ------------------------------------------------------------------------------


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    if not found:
        pytest.fail("PostgreSQL is required (scripts/install_servers.sh installs Debian's postgresql)")
    return Path(found[-1]).parent


def _as_postgres_user(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: the suite (root in CI) runs it as the ``postgres`` user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass
class PostgresServer:
    port: int
    _names: Iterator[int]

    def url(self, database: str) -> str:
        return f"postgresql://dxassist:test-only-password@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; returns its URL."""
        import psycopg

        name = f"dxassist_{next(self._names)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    bindir = _postgres_bin()
    root = Path(tempfile.mkdtemp(prefix="dxassist-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    data = root / "data"
    pwfile = root / "pw"
    pwfile.write_text("test-only-password\n")
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    subprocess.run(
        _as_postgres_user(
            [str(bindir / "initdb"), "-D", str(data), "-U", "dxassist", "--pwfile", str(pwfile), "-A", "scram-sha-256"]
        ),
        check=True,
        capture_output=True,
    )
    port = free_port()
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=on"
    subprocess.run(
        _as_postgres_user(
            [str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"]
        ),
        check=True,
        capture_output=True,
    )
    try:
        yield PostgresServer(port, itertools.count(1))
    finally:
        subprocess.run(
            _as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            check=False,
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def results_db(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """The results database, once per backend: a SQLite file, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "results.sqlite3"
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()
