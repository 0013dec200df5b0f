"""Prometheus series of the use cases: fits, active temperatures, model failures, dynamic batches.

The HTTP request counters and latency histograms belong to the protocol layer
(:mod:`service.api.observability`); the series here are counted by the data plane, whichever protocol
called it. With several workers, ``calibserve serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers
start and :func:`render_metrics` aggregates every worker's files.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
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
WORK_STOPPED = Counter(
    "calibserve_work_stopped_total",
    "Fits, evaluations and figures stopped before their end (reason: timeout, or cancelled: nobody waited)",
    ["reason"],
)
MODEL_FAILURES = Counter(
    "calibserve_model_failures_total", "TorchScript model failures (raised, NaN or wrong shape)", ["model"]
)


def publish_active(name: str, document: dict[str, Any] | None) -> None:
    """Show the active temperature of ``name`` (temperature scaling only)."""
    if document is not None and document.get("method") == "temperature":
        ACTIVE_TEMPERATURE.labels(name).set(float(document["temperature"]))


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus text exposition of this process, or of every worker in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
