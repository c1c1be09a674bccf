"""Delivery of committed results: the ``Sink`` protocol and the worker that drains the outbox.

The worker claims due rows from ``serving.persistence.outbox.Outbox``, loads each result with its
evidence, and hands it to the sink named on the row. A retryable failure (``DeliveryFailed``)
backs off; ``DeliveryRejected`` dead-letters the row; a bug in one sink never stops the others.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Protocol

from pydicom.dataset import Dataset

from models.errors import DeliveryFailed, DeliveryRejected
from models.results import ScreeningResult
from serving.persistence.outbox import Outbox

logger = logging.getLogger(__name__)


class Sink(Protocol):
    """Delivers one result; raises ``DeliveryFailed`` (retry) or ``DeliveryRejected``."""

    name: str

    def deliver(self, delivery_id: int, result: ScreeningResult, evidence: list[Dataset]) -> None: ...


class ResultLoader(Protocol):
    def __call__(self, screening_id: int) -> tuple[ScreeningResult, list[Dataset]] | None: ...


class OutboxWorker:
    """Delivers due rows through the configured sinks (call ``run_once`` from a loop or thread)."""

    def __init__(self, outbox: Outbox, sinks: Mapping[str, Sink], load: ResultLoader) -> None:
        self.outbox = outbox
        self.sinks = dict(sinks)
        self.load = load

    def run_once(self) -> int:
        """Attempt every due delivery once; returns how many were delivered. The rows not yet
        sent have their lease renewed every third of it (a slow receiver does not let another
        worker take rows this one is about to send)."""
        delivered = 0
        claimed = self.outbox.claim()
        renewed_at = time.monotonic()
        for index, (delivery_id, screening_id, sink_name, attempts) in enumerate(claimed):
            if time.monotonic() - renewed_at > self.outbox.lease_s / 3:
                self.outbox.renew([row[0] for row in claimed[index:]])
                renewed_at = time.monotonic()
            sink = self.sinks.get(sink_name)
            attempt = attempts + 1
            if sink is None:
                self.outbox.mark(delivery_id, sink_name, attempt, "RETRY", "sink not configured")
                continue
            loaded = self.load(screening_id)
            if loaded is None:
                self.outbox.mark(delivery_id, sink_name, attempt, "DEAD", "result missing")
                continue
            result, evidence = loaded
            try:
                sink.deliver(delivery_id, result, evidence)
            except DeliveryRejected as exc:
                self.outbox.mark(delivery_id, sink_name, attempt, "DEAD", str(exc))
                logger.warning(
                    "delivery refused, dead-lettered", extra={"study_ref": result.study_ref, "stage": sink_name}
                )
            except DeliveryFailed as exc:
                self.outbox.mark(delivery_id, sink_name, attempt, "RETRY", str(exc))
            except Exception as exc:  # a bug in a sink must not stop the others
                self.outbox.mark(delivery_id, sink_name, attempt, "RETRY", type(exc).__name__)
                logger.error("sink raised unexpectedly (%s)", type(exc).__name__, extra={"stage": sink_name})
            else:
                self.outbox.mark(delivery_id, sink_name, attempt, "DELIVERED")
                delivered += 1
        return delivered
