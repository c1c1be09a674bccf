"""HTTP API (FastAPI) over a ``ScreeningService``; the OpenAPI document at ``/openapi.json``.

Study identifiers travel in request bodies, never in paths (paths end up in access logs).
Every endpoint but ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer <token>`` with a
token whose scope allows it (``serving.online.edge``: checked on the headers, before any body is
read; bodies are capped while they stream; every response carries ``no-store`` and security
headers). Without configured tokens (dev) only loopback clients are answered.

There is no ``/docs`` page: FastAPI's Swagger UI loads its script and styles from a public CDN,
which a hospital network should neither need nor trust. ``/openapi.json`` (admin scope) can be
opened in any local OpenAPI viewer. Errors map to status codes in one place (the exception
handlers below); a 422 names the fields and the reasons, never the values sent.
"""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from models.errors import AdmissionRefused, JobFailureValues, ReasonCode, RequestRejected, ResultsDatabaseError
from models.results import OutcomeValues, ScreeningResult, TriagePriorityValues
from serving.core.uids import is_dicom_uid
from serving.online.edge import EdgeGuard, Principal, spool_multipart
from serving.online.integrity import default_provenance, request_hash
from serving.online.orders_api import orders_router
from serving.online.pipeline import StudyRequest
from serving.online.service import JobStatusValues, PriorityValues, ScreeningService
from serving.online.ui import ui_router
from serving.persistence.results import Idempotency
from serving.settings import ApiSettings

#: seconds a client should wait before retrying after the results database failed
DATABASE_RETRY_AFTER_S = 5


def _check_uid(value: str) -> str:
    if not is_dicom_uid(value):  # fullmatch: a trailing newline is not a UID
        raise ValueError("not a DICOM UID (digits and dots)")
    return value


StudyUid = Annotated[
    str,
    Field(min_length=1, max_length=64, description="Study Instance UID in the configured store"),
    AfterValidator(_check_uid),
]


class ScreeningRequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    study_instance_uid: StudyUid
    priority: PriorityValues = PriorityValues.ROUTINE


class StableStudyEvent(BaseModel):
    """Sent by the PACS when a study is complete (Orthanc's OnStableStudy Lua hook)."""

    model_config = ConfigDict(extra="ignore")
    study_instance_uid: StudyUid


class ScreeningJob(BaseModel):
    screening_id: str
    status: JobStatusValues
    priority: PriorityValues
    created_at: str
    updated_at: str
    error_reason: JobFailureValues | None = None
    error_detail: str | None = None
    result: ScreeningResult | None = None


class WorklistItem(BaseModel):
    study_instance_uid: str
    study_ref: str
    ai_priority: TriagePriorityValues | None
    requested_priority: PriorityValues | None
    outcome: OutcomeValues
    reason: ReasonCode | None
    positive_findings: list[str]
    screened_at: str
    rank: int = Field(description="0 is read first: STAT requested, then URGENT, ABNORMAL, ROUTINE")
    rank_reason: str


class Health(BaseModel):
    status: str
    models: list[dict[str, Any]] = Field(default_factory=list)
    queue: dict[str, int] = Field(default_factory=dict)
    #: readiness checks: ``ok`` or why not (models, admission, database, outbox)
    checks: dict[str, str] = Field(default_factory=dict)


_AI_RANK = {TriagePriorityValues.URGENT: 1, TriagePriorityValues.ABNORMAL: 2, TriagePriorityValues.ROUTINE: 3}


