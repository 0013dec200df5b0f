"""Statistical calibration tests: differential against MAPIE and scikit-learn, closed forms, null properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mapie.metrics import calibration as mapie_calibration
from scipy import stats
from sklearn.linear_model import LogisticRegression

from service.core import calibration_tests as ct
from service.core.metrics import calibration_report
from service.core.probability import softmax
from service.errors import InvalidInput
from tests.helpers.data import CIFAR10, load_arrays

# MAPIE jitters the scores (relative noise 1e-8, seeded) before sorting them and sums the jittered scores; we
# sort the scores as given. Its public statistics therefore differ from ours by the jitter's effect (measured:
# ~2e-9 relative), the noise-free composition of its own building blocks by rounding only.
JITTER_RTOL = 1e-7


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _cifar_top_label(temperature: float) -> tuple[np.ndarray, np.ndarray]:
    arrays = load_arrays(CIFAR10)
    probabilities = softmax(arrays["logits_test"].astype(np.float64) / temperature)
    confidences = probabilities.max(axis=1)
    outcomes = (probabilities.argmax(axis=1) == arrays["labels_test"]).astype(np.float64)
    return confidences, outcomes


# ------------------------------------------------------------------------- differential: MAPIE on CIFAR-10


@pytest.mark.parametrize("temperature", [1.0, 1.5, 2.0, 2.5])
def test_cumulative_statistics_match_mapie_on_cifar10(temperature):
    c, o = _cifar_top_label(temperature)
    ours = ct.cumulative_calibration_tests(c, o)
    # MAPIE's own definitions, composed without its jitter: equal to rounding
    differences = mapie_calibration.cumulative_differences(o, c, noise_amplitude=0.0)
    sigma = mapie_calibration.length_scale(c)
    ks = np.max(np.abs(differences)) / sigma
    kuiper = (np.max(differences) - np.min(differences)) / sigma
    assert ours["ks_calibration"] == pytest.approx(ks, rel=1e-9)
    assert ours["kuiper_calibration"] == pytest.approx(kuiper, rel=1e-9)
    # MAPIE's p-values are 1 - CDF: exact to ~1e-16 absolute where they are not tiny
    if ks < 5:
        assert ours["ks_calibration_p"] == pytest.approx(
            1 - mapie_calibration.kolmogorov_smirnov_cdf(ks), rel=1e-9, abs=1e-15
        )
        assert ours["kuiper_calibration_p"] == pytest.approx(
            1 - mapie_calibration.kuiper_cdf(kuiper), rel=1e-9, abs=1e-15
        )
    # MAPIE's public functions, jitter included
    assert ours["ks_calibration"] == pytest.approx(
        mapie_calibration.kolmogorov_smirnov_statistic(o, c), rel=JITTER_RTOL
    )
    assert ours["kuiper_calibration"] == pytest.approx(
        mapie_calibration.kuiper_statistic(o, c), rel=JITTER_RTOL
    )
    if ks < 5:
        assert ours["ks_calibration_p"] == pytest.approx(
            mapie_calibration.kolmogorov_smirnov_p_value(o, c), rel=1e-6
        )
        assert ours["kuiper_calibration_p"] == pytest.approx(mapie_calibration.kuiper_p_value(o, c), rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_spiegelhalter_matches_mapie_on_cifar10(temperature):
    c, o = _cifar_top_label(temperature)
    z, p = ct.spiegelhalter(c, o)
    assert z == pytest.approx(mapie_calibration.spiegelhalter_statistic(o, c), rel=1e-12)
    one_sided = mapie_calibration.spiegelhalter_p_value(o, c)  # MAPIE: 1 - Phi(z)
    assert p == pytest.approx(2 * min(one_sided, 1 - one_sided), rel=1e-9, abs=1e-15)
    assert p == pytest.approx(2 * stats.norm.sf(abs(z)), rel=1e-12)


def test_mapie_doctest_examples():
    """The examples of MAPIE's docstrings (rounded there to 3 or 4 digits)."""
    o = np.array([0, 1, 0, 1, 0])
    c = np.array([0.1, 0.9, 0.21, 0.9, 0.5])
    figures = ct.cumulative_calibration_tests(c, o)
    # by hand: sorted differences -0.1, -0.21, -0.5, 0.1, 0.1; partial sums -0.1, -0.31, -0.81, -0.71, -0.61
    scale = math.sqrt(0.09 + 0.21 * 0.79 + 0.25 + 0.09 + 0.09)
    assert figures["ks_calibration"] == pytest.approx(0.81 / scale, rel=1e-14)
    assert figures["kuiper_calibration"] == pytest.approx(0.71 / scale, rel=1e-14)
    assert round(figures["ks_calibration"], 3) == 0.978
    assert round(figures["kuiper_calibration"], 3) == 0.857
    assert round(ct.spiegelhalter(c, o)[0], 3) == -0.757
    assert round(1 - ct.kolmogorov_smirnov_sf(1.0), 4) == 0.3708
    assert round(1 - ct.kuiper_sf(1.0), 4) == 0.0634


