"""HTTP request counts per route template and model, latency per route (and per model where asked for),
counted by an ASGI middleware.

The series of the use cases (fits, active temperatures, model failures, batches) live in
:mod:`service.serving.telemetry`, which also renders ``/metrics``.
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Histogram

from service.api.limits import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "calibserve_requests_total", "HTTP requests answered", ["method", "route", "model", "status"]
)
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)
# Per route only: a histogram per model and route is 15 series a pair, megabytes at thousands of models.
LATENCY = Histogram(
    "calibserve_request_duration_seconds",
    "Time from request start to response end, per route",
    ["method", "route"],
    buckets=BUCKETS,
)
MODEL_LATENCY = Histogram(
    "calibserve_model_request_duration_seconds",
    "Time from request start to response end, per route and model, for the models of "
    "CALIBSERVE_METRICS_MODEL_LATENCY",
    ["method", "route", "model"],
    buckets=BUCKETS,
)


class MetricsMiddleware:
    """Counts and times every HTTP request by its route template (never the raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, latency_models: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.latency_models = latency_models

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
            elapsed = time.perf_counter() - start
            REQUESTS.labels(method, template, model, str(status)).inc()
            LATENCY.labels(method, template).observe(elapsed)
            if model and model in self.latency_models:
                MODEL_LATENCY.labels(method, template, model).observe(elapsed)
