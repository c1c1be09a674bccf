"""Real servers for integration tests: Orthanc (Debian package, DICOMweb plugin) on 127.0.0.1.

Orthanc has no bind-address option and listens on every interface: ``scripts/run_tests.sh``
runs the suite in a loopback-only network namespace. Each test gets a fresh Orthanc with its
own storage, started in under a second.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
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
    root: Path, *, modalities: dict[str, list] | None = None, lua: Path | None = None, stable_age: int = 1
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
    }
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
    server, proc = start_orthanc(tmp_path / "orthanc")
    yield server
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
