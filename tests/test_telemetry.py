"""The ``/metrics`` text: calibserve's writer against prometheus_client's, and the monitoring figures of a
scrape (all models at once) against those of one model's report."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    Summary,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeHistogramMetricFamily,
    GaugeMetricFamily,
    Metric,
    UnknownMetricFamily,
)

from service.core import monitoring as stats
from service.serving.telemetry import MONITORING_SERIES, MonitoringCollector, exposition

LABEL_VALUES = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12
) | st.sampled_from(['a"b', "back\\slash", "new\nline", "", "ü", "\\n"])
VALUES = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(2**60), 2**60).map(float)


class Fixed:
    """A collector of given metric families (what a custom collector or the multiprocess collector yields)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def assert_same_text(registry: CollectorRegistry) -> None:
    assert exposition(registry) == generate_latest(registry)


def test_the_writer_matches_prometheus_client_on_every_metric_type():
    registry = CollectorRegistry()
    requests = Counter(
        "requests", "Requests \\ with a\nnewline in help", ["model", "route"], registry=registry
    )
    requests.labels('m"1', "/v1/models/{name}/calibrate").inc(3)
    requests.labels("back\\slash", "line\nbreak").inc()
    latency = Histogram("latency_seconds", "Latency", ["route"], registry=registry)
    for value in (0.0004, 0.3, 7.0, 1e9):
        latency.labels("/v2").observe(value)
    Gauge("temperature", "T", ["model"], registry=registry).labels("ü").set(float("nan"))
    Gauge("infinite", "inf", registry=registry).set(float("-inf"))
    Info("build", "Build", registry=registry).info({"version": "1.2", "commit": "abc"})
    Enum("state", "State", states=["ok", "drift"], registry=registry).state("drift")
    Summary("size_bytes", "Size", registry=registry).observe(1.5e7)
    created = CounterMetricFamily("fits", "Fits", labels=["model"], created=1_700_000_000.25)
    created.add_metric(["m"], 2.0, created=1_700_000_001.5, timestamp=1_700_000_002.125)
    histogram = GaugeHistogramMetricFamily(
        "queue", "Queue", buckets=[("1.0", 2.0), ("+Inf", 3.0)], gsum_value=4.0
    )
    untyped = UnknownMetricFamily("legacy", "Legacy", labels=["a"])
    untyped.add_metric(["x"], 123456789.0)
    registry.register(Fixed([created, histogram, untyped]))
    assert_same_text(registry)


@settings(max_examples=150, deadline=None)
@given(
    samples=st.lists(st.tuples(LABEL_VALUES, LABEL_VALUES, VALUES), max_size=12),
    label=st.sampled_from(["model", "le_ish", "ùnicode", "9starts_with_digit", "with space"]),
    name=st.sampled_from(["calibserve_x", "has.dot", "ünï", "7up"]),
)
def test_the_writer_matches_prometheus_client_on_any_labels_and_values(samples, label, name):
    family = GaugeMetricFamily(name, "help", labels=[label, "window"])
    for first, second, value in samples:
        family.add_metric([first, second], value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Fixed([family]))
    assert_same_text(registry)


@settings(max_examples=150, deadline=None)
@given(
    gauges=st.lists(
        st.tuples(st.sampled_from(sorted(MONITORING_SERIES)), LABEL_VALUES, LABEL_VALUES, VALUES), max_size=30
    )
)
def test_the_monitoring_gauges_written_directly_are_what_their_metric_families_give(gauges):
    collector = MonitoringCollector(lambda: gauges)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    assert collector.exposition() == generate_latest(registry)


def random_sums(rng: np.random.Generator, *, empty: bool) -> stats.BinSums:
    if empty:
        return stats.BinSums.empty()
    n, k = int(rng.integers(1, 400)), 10
    logits = rng.normal(0, 3, size=(n, k))
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    labels = rng.integers(0, k, size=n)
    if rng.random() < 0.3:  # a true class of probability 0: an infinite NLL
        probabilities[0] = np.eye(k)[(labels[0] + 1) % k]
    return stats.BinSums.of_rows(stats.row_statistics(probabilities, labels))


def test_the_summary_of_stacked_sums_is_that_of_each_alone():
    rng = np.random.default_rng(5)
    items = [random_sums(rng, empty=i % 5 == 0) for i in range(40)]
    together = stats.BinSums.stack(items).summary()
    for i, sums in enumerate(items):
        alone = sums.summary()
        for name in ("n", *stats.BinSums.SUMMARY):
            assert np.array_equal(together[name][i], alone[name], equal_nan=True), name


def test_the_summary_is_the_per_bin_formulas():
    sums = random_sums(np.random.default_rng(6), empty=False)
    summary = sums.summary()
    n = sums.n.sum()
    gaps = sums.confidence - sums.correct
    filled = sums.n > 0
    assert summary["n"] == n
    assert summary["ece"] == pytest.approx(np.abs(gaps).sum() / n, rel=1e-12)
    assert summary["mce"] == pytest.approx(np.max(np.abs(gaps[filled]) / sums.n[filled]), rel=1e-12)
    assert summary["overconfidence"] - summary["underconfidence"] == pytest.approx(gaps.sum() / n, abs=1e-12)
    empty = stats.BinSums.empty().summary()
    assert empty["n"] == 0 and all(math.isnan(empty[name]) for name in stats.BinSums.SUMMARY)


def test_psi_and_ks_along_rows_are_those_of_each_row_and_nan_where_a_histogram_is_empty():
    rng = np.random.default_rng(7)
    expected = rng.integers(0, 50, size=(6, stats.CONFIDENCE_BINS)).astype(float)
    actual = rng.integers(0, 50, size=(6, stats.CONFIDENCE_BINS)).astype(float)
    expected[2] = 0
    actual[4] = 0
    psi = stats.population_stability_index(expected, actual)
    ks = stats.kolmogorov_smirnov(expected, actual)
    for i in range(6):
        if i in (2, 4):
            assert math.isnan(psi[i]) and math.isnan(ks[i])
            continue
        e, a = expected[i] / expected[i].sum(), actual[i] / actual[i].sum()
        e, a = np.maximum(e, stats.PSI_EPSILON), np.maximum(a, stats.PSI_EPSILON)
        assert psi[i] == pytest.approx(np.sum((a - e) * np.log(a / e)), rel=1e-12)
        gap = np.cumsum(expected[i]) / expected[i].sum() - np.cumsum(actual[i]) / actual[i].sum()
        assert ks[i] == pytest.approx(np.max(np.abs(gap)), rel=1e-12)
