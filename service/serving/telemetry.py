"""Prometheus series of the use cases: fits, active temperatures, model failures, dynamic batches.

The HTTP request counters and latency histograms belong to the protocol layer
(:mod:`service.api.observability`); the series here are counted by the data plane, whichever protocol
called it. With several workers, ``calibserve serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the workers
start and :func:`render_metrics` aggregates every worker's files.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

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
UPSTREAM_BATCH_REQUESTS = Histogram(
    "calibserve_upstream_batch_requests",
    "Inference requests of an upstream model served by one upstream call",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
UPSTREAM_BATCH_ROWS = Histogram(
    "calibserve_upstream_batch_rows",
    "Rows of one upstream inference call",
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
    # (a multi-label model's "temperature" method has one temperature per label: no single gauge)
    if document is not None and document.get("method") == "temperature" and "temperature" in document:
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

    def exposition(self) -> bytes:
        """What :func:`exposition` writes of :meth:`collect`, byte for byte (``tests/test_telemetry.py``),
        written directly: at 2,000 models these are half of a scrape's samples, and building a metric family
        sample by sample took as long as the rest of the scrape."""
        lines: dict[str, list[str]] = {name: [] for name in MONITORING_SERIES}
        for name, model, window, value in self.gauges():
            labels = f'{{model="{_label_value(model)}",window="{_label_value(window)}"}}'
            lines[name].append(f"calibserve_monitoring_{name}{labels} {floatToGoString(value)}\n")
        output = []
        for name, text in MONITORING_SERIES.items():
            metric = _metric_name(f"calibserve_monitoring_{name}")
            output.append(f"# HELP {metric} {_help(text)}\n# TYPE {metric} gauge\n")
            output += lines[name]
        return "".join(output).encode("utf-8")


@functools.lru_cache(maxsize=4096)
def _metric_name(name: str) -> str:
    return openmetrics.escape_metric_name(name, openmetrics.UNDERSCORES)


@functools.lru_cache(maxsize=256)
def _label_name(name: str) -> str:
    return openmetrics.escape_label_name(name, openmetrics.UNDERSCORES)


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _help(documentation: str) -> str:
    return documentation.replace("\\", r"\\").replace("\n", r"\n")


def _sample_line(sample: Sample) -> str:
    labels = sample.labels
    text = (
        "{" + ",".join([f'{_label_name(k)}="{_label_value(v)}"' for k, v in sorted(labels.items())]) + "}"
        if labels
        else ""
    )
    timestamp = "" if sample.timestamp is None else f" {int(float(sample.timestamp) * 1000):d}"
    return f"{_metric_name(sample.name)}{text} {floatToGoString(sample.value)}{timestamp}\n"


_PROMETHEUS_TYPES = {
    "info": "gauge",
    "stateset": "gauge",
    "gaugehistogram": "histogram",
    "unknown": "untyped",
}
_OPENMETRICS_SUFFIXES = ("_created", "_gsum", "_gcount")


def exposition(registry: Any = REGISTRY) -> bytes:
    """The Prometheus text format (0.0.4) of ``registry``: byte for byte what
    :func:`prometheus_client.generate_latest` writes (``tests/test_telemetry.py`` compares them), at about a
    third of its time.

    ``generate_latest`` checks and escapes every label and metric name of every sample; at 2,000 models that
    was half of a 100 ms scrape (``bench/bench_monitoring.py``). The names repeat, so they are escaped once
    (cached) here; label values are escaped per sample, as there.
    """
    output: list[str] = []
    for metric in registry.collect():
        name = metric.name
        kind = metric.type
        if kind == "counter":
            name += "_total"
        elif kind == "info":
            name += "_info"
        kind = _PROMETHEUS_TYPES.get(kind, kind)
        documentation = _help(metric.documentation)
        output.append(f"# HELP {_metric_name(name)} {documentation}\n# TYPE {_metric_name(name)} {kind}\n")
        openmetrics_samples: dict[str, list[str]] = {}
        for sample in metric.samples:
            if (
                sample.name.startswith(metric.name)
                and sample.name[len(metric.name) :] in _OPENMETRICS_SUFFIXES
            ):
                openmetrics_samples.setdefault(sample.name[len(metric.name) :], []).append(
                    _sample_line(sample)
                )
            else:
                output.append(_sample_line(sample))
        for suffix, lines in sorted(openmetrics_samples.items()):
            output.append(
                f"# HELP {_metric_name(metric.name + suffix)} {documentation}\n"
                f"# TYPE {_metric_name(metric.name + suffix)} gauge\n"
            )
            output.extend(lines)
    return "".join(output).encode("utf-8")


def render_metrics(*collectors: MonitoringCollector) -> tuple[bytes, str]:
    """The Prometheus text exposition of this process, or of every worker in multiprocess mode, followed by
    that of ``collectors`` (read at scrape time)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        body = exposition(registry)
    else:
        body = exposition()
    return body + b"".join(collector.exposition() for collector in collectors), CONTENT_TYPE_LATEST
