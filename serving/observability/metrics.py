"""Prometheus metrics of the service (one registry per service instance; labels carry no PHI)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServiceMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("dxassist_http_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.screenings = Counter("dxassist_screenings", "Finished screenings", ["outcome", "priority"], registry=r)
        self.rejected = Counter("dxassist_admission_rejected", "Requests refused: queue full", ["priority"], registry=r)
        self.stage_seconds = Histogram(
            "dxassist_stage_seconds", "Time per stage", ["stage"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "dxassist_model_batch_size", "Images per model batch", ["model"], buckets=(1, 2, 3, 4, 6, 8, 16), registry=r
        )
        self.queue_depth = Gauge("dxassist_queue_depth", "Queued screening requests", ["priority"], registry=r)
        self.triggers = Counter("dxassist_triggers", "Automatic study triggers", ["trigger", "action"], registry=r)
        self.model_info = Gauge(
            "dxassist_model_info", "Loaded models (1 = loaded)", ["model", "version", "provider"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
