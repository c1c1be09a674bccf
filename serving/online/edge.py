"""The HTTP edge: what happens to a request before any route reads its body.

``EdgeGuard`` is a pure ASGI middleware (it sees the headers before anything calls
``receive``). In order:

1. the bearer token is checked against the configured scoped tokens; a missing or wrong token
   is answered 401 without reading a byte of the body, a token without the scope the path
   needs 403; without any configured token (dev) only loopback peers are answered;
2. a declared ``Content-Length`` above the path's cap is answered 413 without reading;
3. while the route reads, the body is counted and cut at the cap (413), so a chunked or lying
   upload cannot grow past it in memory or on disk;
4. every response gets ``Cache-Control: no-store`` (bodies carry identifiers) and basic
   security headers (nosniff, no referrer, no framing, a CSP that allows only 'self').

The caller's identity (token id and scope) goes into ``scope["state"]["principal"]`` for
routes (``request.state.principal``): the audit log and result provenance read it there.

``spool_multipart`` parses a ``multipart/form-data`` upload as it streams in and keeps its files
in memory within the service's budget, else writes them straight into a private spool folder
(0700, files 0600): no temporary file elsewhere (``serving.online.spool``).
"""

from __future__ import annotations

import hmac
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from serving.online.spool import PARTIAL_PREFIX, MemoryBudget, SpooledUpload, private_dir
from serving.settings import ApiSettings, TokenScopeValues, is_loopback

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: headers on every response
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"cache-control", b"no-store"),
    (b"pragma", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"),
)

PUBLIC_PATHS = frozenset({"/healthz", "/readyz"})
#: the worklist page's static files (no data in them; the data calls carry the token)
PUBLIC_PREFIXES = ("/ui/static/",)
PUBLIC_PAGES = frozenset({"/ui", "/ui/"})


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's id and scope (``dev`` when the API runs without tokens)."""

    id: str
    scope: TokenScopeValues


def required_scope(method: str, path: str) -> frozenset[TokenScopeValues]:
    """Scopes that may call ``method path`` (admin may call anything)."""
    admin = TokenScopeValues.ADMIN
    if method == "POST" and path in (
        "/v1/screenings",
        "/v1/screenings/upload",
        "/v1/events/stable-study",
        "/v1/fhir/notify",
    ):
        return frozenset({TokenScopeValues.INTEGRATION, admin})
    if method in ("GET", "HEAD") and path.startswith("/v1/screenings/"):
        return frozenset({TokenScopeValues.READER, TokenScopeValues.INTEGRATION, admin})
    if method in ("GET", "HEAD") and path in ("/v1/worklist", "/v1/ui/worklist", "/v1/ui/events"):
        return frozenset({TokenScopeValues.READER, admin})
    if method == "POST" and path.startswith("/v1/screenings/") and path.endswith("/feedback"):
        return frozenset({TokenScopeValues.READER, admin})
    return frozenset({admin})  # metrics, the OpenAPI document, anything new until it is classified


class BodyTooLarge(HTTPException):
    """The body passed its cap while being read (an ``HTTPException``: FastAPI re-raises it
    from body parsing instead of turning it into a 400)."""

    def __init__(self, cap: int) -> None:
        super().__init__(status_code=413, detail=f"request body larger than {cap} bytes")