@pytest.mark.parametrize("x", [0.2, 0.5, 0.9, 0.999, 1.0, 1.3, 2.0, 3.0, 4.5])
def test_brownian_tail_series_agree_with_mapie_cdf(x):
    assert ct.kolmogorov_smirnov_sf(x) == pytest.approx(
        1 - mapie_calibration.kolmogorov_smirnov_cdf(x), rel=1e-9
    )
    assert ct.kuiper_sf(x) == pytest.approx(1 - mapie_calibration.kuiper_cdf(x), rel=1e-9)


def test_brownian_tails_stay_accurate_where_one_minus_cdf_rounds_away():
    # for large x, P(sup |B| > x) ~ 4 Phi_bar(x) and P(range > x) ~ 8 Phi_bar(x) (first terms of the series)
    for x in (8.0, 15.0, 25.0):
        assert ct.kolmogorov_smirnov_sf(x) == pytest.approx(4 * stats.norm.sf(x), rel=1e-9)
        assert ct.kuiper_sf(x) == pytest.approx(8 * stats.norm.sf(x), rel=1e-9)
        assert ct.kolmogorov_smirnov_sf(x) > 0


# ---------------------------------------------------------------------------------------- closed forms


def test_spiegelhalter_closed_form():
    z, p = ct.spiegelhalter([0.2, 0.7], [0, 1])
    expected = (-0.2 * 0.6 + 0.3 * -0.4) / math.sqrt(0.36 * 0.16 + 0.16 * 0.21)
    assert z == pytest.approx(expected, rel=1e-14)
    assert p == pytest.approx(math.erfc(abs(expected) / math.sqrt(2)), rel=1e-12)


def test_spiegelhalter_undefined_where_every_confidence_is_a_half():
    z, p = ct.spiegelhalter([0.5, 0.5, 0.5], [0, 1, 1])
    assert math.isnan(z) and math.isnan(p)


def test_hosmer_lemeshow_closed_form():
    c = np.array([0.9, 0.1, 0.5, 0.2, 0.8, 0.4])
    o = np.array([1, 0, 1, 1, 1, 0])
    statistic, p = ct.hosmer_lemeshow(c, o, n_groups=3)
    # groups by confidence: (0.1, 0.2), (0.4, 0.5), (0.8, 0.9): E = 0.3, 0.9, 1.7; O = 1, 1, 2
    expected = 0.49 / (0.3 * 0.85) + 0.01 / (0.9 * 0.55) + 0.09 / (1.7 * 0.15)
    assert statistic == pytest.approx(expected, rel=1e-13)
    assert p == pytest.approx(stats.chi2.sf(expected, 3), rel=1e-12)  # forecasts not fitted here: G dof
    assert ct.hosmer_lemeshow(c, o, n_groups=3, fitted=True)[1] == pytest.approx(
        stats.chi2.sf(expected, 1), rel=1e-12
    )


def test_hosmer_lemeshow_needs_as_many_samples_as_groups():
    assert all(math.isnan(v) for v in ct.hosmer_lemeshow([0.5, 0.6], [0, 1]))
    with pytest.raises(InvalidInput, match="n_groups"):
        ct.hosmer_lemeshow([0.5, 0.6, 0.7], [0, 1, 1], n_groups=2)


def test_cox_closed_form_with_two_confidence_levels():
    # two distinct logits 0 and 1: the fit reproduces each level's frequency (1/4 and 3/4) exactly
    c = np.array([0.5] * 4 + [float(_sigmoid(np.array(1.0)))] * 4)
    o = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    fit = ct.calibration_slope_intercept(c, o)
    assert fit.converged
    assert fit.intercept == pytest.approx(-math.log(3), rel=1e-9)
    assert fit.slope == pytest.approx(2 * math.log(3), rel=1e-9)
    # information 0.75 [[2, 1], [1, 1]], inverse (1 / 0.75) [[1, -1], [-1, 2]]
    assert fit.intercept_se == pytest.approx(math.sqrt(1 / 0.75), rel=1e-9)
    assert fit.slope_se == pytest.approx(math.sqrt(2 / 0.75), rel=1e-9)


