"""Multi-label models: label validation, per-label figures and the per-label calibrators, against
scikit-learn, with hypothesis properties. Data: the synthetic set of tests/helpers/multilabel.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import expit
from sklearn.calibration import CalibratedClassifierCV, calibration_curve
from sklearn.frozen import FrozenEstimator
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss, log_loss

from service.core.calibrators import PerLabelCalibration, TemperatureScaling, calibrator_from_dict
from service.core.multilabel import check_label_matrix, label_figures
from service.errors import InvalidInput
from tests.helpers.multilabel import TEMPERATURES, index_lists, multilabel_set
from tests.helpers.peers import IdentityClassifier


def sklearn_per_label(method: str, logits: np.ndarray, labels: np.ndarray, new: np.ndarray) -> np.ndarray:
    """scikit-learn's CalibratedClassifierCV (``method``) fitted per label on frozen logits."""
    columns = []
    for k in range(logits.shape[1]):
        x, y = logits[:, [k]], labels[:, k]
        frozen = FrozenEstimator(IdentityClassifier().fit(x, y))
        fitted = CalibratedClassifierCV(frozen, method=method).fit(x, y)
        columns.append(fitted.predict_proba(new[:, [k]])[:, 1])
    return np.stack(columns, axis=1)


@pytest.fixture(scope="module")
def data():
    logits, labels = multilabel_set(2000, seed=0)
    test_logits, test_labels = multilabel_set(1000, seed=1)
    return logits, labels, test_logits, test_labels


# ---------------------------------------------------------------------------------------------- labels


def test_index_lists_and_the_matrix_are_the_same_labels():
    _, labels = multilabel_set(50, seed=3)
    lists = index_lists(labels)
    np.testing.assert_array_equal(check_label_matrix(lists, 50, 5), labels)
    np.testing.assert_array_equal(check_label_matrix(labels.tolist(), 50, 5), labels)
    np.testing.assert_array_equal(check_label_matrix(labels.astype(bool), 50, 5), labels)
    assert check_label_matrix([[], [1, 0], [2]], 3, 3).tolist() == [[0, 0, 0], [1, 1, 0], [0, 0, 1]]


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([[0, 5]], r"labels\[0\] holds label index 5, outside \[0, 3\)"),
        ([[2, 2]], r"labels\[0\] repeats a label index"),
        ([[1, 1]], r"a 0/1 matrix of 2 columns; the model has 3 labels, so it must have shape \(1, 3\)"),
        ([[0.5]], r"labels\[0\] must hold integer label indices"),
        ([[True]], r"labels\[0\] holds a boolean"),
        ([[0], [1]], "labels has 2 rows but the scores have 1 rows"),
        (np.array([[0, 2, 1]]), r"labels\[0\] holds a value other than 0 and 1"),
        (np.zeros((1, 4)), r"labels must have shape \(1, 3\)"),
        ("abc", "a 0/1 matrix or a list of label-index lists"),
    ],
)
def test_bad_labels_are_named(labels, message):
    with pytest.raises(InvalidInput, match=message):
        check_label_matrix(labels, 1, 3)


# --------------------------------------------------------------------------------------------- figures


def test_figures_match_sklearn_per_label_and_pooled(data):
    logits, labels = data[0], data[1]
    p = expit(logits)
    report = label_figures(labels, logits=logits)
    for k, row in enumerate(report["per_label"]):
        assert row["brier"] == pytest.approx(brier_score_loss(labels[:, k], p[:, k]), rel=1e-12)
        assert row["nll"] == pytest.approx(log_loss(labels[:, k], p[:, k]), rel=1e-9)
        prob_true, prob_pred = calibration_curve(labels[:, k], p[:, k], n_bins=15, strategy="uniform")
        bins = report["reliability"][k]
        np.testing.assert_allclose(bins["frequency"], prob_true, rtol=1e-12)
        np.testing.assert_allclose(bins["mean_probability"], prob_pred, rtol=1e-12)
        counts = np.asarray(bins["count"])
        ece = counts @ np.abs(prob_true - prob_pred) / counts.sum()
        assert row["ece"] == pytest.approx(ece, rel=1e-12)
        assert row["mce"] == pytest.approx(np.abs(prob_true - prob_pred).max(), rel=1e-12)
    for name in ("ece", "mce", "brier", "nll"):
        assert report["macro"][name] == pytest.approx(np.mean([r[name] for r in report["per_label"]]))
    assert report["micro"]["brier"] == pytest.approx(brier_score_loss(labels.ravel(), p.ravel()), rel=1e-12)
    assert report["micro"]["nll"] == pytest.approx(log_loss(labels.ravel(), p.ravel()), rel=1e-9)


