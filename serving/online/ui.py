"""The reading worklist web page and the endpoints it reads.

The page (``serving/online/static``: plain HTML, JS and CSS shipped in the package, no build step,
nothing loaded from elsewhere) is public like any static file: it holds no data. Everything it
shows comes from the endpoints below, called with the reader's bearer token (entered once, kept in
the tab's session storage), and checked by the edge like every other ``/v1`` call:

* ``GET /v1/ui/worklist``: the newest screening of each study with its findings, AI priority and
  reading rank (``worklist_rank``: STAT first, ageing), QA outcome and delivery status per
  destination.
* ``GET /v1/screenings/{id}/view``: one screening for the study view: result, the screened
  images (size, frames), deliveries, feedback so far and the OHIF link when configured.
* ``GET /v1/screenings/{id}/image.png``: the screened frame rendered from the store (display
  ready, long side at most 2048 px): the page draws the AI regions on it.
* ``POST /v1/screenings/{id}/feedback`` / ``GET`` the same: a reader's verdict on a finding
  (agree, disagree, uncertain, comment), stored in the results database (``feedback`` table).
* ``GET /v1/ui/events``: Server-Sent Events telling the page when the worklist changed (a new
  screening, a delivery done, retried or given up, a STAT order), so it refreshes at once instead
  of every few seconds. The events carry only an opaque digest, never a row. The stamp is read
  from the results database (any replica may have written the change, ADR 0021) at most once per
  ``_EVENTS_CHECK_S`` for all open streams together; a stream ends after ``_EVENTS_LIFETIME_S``
  (the page reconnects), and the page falls back to polling when the stream cannot be had.
"""

import asyncio
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from importlib.resources import files
from typing import Annotated, Any
from urllib.parse import quote

import cv2
import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, select

from models.errors import DxAssistError
from models.pixels import decode_frames, read_dataset
from models.results import ScreeningResult
from serving.online.service import ScreeningService
from serving.persistence.schema import deliveries, jobs, screenings

_STATIC = files("serving.online") / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
_MAX_SIDE = 2048
#: how often the worklist's change stamp is read (once for every open stream together)
_EVENTS_CHECK_S = 1.0
#: a comment line this often keeps proxies from closing a quiet stream
_EVENTS_HEARTBEAT_S = 15.0
#: a stream ends after this long; the page reconnects (no connection outlives a deploy for long)
_EVENTS_LIFETIME_S = 300.0


class Delivery(BaseModel):
    sink: str
    status: str  # PENDING, DONE, DEAD
    attempts: int
    failed: bool = Field(description="the last attempt failed (retrying while PENDING, given up when DEAD)")


class UiWorklistRow(BaseModel):
    screening_id: str
    study_instance_uid: str
    study_ref: str
    patient_name: str
    patient_id: str
    accession_number: str
    study_datetime: str | None
    modality: str
    outcome: str
    reason: str | None
    reason_detail: str | None
    ai_priority: str | None
    requested_priority: str | None
    rank: int
    rank_reason: str
    screened_at: str
    positive_findings: list[str]
    deliveries: list[Delivery]


class ImageInfo(BaseModel):
    sop_instance_uid: str
    rows: int
    columns: int
    frames: int
    modality: str


class FeedbackIn(BaseModel):
    finding_key: str = Field(min_length=1, max_length=64)
    verdict: str = Field(pattern="^(agree|disagree|uncertain)$")
    comment: str | None = Field(default=None, max_length=2000)


class FeedbackOut(BaseModel):
    id: int
    created_at: str
    finding_key: str
    verdict: str
    comment: str | None
    reader_id: str


class ScreeningView(BaseModel):
    screening_id: str
    screened_at: str
    result: ScreeningResult
    images: list[ImageInfo]
    deliveries: list[Delivery]
    feedback: list[FeedbackOut]
    ohif_url: str | None


def _database(svc: ScreeningService) -> Any:
    return svc.store._db  # the store's engine: read-only queries the store has no method for


def _deliveries(svc: ScreeningService, ids: list[int]) -> dict[int, list[Delivery]]:
    if not ids:
        return {}
    with _database(svc).read() as conn:
        rows = conn.execute(
            select(
                deliveries.c.screening_id,
                deliveries.c.sink,
                deliveries.c.status,
                deliveries.c.attempts,
                deliveries.c.last_error,
            )
            .where(deliveries.c.screening_id.in_(ids))
            .order_by(deliveries.c.sink)
        ).all()
    out: dict[int, list[Delivery]] = {}
    for sid, sink, status, attempts, error in rows:
        out.setdefault(int(sid), []).append(
            Delivery(sink=sink, status=status, attempts=int(attempts), failed=status == "DEAD" or bool(error))
        )
    return out


