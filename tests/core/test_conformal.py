"""Split-conformal prediction sets (issue #16): thresholds and sets against MAPIE on real CIFAR outputs, and
the coverage guarantee as a property on exchangeable data."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import softmax

from service.core import conformal
from service.errors import InvalidParameter
from tests.helpers.peers import RowLookup

mapie_classification = pytest.importorskip("mapie.classification")
from mapie.conformity_scores.sets.aps import APSConformityScore  # noqa: E402
from mapie.utils import _compute_classification_quantile  # noqa: E402
from sklearn.model_selection import StratifiedShuffleSplit  # noqa: E402

SEED = 7


@pytest.fixture(scope="module", params=["netcal_wrn16-4_c10.npz", "netcal_densenet-bc-100_c100.npz"])
def split(request, reference_data):
    """Calibrated (temperature-scaled, the README's T) validation and test probabilities, and MAPIE's view."""
    data = reference_data(request.param)
    temperature = {"netcal_wrn16-4_c10.npz": 2.03915, "netcal_densenet-bc-100_c100.npz": 2.15776}[
        request.param
    ]
    val = softmax(data["logits_val"].astype(np.float64) / temperature, axis=1)
    test = softmax(data["logits_test"].astype(np.float64) / temperature, axis=1)
    estimator = RowLookup(np.vstack([val, test]))
    estimator.classes_ = np.arange(val.shape[1])
    estimator.n_features_in_ = 1
    rows_val = np.arange(len(val))[:, None]
    rows_test = np.arange(len(val), len(val) + len(test))[:, None]
    return {
        "val": val,
        "y": data["labels_val"],
        "test": test,
        "estimator": estimator,
        "X_val": rows_val,
        "X_test": rows_test,
    }


def _mapie(split, score, alpha=0.1):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = mapie_classification.SplitConformalClassifier(
            split["estimator"],
            confidence_level=1 - alpha,
            conformity_score=score,
            prefit=True,
            random_state=SEED,
        )
        model.conformalize(split["X_val"], split["y"])
    return model


def _predict_set(model, split, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, sets = model.predict_set(split["X_test"], conformity_score_params=params or None)
    return sets[:, :, 0]


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_lac_threshold_and_sets_match_mapie(split, alpha):
    model = _mapie(split, "lac", alpha)
    expected_sets = _predict_set(model, split)
    fitted = conformal.fit_thresholds(split["val"], split["y"], conformal.conformal_spec({"alpha": alpha}))
    assert fitted.threshold == pytest.approx(model._mapie_classifier.quantiles_[0], rel=1e-12)
    np.testing.assert_array_equal(conformal.prediction_sets(split["test"], fitted), expected_sets)


def test_randomised_aps_threshold_and_both_kinds_of_sets_match_mapie(split):
    """MAPIE's APS draws u from RandomState(seed) for the calibration scores (s = c_r(y) - u p_y) and again
    for randomised sets: with the same draws, the same threshold and the same sets."""
    model = _mapie(split, "aps")
    expected = _predict_set(model, split, include_last_label="randomized")  # MAPIE's quantile comes with it
    n = len(split["y"])
    spec = conformal.conformal_spec({"score": "aps", "randomized": True})
    fitted = conformal.fit_thresholds(
        split["val"], split["y"], spec, u=np.random.RandomState(SEED).uniform(size=n)
    )
    assert fitted.threshold == pytest.approx(model._mapie_classifier.quantiles_[0], rel=1e-12)
    randomised = conformal.prediction_sets(
        split["test"], fitted, u=np.random.RandomState(SEED).uniform(size=len(split["test"]))
    )
    np.testing.assert_array_equal(randomised, expected)
    # the deterministic sets ("include the last label") at the same threshold
    deterministic = conformal.ConformalThresholds(
        conformal.conformal_spec({"score": "aps"}), fitted.threshold, None, n, ()
    )
    sets = conformal.prediction_sets(split["test"], deterministic)
    np.testing.assert_array_equal(sets, _predict_set(model, split, include_last_label=True))
    assert sets.sum(axis=1).min() >= 1


def test_non_randomised_aps_scores_are_mapies_cumulative_mass_of_the_true_class(split):
    spec = conformal.conformal_spec({"score": "aps"})
    ours = conformal.conformity_scores(split["val"], split["y"], spec)
    mapie_scores, _ = APSConformityScore.get_true_label_cumsum_proba(
        split["y"], split["val"], np.arange(split["val"].shape[1])
    )
    np.testing.assert_allclose(ours, mapie_scores[:, 0], rtol=1e-12, atol=1e-15)
    fitted = conformal.fit_thresholds(split["val"], split["y"], spec)
    assert fitted.threshold == pytest.approx(
        _compute_classification_quantile(mapie_scores, np.array([0.1]))[0], rel=1e-12
    )


def test_raps_threshold_and_sets_match_mapie(split):
    """MAPIE's RAPS chooses k_reg and lambda on a stratified 10 % of the rows (X_raps) and calibrates on the
    rest; with its k_reg, lambda and the u its randomised scores drew (recovered from its unregularised
    scores), the same threshold and the same sets."""
    model = _mapie(split, "raps")
    sets = _predict_set(model, split)
    inner = model._mapie_classifier
    score = inner.conformity_score_function_
    rows, held = next(
        StratifiedShuffleSplit(n_splits=1, test_size=None, random_state=SEED).split(
            split["X_val"], split["y"]
        )
    )
    np.testing.assert_array_equal(held, score.X_raps[:, 0].astype(int))
    probabilities, labels = split["val"][rows], split["y"][rows]
    cumulative = conformal.conformity_scores(
        probabilities, labels, conformal.conformal_spec({"score": "aps"})
    )
    u = (cumulative - np.asarray(inner.conformity_scores_).ravel()) / probabilities[
        np.arange(len(rows)), labels
    ]
    assert u.min() >= 0.0 and u.max() <= 1.0
    options = {"score": "raps", "k_reg": int(score.k_star[0]), "lambda": float(score.lambda_star)}
    fitted = conformal.fit_thresholds(
        probabilities, labels, conformal.conformal_spec({**options, "randomized": True}), u=u
    )
    assert fitted.threshold == pytest.approx(score.quantiles_[0], rel=1e-12)
    deterministic = conformal.ConformalThresholds(
        conformal.conformal_spec(options), fitted.threshold, None, 0, ()
    )
    np.testing.assert_array_equal(conformal.prediction_sets(split["test"], deterministic), sets)


# ------------------------------------------------------------------------------------------ the guarantee


def _exchangeable(rng, n, n_classes):
    """Rows of a calibrated synthetic classifier: probabilities, labels drawn from them (exchangeable)."""
    probabilities = softmax(rng.normal(0.0, 2.0, size=(n, n_classes)), axis=1)
    labels = (probabilities.cumsum(axis=1) > rng.uniform(size=(n, 1))).argmax(axis=1)
    return probabilities, labels


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    score=st.sampled_from(conformal.SCORES),
    randomized=st.booleans(),
    mondrian=st.booleans(),
    alpha=st.sampled_from([0.05, 0.1, 0.2, 0.3]),
    n=st.integers(60, 300),
    n_classes=st.integers(2, 6),
    seed=st.integers(0, 2**16),
)
def test_coverage_holds_at_the_finite_sample_rate(score, randomized, mondrian, alpha, n, n_classes, seed):
    """Over R random calibration sets, the mean coverage of fresh rows is at least k / (n + 1) >= 1 - alpha
    (k = ceil((n+1)(1-alpha)); for Mondrian, the smallest over the classes of k_y / (n_y + 1)). Given its
    calibration set, a split's coverage is Beta(k, n + 1 - k) distributed (or larger: "include the last label"
    sets are supersets), of variance q (1 - q) / (n + 2) <= alpha (1 - alpha) / (n + 2) (q = k / (n + 1) >=
    1 - alpha; for Mondrian a mixture of such per class, n the smallest class); with the m test rows'
    binomial noise (<= 1 / (4 m)), the mean of R splits is within 5 standard deviations of its expectation
    but for a chance of 3e-7. (A quantile 2.5 % of the rows too low fails this test.)"""
    rng = np.random.default_rng(seed)
    if mondrian:  # enough rows per class for alpha, most of the time
        n = max(n, 3 * n_classes * conformal.quantile_rank_minimum(alpha))
    spec = conformal.conformal_spec(
        {"score": score, "alpha": alpha, "mondrian": mondrian, "randomized": randomized}
    )
    repeats, m = 200, 500
    coverages, expected, smallest = [], [], n
    for _ in range(repeats):
        cal_p, cal_y = _exchangeable(rng, n, n_classes)
        test_p, test_y = _exchangeable(rng, m, n_classes)
        try:
            fitted = conformal.fit_thresholds(cal_p, cal_y, spec, rng=rng)
        except InvalidParameter:  # a class drew too few rows for alpha (Mondrian): no threshold to check
            continue
        sets = conformal.prediction_sets(test_p, fitted, rng=rng)
        coverages.append(sets[np.arange(m), test_y].mean())
        sizes = np.bincount(cal_y, minlength=n_classes) if mondrian else np.array([n])
        expected.append(min(conformal.quantile_rank(int(size), alpha) / (size + 1) for size in sizes))
        smallest = min(smallest, int(sizes.min()))
    assert len(coverages) >= repeats // 2
    sd = math.sqrt(alpha * (1 - alpha) / (smallest + 2) + 0.25 / m) / math.sqrt(len(coverages))
    assert min(expected) >= 1 - alpha
    assert np.mean(coverages) >= min(expected) - 5 * sd


def test_lac_coverage_is_also_bounded_above_without_ties():
    """Continuous scores: the coverage of marginal LAC sets is below 1 - alpha + 1/(n + 1) in expectation."""
    rng = np.random.default_rng(11)
    spec, n, m = conformal.conformal_spec({"alpha": 0.1}), 99, 400
    coverages = []
    for _ in range(80):
        cal_p, cal_y = _exchangeable(rng, n, 5)
        test_p, test_y = _exchangeable(rng, m, 5)
        sets = conformal.prediction_sets(test_p, conformal.fit_thresholds(cal_p, cal_y, spec))
        coverages.append(sets[np.arange(m), test_y].mean())
    k = conformal.quantile_rank(n, 0.1)  # 90: E coverage = 90/100 exactly
    sd = math.sqrt(k * (n + 1 - k) / ((n + 1) ** 2 * (n + 2)) + 0.25 / m) / math.sqrt(len(coverages))
    assert abs(np.mean(coverages) - k / (n + 1)) <= 5 * sd


# ------------------------------------------------------------------------------------------ small facts


def test_the_quantile_rank_is_exact_where_round_off_would_add_one():
    assert conformal.quantile_rank(9, 0.1) == 9  # (9 + 1) * 0.9 is 9.000000000000002 in floats
    assert conformal.quantile_rank(5000, 0.1) == 4501
    assert conformal.conformal_quantile(np.arange(9.0), 0.1) == 8.0
    with pytest.raises(InvalidParameter, match=r"alpha=0\.05 needs at least 19"):
        conformal.conformal_quantile(np.arange(18.0), 0.05)
    assert conformal.quantile_rank_minimum(0.05) == 19


def test_scores_by_hand():
    p = np.array([[0.5, 0.3, 0.2]])
    raps = conformal.conformal_spec({"score": "raps", "k_reg": 1, "lambda": 0.1})
    np.testing.assert_allclose(conformal.score_matrix(p, conformal.conformal_spec({})), [[0.5, 0.7, 0.8]])
    np.testing.assert_allclose(
        conformal.score_matrix(p, conformal.conformal_spec({"score": "aps"})), [[0.5, 0.8, 1.0]]
    )
    np.testing.assert_allclose(conformal.score_matrix(p, raps), [[0.5, 0.9, 1.2]])
    randomised = conformal.conformal_spec({"score": "aps", "randomized": True})
    np.testing.assert_allclose(conformal.score_matrix(p, randomised, u=np.array([0.5])), [[0.25, 0.65, 0.9]])
    fitted = conformal.ConformalThresholds(raps, 0.85, None, 1, ())
    # RAPS "include the last label": the cumulative regularised mass before the 2nd class (0.5) is below 0.85
    np.testing.assert_array_equal(conformal.prediction_sets(p, fitted), [[True, True, False]])


def test_coverage_figures():
    sets = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1]], dtype=bool)
    figures = conformal.coverage_figures(sets, np.array([0, 1, 2, 2]), 0.1)
    assert figures["coverage"] == 0.75 and figures["coverage_per_class"] == [1.0, 1.0, 0.5]
    assert figures["set_size_counts"] == [1, 1, 1, 1] and figures["empty_sets"] == 0.25
    assert figures["size_stratified_coverage"][0] == {"size": 0, "n": 1, "coverage": 0.0}
    assert figures["mean_set_size"] == 1.5 and figures["worst_class_coverage"] == 0.5