def test_figures_of_probabilities_equal_those_of_logits_and_nll_is_exact(data):
    logits, labels = data[0], data[1]
    from_logits = label_figures(labels, logits=logits)
    from_probabilities = label_figures(labels, probabilities=expit(logits))
    for name in ("ece", "brier", "nll"):
        assert from_probabilities["micro"][name] == pytest.approx(from_logits["micro"][name], rel=1e-9)
    # a true outcome of probability 0: infinite from probabilities, finite (exact) from logits
    z = np.array([[-800.0], [3.0]])
    y = np.array([[1], [0]])
    assert label_figures(y, probabilities=expit(z))["micro"]["nll"] == np.inf
    assert label_figures(y, logits=z)["micro"]["nll"] == pytest.approx((800.0 + np.logaddexp(0, 3.0)) / 2)


# ----------------------------------------------------------------------------------------- calibrators


def test_temperature_per_label_finds_the_miscalibration_and_matches_sklearn(data):
    logits, labels, test_logits, _ = data
    fitted = PerLabelCalibration("temperature").fit(logits, labels)
    np.testing.assert_allclose(fitted.temperatures_, TEMPERATURES, rtol=0.15)
    reference = sklearn_per_label("temperature", logits, labels, test_logits)
    np.testing.assert_allclose(fitted.transform(test_logits), reference, atol=1e-6)
    assert fitted.convergence_["converged"]


def test_shared_temperature_is_temperature_scaling_of_the_pooled_pairs(data):
    logits, labels, test_logits, _ = data
    fitted = PerLabelCalibration("shared_temperature").fit(logits, labels)
    pooled = TemperatureScaling().fit(logits.reshape(-1, 1), labels.reshape(-1).astype(int))
    assert fitted.calibrators_[0].temperature_ == pytest.approx(pooled.temperature_, rel=1e-12)
    np.testing.assert_allclose(
        fitted.transform(test_logits), expit(test_logits / pooled.temperature_), rtol=1e-12
    )


def test_platt_per_label_matches_logistic_regression_and_sklearn_sigmoid(data):
    logits, labels, test_logits, _ = data
    fitted = PerLabelCalibration("platt").fit(logits, labels)
    for k, calibrator in enumerate(fitted.calibrators_):
        reference = LogisticRegression(C=1e12, tol=1e-12, max_iter=10_000).fit(logits[:, [k]], labels[:, k])
        assert calibrator.slope_ == pytest.approx(reference.coef_[0, 0], rel=1e-4)
    smooth = PerLabelCalibration("platt", smooth_targets=True).fit(logits, labels)
    reference = sklearn_per_label("sigmoid", logits, labels, test_logits)
    np.testing.assert_allclose(smooth.transform(test_logits), reference, atol=1e-5)


def test_isotonic_per_label_matches_sklearn_isotonic_regression(data):
    logits, labels, test_logits, _ = data
    fitted = PerLabelCalibration("isotonic", floor=0).fit(logits, labels)
    expected = np.stack(
        [
            IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1)
            .fit(expit(logits[:, k]), labels[:, k])
            .predict(expit(test_logits[:, k]))
            for k in range(5)
        ],
        axis=1,
    )
    np.testing.assert_allclose(fitted.transform(test_logits), expected, atol=1e-12)
    # on the fit rows, knots of either curve: scikit-learn's CalibratedClassifierCV gives the same values
    np.testing.assert_allclose(
        fitted.transform(logits), sklearn_per_label("isotonic", logits, labels, logits), atol=1e-12
    )


@pytest.mark.parametrize("method", ["temperature", "shared_temperature", "platt", "isotonic"])
def test_calibration_improves_held_out_figures_and_round_trips_through_json(method, data):
    logits, labels, test_logits, test_labels = data
    fitted = PerLabelCalibration(method).fit(logits, labels)
    before = label_figures(test_labels, logits=test_logits)
    after = label_figures(test_labels, probabilities=fitted.transform(test_logits))
    assert after["macro"]["nll"] < before["macro"]["nll"]
    assert after["macro"]["ece"] < before["macro"]["ece"]
    document = json.loads(json.dumps(fitted.to_dict()))
    assert document["task"] == "multilabel" and document["num_classes"] == 5 and document["method"] == method
    loaded = calibrator_from_dict(document)
    assert isinstance(loaded, PerLabelCalibration)
    np.testing.assert_array_equal(loaded.transform(test_logits), fitted.transform(test_logits))