class EdgeGuard:
    """Pure ASGI middleware: auth, scope and size checks on headers, security headers out."""

    def __init__(self, app: ASGIApp, settings: Callable[[], Awaitable[ApiSettings | None]]) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_secure(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        path: str = scope.get("path", "")
        method: str = scope.get("method", "GET")
        if path in PUBLIC_PATHS or (method == "GET" and (path in PUBLIC_PAGES or path.startswith(PUBLIC_PREFIXES))):
            await self.app(scope, receive, send_secure)
            return
        settings = await self.settings()
        if settings is None:  # not configured yet
            await _reply(send_secure, 503, "service starting", {"retry-after": "5"})
            return
        refusal = self._authorise(scope, settings, method, path)
        if refusal is not None:
            status, detail, headers = refusal
            await _reply(send_secure, status, detail, headers)
            return
        cap = settings.max_upload_bytes if path == "/v1/screenings/upload" else settings.max_json_bytes
        declared = _header(scope, b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _reply(send_secure, 400, "invalid Content-Length", {})
                return
            if int(declared) > cap:
                await _reply(send_secure, 413, f"request body larger than {cap} bytes", {"connection": "close"})
                return
        received = 0
        too_large = False

        async def counted() -> Message:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > cap:
                    too_large = True
                    raise BodyTooLarge(cap)
            return message

        try:
            await self.app(scope, counted, send_secure)
        except BaseException:
            # the cap may surface wrapped (an ExceptionGroup from a middleware's task group)
            if not too_large or started:
                raise
            await _reply(send_secure, 413, f"request body larger than {cap} bytes", {"connection": "close"})

    def _authorise(
        self, scope: Scope, settings: ApiSettings, method: str, path: str
    ) -> tuple[int, str, dict[str, str]] | None:
        state = scope.setdefault("state", {})
        if not settings.tokens:
            client = scope.get("client")
            if client is None or not is_loopback(str(client[0])):
                # dev mode without tokens answers this machine only, whatever the bind address
                return 403, "API without tokens answers loopback clients only", {}
            state["principal"] = Principal("dev", TokenScopeValues.ADMIN)
            return None
        header = _header(scope, b"authorization") or ""
        scheme, _, presented = header.partition(" ")
        presented = presented.strip()
        match = None
        if scheme.lower() == "bearer" and presented:
            for token in settings.tokens:  # compare with every token: time does not tell which matched
                if hmac.compare_digest(presented.encode(), token.secret.get_secret_value().encode()):
                    match = token
        if match is None:
            return 401, "missing or invalid bearer token", {"www-authenticate": "Bearer"}
        if match.scope not in required_scope(method, path):
            return 403, f"token scope '{match.scope.value}' may not call this endpoint", {}
        state["principal"] = Principal(match.id, match.scope)
        return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


async def _reply(send: Send, status: int, detail: str, headers: dict[str, str]) -> None:
    """A JSON error answered from the edge, without reading the request body."""
    body = ('{"detail": "' + detail.replace('"', "'") + '"}').encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class UploadError(HTTPException):
    """A multipart upload that cannot be a study's instances (the reason, never its content)."""

    def __init__(self, detail: str, status_code: int = 422) -> None:
        super().__init__(status_code=status_code, detail=detail)


async def spool_multipart(
    content_type: str,
    chunks: AsyncIterator[bytes],
    spool_dir: Path,
    field: str,
    max_files: int,
    budget: MemoryBudget | None = None,
) -> SpooledUpload:
    """Receive the ``field`` parts of a multipart body as they stream in: in memory while they
    fit ``budget``, from then on in a new private folder under ``spool_dir`` (renamed from its
    partial name once complete). Anything that goes wrong lets everything received go."""
    kind, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        raise UploadError("expected multipart/form-data with a boundary", status_code=415)
    upload = SpooledUpload(budget=budget)
    memory: list[bytearray] = []  # the parts while in memory
    partial = spool_dir / f"{PARTIAL_PREFIX}{uuid.uuid4().hex}"
    state: dict[str, Any] = {"count": 0, "fd": None, "field": b"", "value": b"", "headers": {}, "on_disk": False}
    state["open"] = False  # inside a part of ``field``
    errors: list[str] = []

    def to_disk() -> None:
        """The budget is spent: what came so far goes into the folder, the rest follows it."""
        private_dir(spool_dir)
        private_dir(partial)
        for i, part in enumerate(memory):
            fd = os.open(partial / f"{i:05d}.dcm", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, part)
            finally:
                if i < len(memory) - 1 or not state["open"]:
                    os.close(fd)
                else:
                    state["fd"] = fd  # the part still streaming in goes on in its file
        memory.clear()
        upload.discard()  # hands back what the parts held
        state["on_disk"] = True

    def on_part_begin() -> None:
        state["headers"] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(state["headers"].get(b"content-disposition", b""))
        if disposition.get(b"name") != field.encode() or b"filename" not in disposition:
            return  # other form fields are ignored (query parameters carry the options)
        if state["count"] >= max_files:
            errors.append(f"more than {max_files} files")
            return
        if state["on_disk"]:
            path = partial / f"{state['count']:05d}.dcm"
            state["fd"] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        else:
            memory.append(bytearray())
        state["count"] += 1
        state["open"] = True

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if not state["open"]:
            return
        if not state["on_disk"]:
            if budget is not None and budget.take(end - start):
                upload.held += end - start
                memory[-1] += data[start:end]
                return
            to_disk()
        _write_all(state["fd"], data[start:end])

    def on_part_end() -> None:
        state["open"] = False
        if state["fd"] is not None:
            os.close(state["fd"])
            state["fd"] = None

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
    )
    try:
        async for chunk in chunks:
            parser.write(chunk)
            if errors:
                raise UploadError(errors[0], status_code=413)
        parser.finalize()
        if state["open"]:
            raise UploadError("multipart body ended inside a part")
        if state["count"] == 0:
            raise UploadError(f"no files in the '{field}' field")
    except HTTPException:
        _discard(state, partial, upload)
        raise
    except MultipartParseError:
        _discard(state, partial, upload)
        raise UploadError("malformed multipart body") from None
    except BaseException:
        _discard(state, partial, upload)
        raise
    if not state["on_disk"]:
        upload.parts = [bytes(part) for part in memory]
        return upload
    final = spool_dir / partial.name.removeprefix(PARTIAL_PREFIX)
    os.rename(partial, final)
    upload.folder = final
    return upload


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _discard(state: dict[str, Any], partial: Path, upload: SpooledUpload) -> None:
    if state["fd"] is not None:
        os.close(state["fd"])
        state["fd"] = None
    shutil.rmtree(partial, ignore_errors=True)
    upload.discard()
