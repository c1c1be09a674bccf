"""The FHIR R4 Subscription rest-hook endpoint for orders: ``POST /v1/fhir/notify``.

A site's FHIR server, with a Subscription (channel ``rest-hook``, payload
``application/fhir+json``) on ServiceRequest and/or ImagingStudy, posts each changed resource
(or a Bundle of them) here; an empty body is the server's handshake/heartbeat. Each order is
stored (once per resource version) before the 200, and has the same effect as an HL7 order
(``serving.online.orders``): its priority and order numbers reach the study's screening, and an
ImagingStudy ``available`` for a known study has it fetched.

The edge checks the token (scope ``integration``) and caps the body at ``api.max_json_bytes``
before this runs; a malformed notification is a typed 422 that names no value.
"""

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from models.errors import InvalidOrderMessage
from serving.online.edge import Principal
from serving.online.orders import fhir_resources_of, record_fhir
from serving.online.service import ScreeningService


class NotifyAnswer(BaseModel):
    """How many order resources the notification carried and how many were new or changed."""

    received: int
    stored: int


def orders_router(get_service: Callable[[], Awaitable[ScreeningService]], auth: Any) -> APIRouter:
    """The orders routes; ``auth`` is the API's bearer dependency (the edge checked the token)."""
    router = APIRouter()

    async def service() -> ScreeningService:
        return await get_service()

    Service = Annotated[ScreeningService, Depends(service)]
    Who = Annotated[Principal, auth]

    @router.post("/v1/fhir/notify", response_model=NotifyAnswer)
    async def notify(request: Request, svc: Service, who: Who) -> NotifyAnswer:
        """FHIR R4 Subscription rest-hook: a ServiceRequest or ImagingStudy (or a Bundle of
        them) is stored as an order before the answer; other resource types are ignored."""
        if svc.orders is None or svc.orders_settings is None:
            raise InvalidOrderMessage("orders are not configured on this service")
        body = await request.body()
        if not body.strip():
            return NotifyAnswer(received=0, stored=0)  # handshake / heartbeat
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            raise InvalidOrderMessage("body is not JSON") from None
        resources = fhir_resources_of(parsed)
        stored = await asyncio.to_thread(record_fhir, svc.orders, resources, svc.orders_settings, f"fhir-hook|{who.id}")
        await asyncio.to_thread(svc.store.audit, who.id, "order-notification")
        if stored:
            svc.on_orders(stored)
        return NotifyAnswer(received=len(resources), stored=len(stored))

    return router
