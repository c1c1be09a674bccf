"""The HTTP edge and the service's security findings of issue 12, each against the real app
(FastAPI + ScreeningService + SQLite + a real model session), in process."""

from __future__ import annotations

import json
import os
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import SecretStr

from models.predictor import OnnxPredictor
from serving.settings import REPO_ROOT, ApiSettings, Settings, install_study_ref_key
from tests.serving.test_api import running, uid_of, wait_for

ADMIN = "admin-" + "a1b2c3d4e5" * 4
READER = "reader-" + "f6g7h8i9j0" * 4
RIS = "ris-" + "k1l2m3n4o5" * 4
TOKENS = [f"ops:admin:{ADMIN}", f"viewer:reader:{READER}", f"ris:integration:{RIS}"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def raw_request(
    app: Callable[..., Awaitable[None]], method: str, path: str, headers: dict[str, str], body_chunks: list[bytes]
) -> tuple[int, dict[str, str], bytes, int]:
    """Drive the ASGI app by hand: returns status, headers, body and how many body chunks the
    app pulled (0 means it answered without reading the request body)."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        if pulled < len(body_chunks):
            pulled += 1
            return {"type": "http.request", "body": body_chunks[pulled - 1], "more_body": pulled < len(body_chunks)}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, body, pulled


def test_no_token_or_too_large_is_answered_before_the_body_is_read(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Finding: a 2 GB upload without a token was read (and spooled to /tmp) before the 401."""
    with running(tmp_path, predictor, store_dir, tokens=TOKENS, max_upload_bytes=4096) as (client, _):
        app = client.app
        head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.dcm"\r\n\r\n'
        chunks = [head] + [b"x" * 1024] * 64
        multipart = {"content-type": "multipart/form-data; boundary=b"}
        status, headers, _, pulled = client.portal.call(
            raw_request, app, "POST", "/v1/screenings/upload", multipart, chunks
        )
        assert (status, pulled) == (401, 0) and headers["www-authenticate"] == "Bearer"
        status, _, _, pulled = client.portal.call(
            raw_request, app, "POST", "/v1/screenings/upload", {**multipart, **bearer(READER)}, chunks
        )
        assert (status, pulled) == (403, 0)  # a reader may not upload
        declared = {**multipart, **bearer(RIS), "content-length": str(64 * 1024)}
        status, _, _, pulled = client.portal.call(raw_request, app, "POST", "/v1/screenings/upload", declared, chunks)
        assert (status, pulled) == (413, 0)
        # no Content-Length (chunked): the cap cuts the stream while it is read
        status, _, _, pulled = client.portal.call(
            raw_request, app, "POST", "/v1/screenings/upload", {**multipart, **bearer(RIS)}, chunks
        )
        assert status == 413 and pulled <= 6  # 4 KiB cap, 1 KiB chunks: stopped at the 5th after the head
        spool = tmp_path / "spool"
        assert not list(spool.iterdir()) if spool.exists() else True  # partial upload removed
        # a JSON body has its own small cap
        big = {**bearer(RIS), "content-type": "application/json", "content-length": str(10 * 1024 * 1024)}
        status, _, _, pulled = client.portal.call(raw_request, app, "POST", "/v1/screenings", big, [b"{}"])
        assert (status, pulled) == (413, 0)


def test_scoped_tokens(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    """Finding: webhook and client tokens were the same kind."""
    with running(tmp_path, predictor, store_dir, tokens=TOKENS) as (client, _):
        uid = uid_of(store_dir / "s41.dcm")
        body = {"study_instance_uid": uid}
        assert client.post("/v1/screenings", json=body, headers=bearer(READER)).status_code == 403
        assert client.post("/v1/events/stable-study", json=body, headers=bearer(READER)).status_code == 403
        job = client.post("/v1/screenings", json=body, headers=bearer(RIS))
        assert job.status_code == 202
        assert wait_for(client, job.json()["screening_id"], bearer(RIS))["status"] == "DONE"
        assert wait_for(client, job.json()["screening_id"], bearer(READER))["status"] == "DONE"
        assert client.get("/v1/worklist", headers=bearer(READER)).status_code == 200
        assert client.get("/v1/worklist", headers=bearer(RIS)).status_code == 403
        assert client.get("/metrics", headers=bearer(READER)).status_code == 403
        assert client.get("/metrics", headers=bearer(ADMIN)).status_code == 200
        assert client.get("/v1/worklist", headers={"Authorization": f"Basic {READER}"}).status_code == 401


def test_every_response_is_no_store_with_security_headers(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Finding: responses with patient identifiers carried no Cache-Control: no-store."""
    with running(tmp_path, predictor, store_dir, tokens=TOKENS) as (client, _):
        responses = [
            client.get("/healthz"),
            client.get("/v1/worklist", headers=bearer(READER)),
            client.get("/v1/worklist"),
            client.get("/v1/screenings/nope", headers=bearer(READER)),
            client.post("/v1/screenings", json={"study_instance_uid": "x"}, headers=bearer(RIS)),
        ]
        assert [r.status_code for r in responses] == [200, 200, 401, 404, 422]
        for r in responses:
            assert r.headers["cache-control"] == "no-store"
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
            assert r.headers["x-frame-options"] == "DENY"
            assert "default-src 'self'" in r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_docs_use_no_cdn_and_openapi_needs_admin(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    """Finding: /docs loaded Swagger UI from a public CDN."""
    with running(tmp_path, predictor, store_dir, tokens=TOKENS) as (client, _):
        assert client.get("/docs", headers=bearer(ADMIN)).status_code == 404
        assert client.get("/redoc", headers=bearer(ADMIN)).status_code == 404
        assert client.get("/openapi.json").status_code == 401
        assert client.get("/openapi.json", headers=bearer(READER)).status_code == 403
        doc = client.get("/openapi.json", headers=bearer(ADMIN))
        assert doc.status_code == 200 and "/v1/screenings/upload" in doc.json()["paths"]
        assert "cdn" not in doc.text.lower()


def test_worklist_limit_is_bounded(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    """Finding: worklist?limit=-1 returned all rows."""
    with running(tmp_path, predictor, store_dir) as (client, _):
        for limit in (-1, 0, 1001):
            assert client.get("/v1/worklist", params={"limit": limit}).status_code == 422
        assert client.get("/v1/worklist", params={"limit": 1000}).status_code == 200


def test_422_never_echoes_the_request(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    """Finding: a 422 echoed the whole request body (10 MB in, 10 MB out, identifiers included)."""
    with running(tmp_path, predictor, store_dir, max_json_bytes=2 * 1024 * 1024) as (client, _):
        marker = "DOE^JANE^PATIENT-4711"
        body = {"study_instance_uid": marker * 40_000, "priority": "stat"}
        answer = client.post("/v1/screenings", json=body)
        assert answer.status_code == 422
        assert marker not in answer.text and len(answer.content) < 2000
        assert answer.json()["detail"][0]["loc"] == ["body", "study_instance_uid"]
        bad = client.post("/v1/screenings", json={"study_instance_uid": "1.2.3", "extra": marker})
        assert bad.status_code == 422 and marker not in bad.text
        broken = client.post(
            "/v1/screenings",
            content=b'{"study_instance_uid": "' + marker.encode(),
            headers={"content-type": "application/json"},
        )
        assert broken.status_code == 422 and marker not in broken.text


def test_dev_mode_without_tokens_answers_loopback_only(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Finding: dev mode with no token was fully open, even on --host 0.0.0.0."""
    with running(tmp_path, predictor, store_dir) as (client, _):
        assert client.get("/v1/worklist").status_code == 200  # the fixture's client is 127.0.0.1
        with TestClient(client.app, client=("192.0.2.7", 50000)) as outsider:
            assert outsider.get("/v1/worklist").status_code == 403
            assert outsider.get("/healthz").status_code == 200
    with pytest.raises(ValueError, match="loopback"):
        ApiSettings(host="0.0.0.0")
    assert ApiSettings(host="0.0.0.0", tokens=[SecretStr(ADMIN)]).host == "0.0.0.0"


def test_serve_configs_never_pair_an_open_address_with_dev_settings() -> None:
    """Finding: configs/serve/gpu.yaml paired 0.0.0.0 with dev settings."""
    for path in sorted((REPO_ROOT / "configs" / "serve").glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        host = config.get("http_options", {}).get("host", "127.0.0.1")
        if host in ("127.0.0.1", "localhost", "::1"):
            continue
        for application in config["applications"]:
            settings = yaml.safe_load((REPO_ROOT / application["args"]["settings_path"]).read_text())
            assert settings.get("environment") == "prod", f"{path.name}: {host} with non-prod settings"


def _settings_file(tmp_path: Path, **extra: Any) -> Path:
    path = tmp_path / "settings.yaml"
    path.write_text(yaml.safe_dump({"models": [{"id": "cxr-triage"}], **extra}))
    return path


def test_prod_refuses_weak_tokens_and_never_prints_a_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Findings: a 1-character token was accepted in prod; the refusal printed the key's tail."""
    monkeypatch.setenv("DXASSIST_API__TOKENS", "ris:integration:x")
    good_key = _settings_file(tmp_path, environment="prod", security={"study_ref_key": "s" * 40})
    with pytest.raises(ValueError) as weak:
        Settings.load(good_key)
    assert "too weak" in str(weak.value) and "ris" in str(weak.value)
    monkeypatch.setenv("DXASSIST_API__TOKENS", f"ris:integration:{RIS}")
    assert Settings.load(good_key).api.tokens[0].id == "ris"
    key = "k" * 11 + "SECRET-TAIL-77"  # 25 characters: too short for prod
    short = _settings_file(tmp_path, environment="prod", security={"study_ref_key": key})
    with pytest.raises(ValueError) as short_key:
        Settings.load(short)
    assert "study_ref_key" in str(short_key.value)
    assert "SECRET-TAIL" not in str(short_key.value) and key[-6:] not in str(short_key.value)
    no_key = _settings_file(tmp_path, environment="prod")
    with pytest.raises(ValueError, match="study_ref_key"):
        Settings.load(no_key)


def test_dev_study_ref_key_is_generated_per_install(tmp_path: Path) -> None:
    """Finding: the dev study-ref key was a public constant."""
    path = tmp_path / "var" / "study-ref.key"
    first = install_study_ref_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert install_study_ref_key(path).get_secret_value() == first.get_secret_value()  # stable per install
    assert len(first.get_secret_value()) >= 64 and first.get_secret_value() != "dev-only-study-ref-key-change-me"
    other = install_study_ref_key(tmp_path / "other" / "study-ref.key")
    assert other.get_secret_value() != first.get_secret_value()


def test_spool_is_private_and_partials_are_swept(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    """Findings: upload spool files were world-readable; partial uploads were never cleaned.
    Since uploads are kept in the results database from admission (ADR 0021), the spool is only
    the buffer an upload streams into: private while it is there, gone once the job is admitted."""
    import asyncio

    import httpx

    from serving.online.edge import spool_multipart

    partial = tmp_path / "spool" / ".partial-left-by-a-crash"
    partial.mkdir(parents=True)
    (partial / "00000.dcm").write_bytes(b"half")
    data = (store_dir / "s43.dcm").read_bytes()
    with running(tmp_path, predictor, store_dir, gate=True) as (client, pipe):
        assert not partial.exists()
        assert stat.S_IMODE(os.stat(tmp_path / "spool").st_mode) == 0o700
        files = [("files", ("a.dcm", data, "application/dicom"))]
        job = client.post("/v1/screenings/upload", files=files).json()["screening_id"]
        assert list((tmp_path / "spool").iterdir()) == []  # admitted: the bytes are in the database
        svc = _service_of(client)
        assert svc.store.upload_files(job) == [data]
        client.portal.call(pipe().gate.set)  # type: ignore[union-attr]
        assert wait_for(client, job)["result"]["outcome"] == "SCREENED"
        assert svc.store.upload_files(job) == []  # deleted with the result's commit

    body = httpx.Request("POST", "http://x/", files=files)

    async def chunks() -> Any:
        yield body.read()

    upload = asyncio.run(spool_multipart(body.headers["content-type"], chunks(), tmp_path / "buffer", "files", 10))
    assert upload.folder is not None  # no memory budget: straight to disk
    assert upload.count == 1 and stat.S_IMODE(os.stat(upload.folder).st_mode) == 0o700
    assert [stat.S_IMODE(os.stat(f).st_mode) for f in upload.folder.iterdir()] == [0o600]


def test_uploads_stay_in_memory_within_the_budget_and_spill_to_the_spool_past_it(
    tmp_path: Path, store_dir: Path
) -> None:
    """Within ``api.upload_memory_bytes`` an upload is never written to disk only to be read back;
    past it (counted across every upload being received) the rest streams into a private folder,
    the parts received so far first. Whatever happens, the budget is handed back."""
    import asyncio

    import httpx

    from serving.online.edge import UploadError, spool_multipart
    from serving.online.spool import MemoryBudget

    a, b = (store_dir / "s41.dcm").read_bytes(), (store_dir / "s42.dcm").read_bytes()
    body = httpx.Request(
        "POST", "http://x/", files=[("files", ("a.dcm", a, "application/dicom")), ("files", ("b.dcm", b, "x"))]
    )
    raw = body.read()

    def receive(budget: MemoryBudget, data: bytes = raw) -> Any:
        async def chunks() -> Any:
            for i in range(0, len(data), 65536):  # as a socket delivers it
                yield data[i : i + 65536]

        return asyncio.run(
            spool_multipart(body.headers["content-type"], chunks(), tmp_path / "spool", "files", 10, budget)
        )

    ample = MemoryBudget(10 * len(raw))
    upload = receive(ample)
    assert upload.folder is None and upload.files() == (a, b)
    assert ample.held == len(a) + len(b) and not (tmp_path / "spool").exists()
    upload.discard()
    assert ample.held == 0

    tight = MemoryBudget(len(a) + len(b) // 2)  # the second file does not fit
    upload = receive(tight)
    assert upload.folder is not None and upload.files() == (a, b)
    assert sorted(f.name for f in upload.folder.iterdir()) == ["00000.dcm", "00001.dcm"]
    assert [stat.S_IMODE(os.stat(f).st_mode) for f in upload.folder.iterdir()] == [0o600, 0o600]
    assert tight.held == 0  # on disk: nothing held in memory
    upload.discard()
    assert not upload.folder.exists()

    cut = raw[: len(raw) - 100]  # ends inside the second part
    with pytest.raises(UploadError):
        receive(ample, cut)
    assert ample.held == 0 and list((tmp_path / "spool").iterdir()) == []


def test_draining_refuses_new_work_with_retry_after_and_finishes_running_work(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Finding: right after SIGTERM the service still accepted jobs whose clients then saw
    dropped connections."""
    with running(tmp_path, predictor, store_dir, gate=True, max_inflight=1) as (client, pipe):
        uids = [uid_of(store_dir / f"s{s}.dcm") for s in (41, 42)]
        running_job = client.post("/v1/screenings", json={"study_instance_uid": uids[0]}).json()["screening_id"]
        deadline = time.monotonic() + 5
        while not pipe().order and time.monotonic() < deadline:
            time.sleep(0.01)
        svc = _service_of(client)
        future = client.portal.start_task_soon(svc.drain, 30.0)  # what SIGTERM does (dxassist serve)
        deadline = time.monotonic() + 5
        while client.get("/readyz").status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = client.post("/v1/screenings", json={"study_instance_uid": uids[1]})
        assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["admission"] == "draining"
        client.portal.call(pipe().gate.set)  # type: ignore[union-attr]
        assert future.result(timeout=30) is True
        assert client.get(f"/v1/screenings/{running_job}").json()["status"] == "DONE"


def _service_of(client: TestClient) -> Any:
    """The started ScreeningService behind the test app (from the readiness dependency)."""
    from serving.online.service import ScreeningService

    found: list[ScreeningService] = []
    for route in client.app.routes:  # type: ignore[attr-defined]
        if getattr(route, "path", "") == "/readyz":
            dependant = route.dependant  # type: ignore[attr-defined]
            getter = dependant.dependencies[0].call
            found.append(client.portal.call(getter))
    return found[0]


def test_a_waiting_client_holds_its_screening_id_before_the_screening_ends(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    """Finding: after a replica was killed, clients waiting on POST ?wait= got a bare 500
    although their jobs were saved: now the 202 with Location and X-Screening-Id is sent
    before the wait, so whatever happens to the replica the client knows its screening."""
    import asyncio

    with running(tmp_path, predictor, store_dir, gate=True) as (client, pipe):
        body = json.dumps({"study_instance_uid": uid_of(store_dir / "s41.dcm")}).encode()
        sent: list[dict[str, Any]] = []

        async def post_and_watch() -> tuple[dict[str, str], bool]:
            delivered = False

            async def receive() -> dict[str, Any]:
                nonlocal delivered
                if not delivered:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                await asyncio.sleep(3600)  # the client stays connected
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/screenings",
                "raw_path": b"/v1/screenings",
                "query_string": b"wait=30",
                "root_path": "",
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                "client": ("127.0.0.1", 40000),
                "server": ("127.0.0.1", 8000),
            }
            task = asyncio.create_task(client.app(scope, receive, send))  # type: ignore[arg-type]
            for _ in range(500):
                if any(m["type"] == "http.response.start" for m in sent):
                    break
                await asyncio.sleep(0.01)
            start = next(m for m in sent if m["type"] == "http.response.start")
            finished = any(m["type"] == "http.response.body" and not m.get("more_body") for m in sent)
            pipe().gate.set()  # type: ignore[union-attr]  # the screening may end now
            await asyncio.wait_for(task, 30)
            return {k.decode(): v.decode() for k, v in start["headers"]}, finished

        headers, finished_before_gate = client.portal.call(post_and_watch)
        assert not finished_before_gate  # the headers came while the screening was still held
        assert sent[0]["status"] == 202
        job_id = headers["x-screening-id"]
        assert headers["location"] == f"/v1/screenings/{job_id}"
        final = json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))
        assert final["screening_id"] == job_id and final["status"] == "DONE"


def test_serve_refuses_an_open_bind_without_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Finding: `dxassist serve --host 0.0.0.0` ran fully open in dev mode, with no warning."""
    from typer.testing import CliRunner

    from serving.cli.main import app

    monkeypatch.delenv("DXASSIST_API__TOKENS", raising=False)
    outcome = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert outcome.exit_code == 2
    assert "refusing to bind 0.0.0.0" in outcome.output and "DXASSIST_API__TOKENS" in outcome.output
