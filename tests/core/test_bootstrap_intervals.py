"""Bias-corrected bootstrap intervals of ECE-like figures (issue #15).

Resampled ECEs sit mostly above the estimate (each bin adds |gap|, and resampling noise only makes it larger):
on real data after temperature scaling only 1.5-2.4 % of resamples fell below it, and the percentile interval
excluded the estimate in 2 of 14 cases. ECE, MCE and the two parts of ECE get the basic (bias-corrected)
bootstrap interval by default, BCa on request: both checked against ``scipy.stats.bootstrap`` given the same
resamples, and by simulation against a known population ECE, which chose the default.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from service import workflows
from service.core import metrics

DATA_SETS = ["netcal_wrn16-4_c10.npz", "kumar_vgg16_c10.npz", "netcal_lenet5_c10.npz"]


def binary_scores(n: int, slope: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-label confidences c ~ U(0.5, 1) with accuracy c - slope (c - 0.5): over-confident, more so at the
    top. The population ECE of 15 equal-width bins is sum_b w_b slope (mid_b - 0.5), exactly."""
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.5, 1.0, n)
    labels = (rng.uniform(size=n) < confidence - slope * (confidence - 0.5)).astype(int)
    return np.stack([1.0 - confidence, confidence], axis=1), labels


def population_ece(slope: float, n_bins: int = 15) -> float:
    edges = np.arange(n_bins + 1) / n_bins
    low, high = np.maximum(edges[:-1], 0.5), edges[1:]
    weight = np.clip(high - low, 0.0, None) / 0.5
    return float(np.sum(weight * slope * ((low + high) / 2 - 0.5)))


@pytest.mark.parametrize("method", ["bca", "basic", "percentile"])
@pytest.mark.parametrize(
    ("metric", "kwargs"),
    [
        (metrics.expected_calibration_error, {}),
        (metrics.expected_calibration_error, {"binning": "mass", "n_bins": 10}),
        (metrics.maximum_calibration_error, {}),
        (metrics.brier_score, {}),
    ],
)
def test_intervals_are_scipys_given_the_same_resamples(metric, kwargs, method):
    """Up to 200 rows BCa's jackknife is leave-one-out, as scipy's: the same resamples give the same interval."""
    probabilities, labels = binary_scores(150, 0.3, seed=1)
    n_resamples, seed = 400, 7
    ours = metrics.bootstrap_interval(
        metric, probabilities, labels, n_resamples=n_resamples, seed=seed, method=method, **kwargs
    )
    # the same resamples (the bootstrap draws them first, from default_rng(seed))
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, 150, 150) for _ in range(n_resamples)]
    distribution = np.array([metric(probabilities[rows], labels[rows], **kwargs) for rows in draws])

    class Previous:
        bootstrap_distribution = distribution

    theirs = stats.bootstrap(
        (np.arange(150),),
        lambda rows: metric(probabilities[rows.astype(int)], labels[rows.astype(int)], **kwargs),
        vectorized=False,
        n_resamples=0,
        bootstrap_result=Previous,
        method={"bca": "BCa"}.get(method, method),
        confidence_level=0.95,
    ).confidence_interval
    # the basic interval's lower bound is raised to 0 (these figures are never negative); scipy's is not
    expected = (max(theirs.low, 0.0) if method == "basic" else theirs.low, theirs.high)
    assert tuple(ours) == pytest.approx(expected, rel=1e-10, abs=1e-14)


def test_the_default_interval_is_bias_corrected_for_ece_like_figures_only():
    probabilities, labels = binary_scores(400, 0.2, seed=2)
    for metric in (metrics.expected_calibration_error, metrics.maximum_calibration_error):
        assert metrics.default_interval_method(metric) == "basic"
        default = metrics.bootstrap_interval(metric, probabilities, labels, n_resamples=100)
        assert default == metrics.bootstrap_interval(
            metric, probabilities, labels, n_resamples=100, method="basic"
        )
    for metric in (metrics.brier_score, metrics.negative_log_likelihood, metrics.accuracy):
        assert metrics.default_interval_method(metric) == "percentile"
    report = workflows.evaluate(probabilities, labels, from_logits=False, bootstrap=50)
    bootstrap = report["conventions"]["bootstrap"]
    assert bootstrap["interval"] == {
        "ece": "basic",
        "mce": "basic",
        "brier": "percentile",
        "nll": "percentile",
        "accuracy": "percentile",
    }
    assert bootstrap["methods"]["basic"].startswith("bias-corrected")
    assert report["intervals"]["uncalibrated"]["ece"] == list(
        metrics.bootstrap_interval(
            metrics.expected_calibration_error, probabilities, labels, n_resamples=50, seed=0
        )
    )


