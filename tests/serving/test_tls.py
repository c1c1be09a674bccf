"""``api.tls_certfile``/``api.tls_keyfile``: ``dxassist serve`` (the one-process runtime) speaks
HTTPS itself, with a certificate made here for 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def self_signed(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dxassist test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    os.chmod(key_path, 0o600)
    return cert_path, key_path


def test_serve_speaks_https_with_tls_settings(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    settings = tmp_path / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "environment": "test",
                "models": [{"id": "cxr-triage", "providers": "cpu"}],
                "store": {"path": str(tmp_path / "store")},
                "results": {"sqlite_path": str(tmp_path / "results.sqlite3")},
                "api": {"spool_dir": str(tmp_path / "spool"), "tls_certfile": str(cert), "tls_keyfile": str(key)},
                "serve": {"runtime": "asgi"},
            }
        )
    )
    token = "tls-test-" + "z9y8x7w6v5" * 3
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "dxassist"), "serve", "--settings", str(settings), "--port", str(port)],
        env={**os.environ, "DXASSIST_API__TOKENS": token},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"https://127.0.0.1:{port}"
        trust = ssl.create_default_context(cafile=str(cert))
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "dxassist serve exited"
            try:
                ready = httpx.get(f"{base}/readyz", verify=trust, timeout=5)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not ready over HTTPS"
            time.sleep(0.3)
        answer = httpx.get(f"{base}/v1/worklist", verify=trust, headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
        try:
            plain = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
            assert plain.status_code == 400  # uvicorn answers plain HTTP on a TLS port with nothing useful
        except httpx.HTTPError:
            pass  # or drops it: either way nothing is served in clear text
    finally:
        proc.send_signal(signal.SIGTERM)
        status = proc.wait(60)
    assert status == 0  # drained and stopped