def _modality(svc: ScreeningService, result: ScreeningResult) -> str:
    for ref in result.models:
        loaded = svc.screener.loaded.get(ref.split("@")[0])
        if loaded is not None and loaded.manifest.accepts.modality:
            return "/".join(loaded.manifest.accepts.modality)
    return ""


def worklist_rows(svc: ScreeningService, limit: int) -> list[UiWorklistRow]:
    """Each study's reference screening (the store copy's over an upload of the same Study UID;
    each screening without a Study UID on its own), in reading order."""
    from serving.online.api import worklist_rank

    picked = [
        (r.id, r.created_at, r.result, r.screening_uuid, r.requested_priority)
        for r in svc.store.reference_screenings(limit)
    ]
    sent = _deliveries(svc, [p[0] for p in picked])
    now = datetime.now(UTC)
    out = []
    stat_uids, stat_accessions = svc.stat_orders()  # inbound STAT orders rank first (serving.online.orders)
    for sid, created, result, public_id, requested in picked:
        if result.study_instance_uid in stat_uids or (
            result.accession_number and result.accession_number in stat_accessions
        ):
            requested = "stat"
        rank, why = worklist_rank(result, requested, created, now, svc.settings.ageing_minutes)
        out.append(
            UiWorklistRow(
                screening_id=public_id,
                study_instance_uid=result.study_instance_uid,
                study_ref=result.study_ref,
                patient_name=result.patient_name,
                patient_id=result.patient_id,
                accession_number=result.accession_number,
                study_datetime=result.study_datetime.isoformat() if result.study_datetime else None,
                modality=_modality(svc, result),
                outcome=result.outcome.value,
                reason=result.reason.value if result.reason else None,
                reason_detail=result.reason_detail,
                ai_priority=result.priority.value if result.priority else None,
                requested_priority=requested,
                rank=rank,
                rank_reason=why,
                screened_at=created,
                positive_findings=[f.display for f in result.positive_findings],
                deliveries=sent.get(sid, []),
            )
        )
    out.sort(key=lambda r: (r.rank, r.screened_at))
    return out