def coverage(n: int, slope: float, methods: tuple[str, ...]) -> dict[str, int]:
    """Of 100 seeded data sets, how many 90 % intervals (300 resamples) hold the population ECE."""
    truth = population_ece(slope)
    covered = dict.fromkeys(methods, 0)
    for seed in range(100):
        probabilities, labels = binary_scores(n, slope, seed)
        for method in methods:
            low, high = metrics.bootstrap_interval(
                metrics.expected_calibration_error,
                probabilities,
                labels,
                n_resamples=300,
                seed=seed,
                confidence=0.9,
                method=method,
            )
            covered[method] += low <= truth <= high
    return covered


@pytest.mark.parametrize(
    ("n", "slope", "measured"),
    [
        # population ECE 0.05, bin gaps growing from 0 to 0.1
        (1000, 0.2, {"basic": 82, "percentile": 58}),
        # nearly calibrated: population ECE 0.0125, gaps from 0 to 0.025 (the regime after temperature
        # scaling, where resampled ECEs sit furthest above the estimate compared to their spread)
        (5000, 0.05, {"basic": 85, "percentile": 15}),
    ],
)
def test_the_bias_corrected_interval_covers_the_population_ece(n, slope, measured):
    """100 seeded data sets, 300 resamples each, 90 % intervals: the default (basic) interval covers the
    population ECE near the nominal rate (binomial sd 3), the percentile interval far less often (it misses
    on one side only: it sits above the truth). BCa, measured in the same settings: 73 and 68."""
    covered = coverage(n, slope, ("basic", "percentile"))
    assert covered["basic"] >= 80
    assert covered["basic"] >= covered["percentile"] + 20
    assert covered == measured  # seeded: the figures the docstrings quote


@pytest.mark.parametrize("name", DATA_SETS)
def test_bias_corrected_intervals_reach_below_the_estimate_on_real_data(reference_data, name):
    """Real classifiers (tests/data), temperature fitted on the validation half, evaluated on the test half:
    where the percentile interval of ECE lies wholly above the estimate (WRN-16-4 after temperature
    scaling), the default interval does not; it reaches below the estimate everywhere, as an upward bias
    asks."""
    data = reference_data(name)
    document = workflows.fit_document(data["logits_val"], data["labels_val"])
    report = workflows.evaluate(
        data["logits_test"][:5000], data["labels_test"][:5000], calibrator_document=document, bootstrap=300
    )
    for group in ("uncalibrated", "calibrated"):
        for figure in ("ece", "mce"):
            low, high = report["intervals"][group][figure]
            assert 0.0 <= low <= report[group][figure], (group, figure)
            assert low < high


def test_bca_with_a_grouped_jackknife_and_weights():
    """Beyond 200 rows the acceleration comes from 200 groups; weights are honoured (rows of weight 0 add
    nothing), and the interval is the same as resampling rows through a wrapped metric."""
    probabilities, labels = binary_scores(600, 0.2, seed=4)
    weights = np.where(np.arange(600) % 3 == 0, 0.0, 1.0)

    def wrapped(p, y, **kw):
        return metrics.expected_calibration_error(p, y, **kw)

    fast = metrics.bootstrap_interval(
        metrics.expected_calibration_error,
        probabilities,
        labels,
        sample_weight=weights,
        n_resamples=60,
        method="bca",
    )
    slow = metrics.bootstrap_interval(
        wrapped, probabilities, labels, sample_weight=weights, n_resamples=60, method="bca"
    )
    assert fast == pytest.approx(slow, abs=1e-12)
    assert (
        fast.low
        < metrics.expected_calibration_error(probabilities, labels, sample_weight=weights)
        < fast.high
    )


def test_an_unknown_interval_method_is_refused():
    probabilities, labels = binary_scores(50, 0.2, seed=5)
    with pytest.raises(metrics.InvalidInput, match="method"):
        metrics.bootstrap_interval(metrics.accuracy, probabilities, labels, method="studentized")