def test_labels_as_index_lists_fit_the_same_calibrator(data):
    logits, labels = data[0][:300], data[1][:300]
    a = PerLabelCalibration("platt").fit(logits, labels)
    b = PerLabelCalibration("platt").fit(logits, index_lists(labels))
    np.testing.assert_array_equal(a.transform(logits), b.transform(logits))


def test_errors_are_clear(data):
    logits, labels = data[0][:100], data[1][:100]
    with pytest.raises(
        InvalidInput, match="not available for a multi-label model; choose one of temperature"
    ):
        PerLabelCalibration("matrix")
    with pytest.raises(InvalidInput, match="unknown option 'n_bins' for multi-label method 'platt'"):
        PerLabelCalibration("platt", n_bins=3)
    one_class = labels.copy()
    one_class[:, 2] = 0
    with pytest.raises(InvalidInput, match="label 2: labels hold one class only"):
        PerLabelCalibration("isotonic").fit(logits, one_class)
    fitted = PerLabelCalibration("temperature").fit(logits, one_class)  # temperature accepts one class
    with pytest.raises(InvalidInput, match="fitted on 5 labels; logits have 4 columns"):
        fitted.transform(logits[:, :4])
    document = fitted.to_dict()
    document["params"]["labels"] = document["params"]["labels"][:3]
    with pytest.raises(InvalidInput, match=r"params\.labels must be a list of 5 documents"):
        calibrator_from_dict(document)


# ------------------------------------------------------------------------------------------ properties

_FITTED = {}


def _fitted(method: str) -> PerLabelCalibration:
    if method not in _FITTED:
        logits, labels = multilabel_set(500, seed=7)
        _FITTED[method] = PerLabelCalibration(method).fit(logits, labels)
    return _FITTED[method]


@settings(max_examples=40, deadline=None)
@given(
    method=st.sampled_from(["temperature", "shared_temperature", "platt", "isotonic"]),
    logits=arrays(np.float64, st.tuples(st.integers(1, 20), st.just(5)), elements=st.floats(-1e6, 1e6)),
    shift=st.floats(0.0, 50.0),
)
def test_answers_are_k_probabilities_in_0_1_monotone_per_label(method, logits, shift):
    fitted = _fitted(method)
    p = fitted.transform(logits)
    assert p.shape == logits.shape and p.dtype == np.float64
    assert np.all((p >= 0) & (p <= 1))
    # raising one label's logit never lowers its probability, nor changes any other label's
    raised = logits.copy()
    raised[:, 1] += shift
    q = fitted.transform(raised)
    assert np.all(q[:, 1] >= p[:, 1] - 1e-12)
    np.testing.assert_array_equal(np.delete(q, 1, axis=1), np.delete(p, 1, axis=1))


def test_rows_need_not_sum_to_one():
    p = _fitted("temperature").transform(np.full((1, 5), 4.0))
    assert p.sum() > 4.0


@settings(max_examples=60, deadline=None)
@given(matrix=arrays(np.int8, st.tuples(st.integers(1, 12), st.integers(1, 6)), elements=st.integers(0, 1)))
def test_matrix_and_index_lists_read_the_same(matrix):
    n, k = matrix.shape
    lists = index_lists(matrix)
    np.testing.assert_array_equal(check_label_matrix(matrix, n, k), matrix)
    np.testing.assert_array_equal(check_label_matrix(matrix.tolist(), n, k), matrix)
    if k > 2 or any(len(row) not in (0, k) for row in lists):  # (an all-0/1 list of width K reads as a row)
        np.testing.assert_array_equal(check_label_matrix(lists, n, k), matrix)


@pytest.mark.parametrize("method", ["temperature", "shared_temperature", "platt", "isotonic"])
def test_integer_sample_weights_equal_repeated_rows(method, data):
    logits, labels = data[0][:400], data[1][:400]
    weights = np.random.default_rng(5).integers(0, 4, size=400)
    repeated = np.repeat(np.arange(400), weights)
    # (isotonic's default floor, 1 / (2 n), counts rows, not weights: the plain curve is compared)
    options = {"floor": 0} if method == "isotonic" else {}
    weighted = PerLabelCalibration(method, **options).fit(logits, labels, sample_weight=weights.astype(float))
    plain = PerLabelCalibration(method, **options).fit(logits[repeated], labels[repeated])
    np.testing.assert_allclose(weighted.transform(logits), plain.transform(logits), rtol=1e-6, atol=1e-9)
