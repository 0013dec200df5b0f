"""Prometheus metrics: request counts and latency per route and model, fits, active temperatures.

With several workers, ``calibserve serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers start, and
``/metrics`` aggregates every worker's files through prometheus-client's multiprocess collector.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from service.api.limits import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "calibserve_requests_total", "HTTP requests answered", ["method", "route", "model", "status"]
)
LATENCY = Histogram(
    "calibserve_request_duration_seconds",
    "Time from request start to response end, per route and model",
    ["method", "route", "model"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
)
FITS = Counter("calibserve_fits_total", "Calibrators fitted", ["model", "method"])
ACTIVE_TEMPERATURE = Gauge(
    "calibserve_active_temperature",
    "Temperature of the active temperature-scaling calibrator per model",
    ["model"],
    multiprocess_mode="mostrecent",
)
BATCH_REQUESTS = Histogram(
    "calibserve_predict_batch_requests",
    "Requests served by one forward pass of dynamic batching",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_ROWS = Histogram(
    "calibserve_predict_batch_rows",
    "Rows of one forward pass of dynamic batching",
    buckets=(1, 4, 16, 64, 256, 1024, 4096),
)
MODEL_FAILURES = Counter("calibserve_model_failures_total", "TorchScript inference failures", ["model"])


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus text exposition of this process, or of every worker in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (never the raw path: bounded labels)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            # a model label only for answered requests: unknown names must not grow the label set
            model = (scope.get("path_params") or {}).get("name", "") if status < 400 else ""
            method = scope.get("method", "")
            REQUESTS.labels(method, template, model, str(status)).inc()
            LATENCY.labels(method, template, model).observe(time.perf_counter() - start)
