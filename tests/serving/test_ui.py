"""The worklist page's HTTP side: static files are public and hold no data, every data call needs
a reader (or admin) token, feedback is validated and stored, the screened frame renders as PNG."""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image
from pydantic import SecretStr

from models.predictor import OnnxPredictor
from serving.online import ui
from tests.serving.test_api import running, uid_of, wait_for

ADMIN = {"Authorization": "Bearer admin-secret"}
READER = {"Authorization": "Bearer reader-secret"}
INTEGRATION = {"Authorization": "Bearer integration-secret"}
TOKENS = [
    SecretStr("admin-secret"),
    SecretStr("reader-1:reader:reader-secret"),
    SecretStr("pacs-1:integration:integration-secret"),
]


def _screened(client, store_dir: Path) -> str:  # type: ignore[no-untyped-def]
    answer = client.post("/v1/screenings", json={"study_instance_uid": uid_of(store_dir / "s41.dcm")}, headers=ADMIN)
    job = answer.json()["screening_id"]
    assert wait_for(client, job, ADMIN)["status"] == "DONE"
    return str(job)


def test_page_is_public_and_its_data_needs_a_reader_token(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    with running(tmp_path, predictor, store_dir, tokens=TOKENS) as (client, _):
        page = client.get("/ui/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert 'src="/ui/static/app.js"' in page.text and "http" not in page.text.split("<body>")[0]  # no CDN
        script = client.get("/ui/static/app.js")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
        assert client.get("/ui/static/secret.py").status_code == 404
        assert client.get("/v1/ui/worklist").status_code == 401
        assert client.get("/v1/ui/worklist", headers=INTEGRATION).status_code == 403
        job = _screened(client, store_dir)
        rows = client.get("/v1/ui/worklist", headers=READER).json()
        assert [r["screening_id"] for r in rows] == [job]
        assert rows[0]["outcome"] == "SCREENED" and rows[0]["modality"] == "CR/DX"


def test_feedback_is_validated_and_stored_with_the_reader(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path
) -> None:
    with running(tmp_path, predictor, store_dir, tokens=TOKENS) as (client, _):
        job = _screened(client, store_dir)
        url = f"/v1/screenings/{job}/feedback"
        body = {"finding_key": "alpha", "verdict": "disagree", "comment": "artefact"}
        assert client.post(url, json=body, headers=INTEGRATION).status_code == 403
        assert client.post(url, json=body, headers=READER).status_code == 201
        assert client.post(url, json={**body, "finding_key": "nope"}, headers=READER).status_code == 422
        assert client.post(url, json={**body, "verdict": "maybe"}, headers=READER).status_code == 422
        assert client.post("/v1/screenings/unknown/feedback", json=body, headers=READER).status_code == 404
        saved = client.get(url, headers=READER).json()
        assert [(f["finding_key"], f["verdict"], f["comment"], f["reader_id"]) for f in saved] == [
            ("alpha", "disagree", "artefact", "reader-1")
        ]


def test_the_screened_frame_renders_as_png(tmp_path: Path, predictor: OnnxPredictor, store_dir: Path) -> None:
    with running(tmp_path, predictor, store_dir, tokens=TOKENS) as (client, pipeline):
        pipeline().source = pipeline().inner.source  # type: ignore[attr-defined]  # the test's gate wraps it
        job = _screened(client, store_dir)
        view = client.get(f"/v1/screenings/{job}/view", headers=READER).json()
        (image,) = view["images"]
        png = client.get(f"/v1/screenings/{job}/image.png", params={"sop": image["sop_instance_uid"]}, headers=READER)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(png.content)).size == (image["columns"], image["rows"])
        missing = client.get(f"/v1/screenings/{job}/image.png", params={"sop": "1.2.3"}, headers=READER)
        assert missing.status_code == 404


def _events(client, headers: dict[str, str]) -> list[dict]:  # type: ignore[no-untyped-def]
    """The ``worklist`` events of one (shortened) stream."""
    answer = client.get("/v1/ui/events", headers=headers)
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in answer.text.split("\n\n") if b.startswith("event: worklist\n")]
    return [json.loads(b.split("data: ", 1)[1]) for b in blocks]


def test_the_event_stream_tells_the_page_when_the_worklist_changed(
    tmp_path: Path, predictor: OnnxPredictor, store_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream opens with the worklist's stamp and sends a new one when a screening lands; the
    events carry only the opaque stamp. (The stream is cut to 1.5 s here so that the test client,
    which reads whole bodies, returns; the page reads it live in tests/viewer.)"""
    monkeypatch.setattr(ui, "_EVENTS_LIFETIME_S", 1.5)
    monkeypatch.setattr(ui, "_EVENTS_CHECK_S", 0.1)
    with running(tmp_path, predictor, store_dir, tokens=TOKENS) as (client, _):
        assert client.get("/v1/ui/events").status_code == 401
        assert client.get("/v1/ui/events", headers=INTEGRATION).status_code == 403
        before = _events(client, READER)
        assert len(before) == 1 and set(before[0]) == {"stamp"} and re.fullmatch(r"[0-9a-f]{16}", before[0]["stamp"])
        assert _events(client, READER) == before  # nothing changed: no new stamp
        _screened(client, store_dir)
        after = _events(client, READER)
        assert len(after) == 1 and after != before


def test_a_stream_ends_when_the_service_drains() -> None:
    """An open stream must not hold a shutdown: it ends at the next check once draining."""

    async def never() -> bool:
        return False

    async def read() -> list[bytes]:
        return [chunk async for chunk in ui.worklist_events(lambda: "s", never, lambda: True)]

    assert asyncio.run(read()) == [b"retry: 3000\n\n"]