def worklist_rank(
    result: ScreeningResult, requested: str | None, screened_at: str, now: datetime, ageing_minutes: float
) -> tuple[int, str]:
    """Reading rank (0 first) and why. A STAT request is 0 whatever the AI says (never lowered);
    otherwise the AI level (NOT_SCREENED reads as routine), raised one level per ageing period."""
    if requested == "stat":
        return 0, "STAT requested"
    base = _AI_RANK.get(result.priority, 3) if result.priority else 3
    waited = (now - datetime.fromisoformat(screened_at)).total_seconds() / 60.0
    steps = int(waited // ageing_minutes)
    rank = max(1, base - steps)
    label = f"AI {result.priority}" if result.priority else f"not screened ({result.reason})"
    return rank, label if rank == base else f"{label}, aged {int(waited)} min"


class RequestCounter:
    """Pure ASGI middleware: counts answered requests by route template and status code.

    Not ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` relays every body chunk
    through a stream and a task of its own; for a 2 MB upload (about 32 chunks) that was the
    largest single share of the event loop's CPU in ``scripts/profile_serving.py --gil``."""

    def __init__(self, app: ASGIApp, service: dict[str, ScreeningService]) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception before the response started ends as a 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            svc = self.service.get("service")
            if svc is not None:
                endpoint = getattr(scope.get("route"), "path", "unmatched")
                svc.metrics.requests.labels(endpoint, str(status)).inc()


def create_api(
    get_service: Callable[[], Awaitable[ScreeningService]],
    api_settings: Callable[[], ApiSettings | None] | None = None,
) -> FastAPI:
    """Build the app. ``get_service`` returns the started service; ``api_settings`` gives the
    edge its tokens and caps (by default those of the service); while it gives None only
    health answers."""
    api = FastAPI(
        title="dxassist",
        version="0.1.0",
        description="AI screening of chest radiographs and endoscopy frames. Results are decision support "
        "for a clinician, never a diagnosis.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
    )

    async def service() -> ScreeningService:
        return await get_service()

    bearer = HTTPBearer(auto_error=False, description="API token (DXASSIST_API__TOKENS)")

    async def authorised(
        request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]
    ) -> Principal:
        """The edge has checked the token and its scope; this names the bearer scheme in the
        OpenAPI document and refuses anything that reached a route without a principal."""
        principal = getattr(request.state, "principal", None)
        if not isinstance(principal, Principal):
            raise HTTPException(
                status_code=401, detail="missing or invalid bearer token", headers={"WWW-Authenticate": "Bearer"}
            )
        return principal

    Service = Annotated[ScreeningService, Depends(service)]
    Auth = Depends(authorised)
    Who = Annotated[Principal, Auth]  # the same dependency: evaluated once per request
    IdempotencyKey = Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=255,
            description="a retried POST with the same key answers with the same screening",
        ),
    ]

    _started: dict[str, ScreeningService] = {}
    api.add_middleware(RequestCounter, service=_started)

    async def remember(svc: ScreeningService) -> ScreeningService:
        _started["service"] = svc
        return svc

    def _job_view(svc: ScreeningService, job_id: str) -> ScreeningJob:
        found = svc.job(job_id)
        if found is None:
            raise HTTPException(status_code=404, detail="no such screening")
        record, result = found
        return ScreeningJob(
            screening_id=record.id,
            status=record.status,
            priority=record.priority,
            created_at=record.created_at,
            updated_at=record.updated_at,
            error_reason=record.error_reason,
            error_detail=record.error_detail,
            result=result,
        )

    @api.exception_handler(RequestRejected)
    async def rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        """A request refused for what it says (a UID in a file, a reused Idempotency-Key)."""
        return JSONResponse(status_code=exc.status_code, content={"detail": str(exc), "reason": type(exc).__name__})

    @api.exception_handler(AdmissionRefused)
    async def refused(request: Request, exc: AdmissionRefused) -> JSONResponse:
        """The one place admission refusals become HTTP: 503 with Retry-After."""
        return JSONResponse(
            status_code=503, content={"detail": str(exc)}, headers={"Retry-After": str(exc.retry_after_s)}
        )

    @api.exception_handler(ResultsDatabaseError)
    async def database_failed(request: Request, exc: ResultsDatabaseError) -> JSONResponse:
        """The results database is full, locked or unreachable: nothing was accepted, retry later."""
        return JSONResponse(
            status_code=503,
            content={"detail": "results database unavailable", "reason": "RESULTS_DATABASE_UNAVAILABLE"},
            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
        )

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422 with where and why, never the values sent (they may be identifiers, or megabytes)."""
        errors = [
            {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()[:20]
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    async def edge_settings() -> ApiSettings | None:
        if api_settings is not None:
            return api_settings()
        return (await get_service()).settings

    api.add_middleware(EdgeGuard, settings=edge_settings)

    async def _answer(svc: ScreeningService, job_id: str, wait: float, response: Response) -> Any:
        """202 with the job as it is now; with ``wait`` > 0 the 202, its ``Location`` and
        ``X-Screening-Id`` go out at once and the body (the job, DONE with its result when the
        screening ended within ``wait``) follows when the screening ends or the wait expires:
        one round trip for a worklist integration, and a client whose replica dies while it
        waits still holds a typed answer that names its screening (never a bare 500)."""
        where = {"Location": f"/v1/screenings/{job_id}", "X-Screening-Id": job_id}
        if wait <= 0:
            response.headers.update(where)
            return _job_view(svc, job_id)
        if svc.ended_here(job_id):  # screened before its admission, or a moment ago: one answer
            view = await asyncio.to_thread(_job_view, svc, job_id)
            return Response(view.model_dump_json(), status_code=202, media_type="application/json", headers=where)

        async def body() -> AsyncIterator[bytes]:
            await svc.wait_for(job_id, min(wait, 60.0))
            yield (await asyncio.to_thread(_job_view, svc, job_id)).model_dump_json().encode()

        return StreamingResponse(body(), status_code=202, media_type="application/json", headers=where)

    @api.post("/v1/screenings", status_code=202, response_model=ScreeningJob, dependencies=[Auth])
    async def request_screening(
        body: ScreeningRequestBody,
        svc: Service,
        response: Response,
        who: Who,
        idempotency_key: IdempotencyKey = None,
        wait: float = 0.0,
    ) -> Any:
        """Screen a study from the configured DICOM store. Returns at once (202), or with
        ``wait`` (seconds, at most 60) holds the body until the screening ends (202 and the
        ``Location`` at once, the job with its result when done). The
        study already queued, or a retry with the same ``Idempotency-Key``, answers with that
        screening; the same key with another body is a 422."""
        await remember(svc)
        request = StudyRequest(study_instance_uid=body.study_instance_uid)
        key = request_hash("screening", body.study_instance_uid, body.priority.value)
        job_id = await asyncio.to_thread(
            svc.submit,
            request,
            body.priority,
            provenance=default_provenance(request, who.id),
            idempotency=Idempotency(who.id, idempotency_key, key) if idempotency_key else None,
            audit_action="request",
        )
        return await _answer(svc, job_id, wait, response)

    @api.post(
        "/v1/screenings/upload",
        status_code=202,
        response_model=ScreeningJob,
        dependencies=[Auth],
        responses={413: {"description": "larger than api.max_upload_bytes"}, 422: {"description": "no files"}},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["files"],
                            "properties": {
                                "files": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                    "description": "DICOM instances of one study",
                                }
                            },
                        }
                    }
                },
            }
        },
    )
    async def upload_screening(
        request: Request,
        svc: Service,
        response: Response,
        who: Who,
        idempotency_key: IdempotencyKey = None,
        priority: PriorityValues = PriorityValues.ROUTINE,
        wait: float = 0.0,
    ) -> Any:
        """Screen uploaded DICOM instances of one study (multipart field ``files``, at most
        ``api.max_upload_bytes`` in all); ``wait`` as for ``POST /v1/screenings``, with one
        difference: a waiting client that finds a screening slot free is screened before its
        admission commits, and gets its 202 with the result in one answer, or with its ``Location``
        after ``api.screen_before_ack_s`` (ADR 0026). The upload is held in memory within
        ``api.upload_memory_bytes``, else streams into a private spool folder (never a shared
        /tmp); once admitted it is kept in the results database with its job until screened,
        readable by every replica (ADR 0021)."""
        await remember(svc)
        svc.check_admission(priority)  # a full queue refuses before the body is read
        upload = await spool_multipart(
            request.headers.get("content-type", ""),
            request.stream(),
            svc.settings.spool_dir,
            "files",
            svc.settings.max_upload_files,
            svc.upload_memory,
        )
        try:
            job_id = await svc.admit_upload(
                upload,
                priority,
                requested_by=who.id,
                idempotency_key=idempotency_key,
                audit_action="upload",
                screen_within_s=min(wait, svc.settings.screen_before_ack_s) if wait > 0 else 0.0,
            )
        finally:
            await asyncio.to_thread(upload.discard)  # read by now (or refused): let it go
        return await _answer(svc, job_id, wait, response)

    @api.post("/v1/events/stable-study", status_code=202, dependencies=[Auth])
    async def stable_study(body: StableStudyEvent, svc: Service, who: Who) -> Any:
        """Webhook for the PACS: a study became stable. Screened once; repeats are ignored (an
        upload claiming the same Study UID is not a screening of the PACS copy: it does not count)."""
        await remember(svc)
        job_id = await asyncio.to_thread(
            svc.submit_automatic, body.study_instance_uid, "webhook", who.id, audit_action="webhook"
        )
        return {"screening_id": job_id, "duplicate": job_id is None}

    @api.get("/v1/screenings/{screening_id}", response_model=ScreeningJob, dependencies=[Auth])
    async def get_screening(screening_id: str, svc: Service, who: Who, wait: float = 0.0) -> ScreeningJob:
        """Status (QUEUED, RUNNING, DONE, FAILED) and, once DONE, the result. ``wait`` (seconds,
        at most 60) holds the answer until the screening ends: no polling needed."""
        await remember(svc)
        if wait > 0:
            await svc.wait_for(screening_id, min(wait, 60.0))
        view = _job_view(svc, screening_id)
        ref = view.result.study_ref if view.result is not None else None
        await asyncio.to_thread(svc.store.audit, who.id, "read", screening_id, ref)
        return view

    @api.get("/v1/worklist", response_model=list[WorklistItem], dependencies=[Auth])
    async def worklist(svc: Service, who: Who, limit: Annotated[int, Query(ge=1, le=1000)] = 200) -> list[WorklistItem]:
        """Screened studies in reading order: the AI only raises priority, never lowers a requested
        one; waiting studies move up one level per ``ageing_minutes`` so none waits forever."""
        await remember(svc)
        now = datetime.now(UTC)
        items = []
        stat_uids, stat_accessions = await asyncio.to_thread(svc.stat_orders)  # inbound STAT orders rank first
        for created, requested, r in svc.store.latest_per_study(limit):
            if r.study_instance_uid in stat_uids or (r.accession_number and r.accession_number in stat_accessions):
                requested = PriorityValues.STAT.value
            rank, why = worklist_rank(r, requested, created, now, svc.settings.ageing_minutes)
            items.append(
                WorklistItem(
                    study_instance_uid=r.study_instance_uid,
                    study_ref=r.study_ref,
                    ai_priority=r.priority,
                    requested_priority=PriorityValues(requested) if requested else None,
                    outcome=r.outcome,
                    reason=r.reason,
                    positive_findings=[f.key for f in r.positive_findings],
                    screened_at=created,
                    rank=rank,
                    rank_reason=why,
                )
            )
        items.sort(key=lambda i: (i.rank, i.screened_at))  # oldest first within a level
        await asyncio.to_thread(svc.store.audit_many, who.id, "read-worklist", [(None, i.study_ref) for i in items])
        return items

    @api.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @api.get("/readyz", response_model=Health, responses={503: {"model": Health}})
    async def readyz(svc: Service) -> Any:
        """Readiness: models loaded and self-tested, admitting work, the results database and
        the outbox answering (one cheap query each) and no write failing."""
        await remember(svc)
        checks = await svc.readiness()
        ready = all(v == "ok" for v in checks.values())
        body = Health(status="ready" if ready else "not ready", queue=svc.queue_depth(), checks=checks)
        return JSONResponse(status_code=200 if ready else 503, content=body.model_dump())

    @api.get("/metrics", response_class=PlainTextResponse, dependencies=[Auth])
    async def metrics(svc: Service) -> PlainTextResponse:
        """Prometheus metrics (text exposition format)."""
        await remember(svc)
        return PlainTextResponse(svc.metrics.render().decode(), media_type="text/plain; version=0.0.4")

    api.include_router(ui_router(service, Auth))  # the reading worklist page and its endpoints
    api.include_router(orders_router(service, Auth))  # FHIR Subscription rest-hook for orders
    return api


class LazyService:
    """Starts a service once, on first use or eagerly (``await lazy()`` at process start, as
    the Serve ingress does, so that resumed jobs move without waiting for a request), inside
    the running event loop."""

    def __init__(self, factory: Callable[[], ScreeningService]) -> None:
        self._factory = factory
        self._service: ScreeningService | None = None
        self._lock: asyncio.Lock | None = None

    async def __call__(self) -> ScreeningService:
        if self._service is not None:
            return self._service
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._service is None:
                service = self._factory()
                await service.start()
                self._service = service
        return self._service

    @property
    def started(self) -> ScreeningService | None:
        return self._service