def test_cox_matches_scikit_learn_on_cifar10():
    c, o = _cifar_top_label(1.5)
    fit = ct.calibration_slope_intercept(c, o)
    clipped = np.clip(c, 1e-12, 1 - 1e-12)
    x = np.log(clipped / (1 - clipped))[:, None]
    reference = LogisticRegression(C=np.inf, solver="newton-cholesky", tol=1e-12, max_iter=1000).fit(x, o)
    assert fit.slope == pytest.approx(reference.coef_[0, 0], rel=1e-7)
    assert fit.intercept == pytest.approx(reference.intercept_[0], rel=1e-7, abs=1e-9)
    # standard errors: the inverse of the information at scikit-learn's optimum
    p = _sigmoid(reference.intercept_[0] + reference.coef_[0, 0] * x[:, 0])
    design = np.column_stack([np.ones_like(x[:, 0]), x[:, 0]])
    covariance = np.linalg.inv(design.T @ (design * (p * (1 - p))[:, None]))
    assert fit.intercept_se == pytest.approx(math.sqrt(covariance[0, 0]), rel=1e-6)
    assert fit.slope_se == pytest.approx(math.sqrt(covariance[1, 1]), rel=1e-6)


def test_cox_without_a_finite_maximum_is_nan():
    fit = ct.calibration_slope_intercept([0.6, 0.7, 0.9], [1, 1, 1])
    assert not fit.converged and math.isnan(fit.slope)


def _lowess_reference(x: np.ndarray, y: np.ndarray, fraction: float) -> np.ndarray:
    """Lowess by the book, one point at a time: r nearest neighbours, tricube, weighted least squares."""
    n = x.shape[0]
    r = max(2, math.floor(fraction * n + 1e-7))
    fitted = np.empty(n)
    for i in range(n):
        distance = np.abs(x - x[i])
        h = np.sort(distance)[r - 1]
        w = np.where(distance < h, (1 - (distance / h) ** 3) ** 3, 0.0)
        design = np.column_stack([np.ones(n), x - x[i]])
        coef = np.linalg.lstsq(design * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)[0]
        fitted[i] = coef[0]
    return fitted


def test_lowess_matches_the_textbook_definition():
    rng = np.random.default_rng(3)
    x = rng.uniform(size=300)
    y = (rng.uniform(size=300) < x).astype(np.float64)
    for fraction in (2 / 3, 0.3):
        np.testing.assert_allclose(
            ct.lowess(x, y, fraction=fraction), _lowess_reference(x, y, fraction), rtol=1e-10
        )


def test_lowess_reproduces_a_line():
    x = np.linspace(0.2, 0.9, 501)
    np.testing.assert_allclose(ct.lowess(x, x - 0.1), x - 0.1, atol=1e-12)


def test_ici_with_anchors_is_close_to_the_lowess_at_every_sample():
    rng = np.random.default_rng(4)
    c = np.sort(rng.uniform(0.3, 1.0, size=10_000))
    o = (rng.uniform(size=c.shape[0]) < c**1.5).astype(np.float64)
    ici, e50, e90 = ct.integrated_calibration_index(c, o)
    gap = np.abs(ct._lowess_sorted(c, o, np.ones(c.shape[0]), 2 / 3) - c)
    assert ici == pytest.approx(np.mean(gap), rel=1e-4)
    assert e50 == pytest.approx(np.median(gap), rel=1e-4)
    assert e90 == pytest.approx(np.quantile(gap, 0.9), rel=1e-4)


def test_ici_is_the_known_gap_of_a_constant_miscalibration():
    rng = np.random.default_rng(5)
    c = rng.uniform(0.3, 0.9, size=200_000)
    o = (rng.uniform(size=c.shape[0]) < c - 0.1).astype(np.float64)
    ici, e50, e90 = ct.integrated_calibration_index(c, o)
    assert ici == pytest.approx(0.1, abs=0.01)
    assert e50 == pytest.approx(0.1, abs=0.01)
    assert e90 == pytest.approx(0.1, abs=0.02)


def test_ici_near_zero_under_perfect_calibration():
    rng = np.random.default_rng(6)
    c = rng.uniform(0.0, 1.0, size=100_000)
    o = (rng.uniform(size=c.shape[0]) < c).astype(np.float64)
    ici, _, e90 = ct.integrated_calibration_index(c, o)
    assert ici < 0.01 and e90 < 0.02


def test_invalid_forecasts_are_rejected_with_the_row():
    with pytest.raises(InvalidInput, match=r"confidences\[1\]"):
        ct.calibration_tests([0.5, 1.5], [0, 1])
    with pytest.raises(InvalidInput, match=r"outcomes\[0\]"):
        ct.calibration_tests([0.5, 0.5], [2, 1])
    with pytest.raises(InvalidInput, match="samples"):
        ct.calibration_tests([0.5, 0.5], [1])
    with pytest.raises(InvalidInput, match=r"confidences\[0\]"):
        ct.calibration_tests([math.nan], [1])


# ------------------------------------------------------------------------------- properties under the null

DRAWS = 400
N_PER_DRAW = 1000


