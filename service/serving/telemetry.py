"""Prometheus series of the use cases: fits, active temperatures, model failures, dynamic batches.

The HTTP request counters and latency histograms belong to the protocol layer
(:mod:`service.api.observability`); the series here are counted by the data plane, whichever protocol
called it. With several workers, ``calibserve serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers
start and :func:`render_metrics` aggregates every worker's files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily

# No `<counter>_created` samples: they double every per-model counter's lines (megabytes at thousands of
# models), and Prometheus does not need them to compute rates.
disable_created_metrics()

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
OUTCOMES = Counter("calibserve_monitoring_outcomes", "Labelled outcomes counted (each id once)", ["model"])
PREDICTION_LOG_ROWS = Counter(
    "calibserve_prediction_log_rows", "Served rows queued for the prediction log", ["model"]
)
MONITORING_SERIES = {
    "ece": "Top-label ECE (15 equal-width bins) of the window's labelled outcomes",
    "mce": "Largest bin gap of the window's labelled outcomes",
    "brier": "Brier score of the window's labelled outcomes",
    "nll": "Negative log-likelihood of the window's labelled outcomes",
    "accuracy": "Accuracy of the window's labelled outcomes",
    "expected_accuracy": "Accuracy implied by the calibrated confidences of the window's predictions (CBPE)",
    "window_outcomes": "Labelled outcomes in the window",
    "window_predictions": "Logged predictions in the window",
    "drift": "1 when the window breaks the drift rules against the active calibrator's fit-time figures",
    "too_few_outcomes": "1 when the window has fewer outcomes than the minimum to judge",
    "confidence_psi": "Population stability index of top-label confidence against the fit data",
    "confidence_ks": "Kolmogorov-Smirnov statistic of top-label confidence against the fit data",
}
MODEL_FAILURES = Counter(
    "calibserve_model_failures_total", "TorchScript model failures (raised, NaN or wrong shape)", ["model"]
)


def publish_active(name: str, document: dict[str, Any] | None) -> None:
    """Show the active temperature of ``name`` (temperature scaling only)."""
    if document is not None and document.get("method") == "temperature":
        ACTIVE_TEMPERATURE.labels(name).set(float(document["temperature"]))


class MonitoringCollector:
    """The monitoring gauges (``calibserve_monitoring_<series>{model,window}``), read at scrape time from the
    monitoring database that every worker and replica shares, so any worker's answer is the whole truth."""

    def __init__(self, gauges: Callable[[], list[tuple[str, str, str, float]]]) -> None:
        self.gauges = gauges

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            name: GaugeMetricFamily(f"calibserve_monitoring_{name}", text, labels=["model", "window"])
            for name, text in MONITORING_SERIES.items()
        }
        for name, model, window, value in self.gauges():
            families[name].add_metric([model, window], value)
        yield from families.values()


def render_metrics(*collectors: Any) -> tuple[bytes, str]:
    """The Prometheus text exposition of this process, or of every worker in multiprocess mode, followed by
    that of ``collectors`` (read at scrape time)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = generate_latest(registry)
    else:
        body = generate_latest()
    if collectors:
        extra = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            extra.register(collector)
        body += generate_latest(extra)
    return body, CONTENT_TYPE_LATEST