def worklist_stamp(svc: ScreeningService) -> str:
    """A digest that changes when the worklist's rows may have: a new screening, a delivery
    added, done, retried or given up, a STAT order. Index-backed counts only (no row is read)."""
    pending, dead = deliveries.c.status == "PENDING", deliveries.c.status == "DEAD"
    with _database(svc).read() as conn:
        newest = conn.execute(select(func.max(screenings.c.id))).scalar()
        sent = conn.execute(select(func.max(deliveries.c.id))).scalar()
        waiting = conn.execute(
            select(func.count(), func.coalesce(func.sum(deliveries.c.attempts), 0)).where(pending)
        ).one()
        failed = conn.execute(select(func.count()).where(dead)).scalar()
    stat_uids, stat_accessions = svc.stat_orders()
    parts = [newest, sent, *waiting, failed, *sorted(stat_uids), "|", *sorted(stat_accessions)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


class _StampCache:
    """One read of the stamp per ``_EVENTS_CHECK_S`` whatever the number of open streams."""

    def __init__(self, svc: ScreeningService) -> None:
        self._svc, self._lock = svc, threading.Lock()
        self._value, self._at = "", float("-inf")

    def get(self) -> str:
        with self._lock:
            if time.monotonic() - self._at >= _EVENTS_CHECK_S:
                self._value, self._at = worklist_stamp(self._svc), time.monotonic()
            return self._value


async def worklist_events(
    stamp: Callable[[], str], disconnected: Callable[[], Awaitable[bool]], closing: Callable[[], bool]
) -> AsyncIterator[bytes]:
    """The event stream: ``worklist`` at once (the page loads) and on every change of the stamp,
    a comment line when quiet; it ends after ``_EVENTS_LIFETIME_S``, when the client goes or when
    the service drains (an open stream must not hold a shutdown for its graceful timeout)."""
    yield b"retry: 3000\n\n"
    started = quiet_since = time.monotonic()
    last = None
    while time.monotonic() - started < _EVENTS_LIFETIME_S:
        if closing() or await disconnected():
            return
        current = await asyncio.to_thread(stamp)
        now = time.monotonic()
        if current != last:
            last, quiet_since = current, now
            yield f"event: worklist\ndata: {json.dumps({'stamp': current})}\n\n".encode()
        elif now - quiet_since >= _EVENTS_HEARTBEAT_S:
            quiet_since = now
            yield b": keep-alive\n\n"
        await asyncio.sleep(_EVENTS_CHECK_S)


def _screening_row(svc: ScreeningService, public_id: str) -> tuple[int, str] | None:
    """(internal id, created_at) of a screening named by its job id or screening uuid."""
    with _database(svc).read() as conn:
        row = conn.execute(
            select(screenings.c.id, screenings.c.created_at)
            .outerjoin(jobs, jobs.c.screening_id == screenings.c.id)
            .where((jobs.c.id == public_id) | (screenings.c.screening_uuid == public_id))
            .limit(1)
        ).first()
    return (int(row[0]), str(row[1])) if row else None


def _view(svc: ScreeningService, public_id: str, ohif_url: str | None) -> ScreeningView:
    found = _screening_row(svc, public_id)
    loaded = svc.store.for_delivery(found[0]) if found else None
    if found is None or loaded is None:
        raise HTTPException(status_code=404, detail="screening not found")
    result, evidence = loaded
    images = [
        ImageInfo(
            sop_instance_uid=str(h.get("SOPInstanceUID", "")),
            rows=int(h.get("Rows", 0) or 0),
            columns=int(h.get("Columns", 0) or 0),
            frames=int(h.get("NumberOfFrames", 1) or 1),
            modality=str(h.get("Modality", "")),
        )
        for h in evidence
        if "Rows" in h and str(h.get("Manufacturer", "")) != "dxassist"
    ]
    link = None
    if ohif_url and result.study_instance_uid:
        link = f"{ohif_url.rstrip('/')}/viewer?StudyInstanceUIDs={quote(result.study_instance_uid)}"
    feedback = [
        FeedbackOut(
            id=f.id,
            created_at=f.created_at,
            finding_key=f.finding_key,
            verdict=str(f.verdict),
            comment=f.comment,
            reader_id=f.reader_id,
        )
        for f in svc.store.feedback_for(public_id)
    ]
    return ScreeningView(
        screening_id=public_id,
        screened_at=found[1],
        result=result,
        images=images,
        deliveries=_deliveries(svc, [found[0]]).get(found[0], []),
        feedback=feedback,
        ohif_url=link,
    )


def _render_png(svc: ScreeningService, public_id: str, sop_instance_uid: str, frame: int) -> bytes:
    """The screened frame from the configured store, display-ready, as PNG."""
    view = _view(svc, public_id, None)
    # the store the pipeline fetches from (local, DICOMweb, DIMSE), else the one the poller searches
    source = getattr(svc.pipeline, "source", None) or svc.poll_source
    wanted = next((i for i in view.images if i.sop_instance_uid == sop_instance_uid), None)
    if source is None or wanted is None or not 0 <= frame < wanted.frames:
        raise HTTPException(status_code=404, detail="image not available")
    try:
        for item in source.instances(view.result.study_instance_uid):
            ds = read_dataset(item.source)
            if str(ds.get("SOPInstanceUID", "")) != sop_instance_uid:
                continue
            pixels = decode_frames(ds, frame_indices=[frame], target_size=_MAX_SIDE)[0].pixels
            rows, cols = pixels.shape[:2]
            scale = min(1.0, _MAX_SIDE / max(rows, cols))
            if scale < 1.0:
                size = (round(cols * scale), round(rows * scale))
                pixels = np.asarray(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA), dtype=np.float32)
            image = (np.clip(pixels, 0, 1) * 255 + 0.5).astype(np.uint8)
            if image.ndim == 3:
                image = np.ascontiguousarray(image[..., ::-1])  # OpenCV writes BGR
            ok, png = cv2.imencode(".png", image)
            if ok:
                return bytes(png.tobytes())
    except DxAssistError as exc:
        raise HTTPException(status_code=404, detail=f"image not available ({type(exc).__name__})") from exc
    raise HTTPException(status_code=404, detail="image not available")