# Confidences as a top-label confidence spreads them (at least 1/K): U(0.5, 0.99). Spiegelhalter's Z is blind to
# a miscalibration o ~ Bernoulli(c^2) of confidences spread symmetrically about 1/2: E[(o - c)(1 - 2c)] =
# -c(1 - c)(1 - 2c) sums to about 0 there (test below), so the property tests draw top-label-like confidences.
LOW, HIGH = 0.5, 0.99


def _rejection_rates(power: float, draws: int, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    rejected = dict.fromkeys(
        ("spiegelhalter_p", "ks_calibration_p", "kuiper_calibration_p", "hosmer_lemeshow_p"), 0
    )
    for _ in range(draws):
        c = rng.uniform(LOW, HIGH, size=N_PER_DRAW)
        o = (rng.uniform(size=N_PER_DRAW) < c**power).astype(np.float64)
        figures = {
            "spiegelhalter_p": ct.spiegelhalter(c, o)[1],
            "hosmer_lemeshow_p": ct.hosmer_lemeshow(c, o)[1],
        }
        figures.update(ct.cumulative_calibration_tests(c, o))
        for name in rejected:
            rejected[name] += figures[name] < 0.05
    return {name: count / draws for name, count in rejected.items()}


def test_p_values_reject_about_five_percent_under_perfect_calibration():
    rates = _rejection_rates(1.0, DRAWS, seed=20261204)
    # binomial(400, 0.05): mean 20, sd 4.4; 2.5 % - 8.5 % is 10 - 34 rejections
    for name, rate in rates.items():
        assert 0.025 <= rate <= 0.085, (name, rate)


def test_p_values_reject_almost_always_under_miscalibration():
    rates = _rejection_rates(2.0, 50, seed=7)
    for name, rate in rates.items():
        assert rate >= 0.96, (name, rate)


def test_hosmer_lemeshow_with_g_minus_2_degrees_of_freedom_over_rejects_fixed_forecasts():
    rng = np.random.default_rng(20261204)
    statistics = []
    for _ in range(DRAWS):
        c = rng.uniform(LOW, HIGH, size=N_PER_DRAW)
        statistics.append(ct.hosmer_lemeshow(c, (rng.uniform(size=N_PER_DRAW) < c).astype(np.float64))[0])
    rate = np.mean(stats.chi2.sf(statistics, 8) < 0.05)
    assert rate > 0.085  # theory: P(chi2_10 > chi2_8 quantile 0.95) = 11.5 %


def test_spiegelhalter_blind_spot_of_symmetric_confidences():
    rng = np.random.default_rng(9)
    c = rng.uniform(0.05, 0.95, size=100_000)
    o = (rng.uniform(size=c.shape[0]) < c**2).astype(np.float64)
    assert abs(ct.spiegelhalter(c, o)[0]) < 4  # no power, while the cumulative tests see it at once
    assert ct.cumulative_calibration_tests(c, o)["ks_calibration_p"] < 1e-10


def test_cox_under_perfect_calibration_and_over_confidence():
    rng = np.random.default_rng(8)
    c = rng.uniform(0.02, 0.98, size=5000)
    o = (rng.uniform(size=c.shape[0]) < c).astype(np.float64)
    fit = ct.calibration_slope_intercept(c, o)
    assert abs(fit.slope - 1) < 3 * fit.slope_se
    assert abs(fit.intercept) < 3 * fit.intercept_se
    # over-confident scores: the true probability is sigmoid(logit(c) / 2), the scores too extreme
    truth = _sigmoid(np.log(c / (1 - c)) / 2)
    over = ct.calibration_slope_intercept(c, (rng.uniform(size=c.shape[0]) < truth).astype(np.float64))
    assert over.slope < 1 - 3 * over.slope_se
    assert over.slope == pytest.approx(0.5, abs=3 * over.slope_se)


# ------------------------------------------------------------------------------------ in the report


def test_calibration_report_carries_the_tests_of_its_top_label():
    arrays = load_arrays(CIFAR10)
    report = calibration_report(arrays["logits_test"], arrays["labels_test"], from_logits=True)
    c, o = _cifar_top_label(1.0)
    expected = ct.calibration_tests(c, o)
    for name in ct.CALIBRATION_TEST_FIGURES:
        if math.isfinite(expected[name]):
            assert report[name] == pytest.approx(expected[name], rel=1e-9, abs=1e-300), name
        else:
            assert name not in report
    assert "spiegelhalter" in report["conventions"] and "ici" in report["conventions"]


def test_weighted_report_leaves_the_unweighted_tests_out():
    arrays = load_arrays(CIFAR10)
    weights = np.ones(arrays["labels_test"].shape[0])
    report = calibration_report(
        arrays["logits_test"], arrays["labels_test"], from_logits=True, sample_weight=weights
    )
    assert "spiegelhalter_z" not in report and "ece" in report