def ui_router(get_service: Callable[[], Awaitable[ScreeningService]], auth: Any) -> APIRouter:
    """The page's routes; ``auth`` is the API's bearer dependency (the edge checked the token)."""
    router = APIRouter()

    async def service() -> ScreeningService:
        return await get_service()

    Service = Annotated[ScreeningService, Depends(service)]

    def actor(request: Request) -> str:
        """Who asks (the token id the edge put on the request), for the audit log."""
        return str(getattr(getattr(request.state, "principal", None), "id", "unknown"))

    @router.get("/ui", include_in_schema=False)
    @router.get("/ui/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse((_STATIC / "index.html").read_text(encoding="utf-8"))

    @router.get("/ui/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        suffix = name[name.rfind(".") :] if "." in name else ""
        resource = _STATIC / name
        if "/" in name or suffix not in _TYPES or not resource.is_file():
            raise HTTPException(status_code=404, detail="not found")
        return Response(resource.read_bytes(), media_type=_TYPES[suffix])

    @router.get("/v1/ui/worklist", response_model=list[UiWorklistRow], dependencies=[auth])
    async def ui_worklist(
        svc: Service, request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 200
    ) -> list[UiWorklistRow]:
        """The worklist as the reading page shows it (identifiers included: readers only)."""
        rows = await asyncio.to_thread(worklist_rows, svc, limit)
        subjects = [(r.screening_id, r.study_ref) for r in rows]
        await asyncio.to_thread(svc.store.audit_many, actor(request), "read-worklist", subjects)
        return rows

    stamps: dict[int, _StampCache] = {}

    @router.get("/v1/ui/events", dependencies=[auth], response_class=StreamingResponse)
    async def ui_events(svc: Service, request: Request) -> StreamingResponse:
        """Server-Sent Events: ``worklist`` whenever the worklist changed (data: an opaque stamp)."""

        def closing() -> bool:
            return bool(getattr(svc, "_draining", False))

        if closing():
            raise HTTPException(status_code=503, detail="service draining", headers={"Retry-After": "30"})
        cache = stamps.setdefault(id(svc), _StampCache(svc))
        return StreamingResponse(
            worklist_events(cache.get, request.is_disconnected, closing),
            media_type="text/event-stream",
            headers={"X-Accel-Buffering": "no"},  # a buffering reverse proxy would hold the events
        )

    @router.get("/v1/screenings/{screening_id}/view", response_model=ScreeningView, dependencies=[auth])
    async def screening_view(screening_id: str, svc: Service, request: Request) -> ScreeningView:
        """One screening as the study view shows it."""
        ohif = getattr(svc.settings, "ohif_url", None)
        view = await asyncio.to_thread(_view, svc, screening_id, ohif)
        await asyncio.to_thread(svc.store.audit, actor(request), "read", screening_id, view.result.study_ref)
        return view

    @router.get("/v1/screenings/{screening_id}/image.png", dependencies=[auth])
    async def screening_image(
        screening_id: str, svc: Service, request: Request, sop: str, frame: Annotated[int, Query(ge=0)] = 0
    ) -> Response:
        """The screened frame rendered from the store (PNG, long side at most 2048 px)."""
        png = await asyncio.to_thread(_render_png, svc, screening_id, sop, frame)
        await asyncio.to_thread(svc.store.audit, actor(request), "read-image", screening_id)
        return Response(png, media_type="image/png")

    @router.post("/v1/screenings/{screening_id}/feedback", status_code=201, dependencies=[auth])
    async def add_feedback(screening_id: str, body: FeedbackIn, svc: Service, request: Request) -> dict[str, int]:
        """A reader's verdict on one finding of this screening (agree, disagree, uncertain)."""
        view = await asyncio.to_thread(_view, svc, screening_id, None)
        if body.finding_key not in {f.key for f in view.result.findings}:
            raise HTTPException(status_code=422, detail="finding_key: not a finding of this screening")
        reader = getattr(getattr(request.state, "principal", None), "id", "unknown")
        row = await asyncio.to_thread(
            svc.store.add_feedback, screening_id, body.finding_key, body.verdict, reader, body.comment
        )
        await asyncio.to_thread(svc.store.audit, actor(request), "feedback", screening_id, view.result.study_ref)
        return {"id": row}

    @router.get("/v1/screenings/{screening_id}/feedback", response_model=list[FeedbackOut], dependencies=[auth])
    async def list_feedback(screening_id: str, svc: Service, request: Request) -> list[FeedbackOut]:
        view = await asyncio.to_thread(_view, svc, screening_id, None)
        await asyncio.to_thread(svc.store.audit, actor(request), "read-feedback", screening_id, view.result.study_ref)
        return view.feedback

    return router
