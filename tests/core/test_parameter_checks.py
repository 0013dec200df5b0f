"""Every calibrator checks its parameters on fit and on upload, and every size-like option has its limit.

Issue #11: a temperature of 2e-300 (bounds [1e-300, 2e-300]) was accepted and answered NaN; uploaded
documents with T = 1e-300, T = 1e300, T outside their own bounds, matrix weights of 1e300 or a decreasing
isotonic map were accepted; ``n_bins`` of 1e9, matrix scaling on 20,000 classes, an isotonic fit on 100,000
classes and a 10,000-resample bootstrap had no limit.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from service.core import metrics
from service.core.calibrators import calibrator_from_dict, make_calibrator
from service.core.calibrators.affine import AFFINE_MAX_ITER, AFFINE_MAX_PARAMETER, MATRIX_MAX_CLASSES, MAX_REG
from service.core.calibrators.binning import HISTOGRAM_MAX_BINS, ONE_VS_REST_MAX_CLASSES, ONE_VS_REST_MAX_WORK
from service.core.calibrators.platt import PLATT_MAX_ITER, PLATT_MAX_PARAMETER
from service.core.calibrators.temperature import MAX_GAMMA, TEMPERATURE_MAX_ITER, TEMPERATURE_RANGE
from service.core.validation import check_labels
from service.errors import InvalidInput


def _data(k: int, n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, k)) * 3, rng.integers(0, max(k, 2), size=n)


def _document(method: str) -> dict:
    logits, labels = _data(1 if method == "platt" else 3)
    return make_calibrator(method).fit(logits, labels).to_dict()


def _with_params(document: dict, **changes) -> dict:
    return {**document, "params": {**document["params"], **changes}}


# ------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize(
    ("method", "options", "needle"),
    [
        ("temperature", {"bounds": [1e-300, 2e-300]}, "within [0.001, 1000]"),
        ("temperature", {"bounds": [0.5, 1e300]}, "within [0.001, 1000]"),
        ("temperature", {"max_iter": TEMPERATURE_MAX_ITER + 1}, f"at most {TEMPERATURE_MAX_ITER:,}"),
        ("temperature", {"gamma": MAX_GAMMA * 2, "objective": "focal"}, "gamma must be <= 100"),
        ("temperature", {"tol": 2.0}, "tol must be <= 1"),
        ("temperature", {"class_weight": [1.0] * 100_001}, "above the limit of 100,000"),
        ("vector", {"max_iter": AFFINE_MAX_ITER + 1}, f"at most {AFFINE_MAX_ITER:,}"),
        ("vector", {"reg": MAX_REG * 10}, "reg must be <= 1e+06"),
        ("matrix", {"off_diagonal_reg": 1e300}, "off_diagonal_reg must be <= 1e+06"),
        ("platt", {"max_iter": PLATT_MAX_ITER + 1}, f"at most {PLATT_MAX_ITER:,}"),
        ("histogram", {"n_bins": 1_000_000_000}, f"at most {HISTOGRAM_MAX_BINS:,}"),
        ("histogram", {"n_bins": HISTOGRAM_MAX_BINS + 1}, f"at most {HISTOGRAM_MAX_BINS:,}"),
    ],
)
def test_options_beyond_their_limit_are_refused_naming_it(method, options, needle):
    with pytest.raises(InvalidInput, match=re.escape(needle)):
        make_calibrator(method, **options)


def test_limits_themselves_are_accepted():
    make_calibrator("temperature", bounds=list(TEMPERATURE_RANGE), max_iter=TEMPERATURE_MAX_ITER)
    make_calibrator("histogram", n_bins=HISTOGRAM_MAX_BINS)
    make_calibrator("matrix", max_iter=AFFINE_MAX_ITER)


def test_the_smallest_temperature_keeps_the_largest_logits_finite():
    logits, labels = _data(3)
    calibrator = make_calibrator("temperature", bounds=[1e-3, 2e-3]).fit(logits, labels)
    p = calibrator.transform(np.array([[1e99, 0.0, -1e99], [1e100, 1e100, -1e100]]))
    np.testing.assert_array_equal(p, [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])


# ------------------------------------------------------------------------------------------ shapes


def test_matrix_scaling_refuses_more_classes_than_its_limit_before_allocating():
    logits = np.zeros((2, MATRIX_MAX_CLASSES + 1), dtype=np.float32)
    with pytest.raises(InvalidInput, match=f"limited to {MATRIX_MAX_CLASSES:,} classes"):
        make_calibrator("matrix").fit(logits, [0, 1])


@pytest.mark.parametrize("method", ["isotonic", "histogram"])
def test_one_vs_rest_refuses_too_many_classes_and_too_much_work(method):
    with pytest.raises(InvalidInput, match=f"limited to {ONE_VS_REST_MAX_CLASSES:,} classes"):
        make_calibrator(method).fit(np.zeros((10, 100_000), dtype=np.float32), np.arange(10))
    rows = ONE_VS_REST_MAX_WORK // 500 + 1
    logits = np.zeros((rows, 500), dtype=np.float32)
    with pytest.raises(InvalidInput, match=f"above the limit of {ONE_VS_REST_MAX_WORK:,}"):
        make_calibrator(method).fit(logits, np.arange(rows) % 500)


def test_metric_bins_and_bootstrap_work_are_bounded():
    logits, labels = _data(3)
    with pytest.raises(InvalidInput, match=f"at most {metrics.MAX_N_BINS:,}"):
        metrics.expected_calibration_error(logits, labels, from_logits=True, n_bins=100_000_000)
    with pytest.raises(InvalidInput, match=f"at most {metrics.MAX_N_BINS:,}"):
        metrics.calibration_report(logits, labels, from_logits=True, n_bins=metrics.MAX_N_BINS + 1)
    wide = np.zeros((2, 2_000), dtype=np.float32)
    with pytest.raises(InvalidInput, match="classwise bins"):
        metrics.expected_calibration_error(wide, [0, 1], from_logits=True, kind="classwise", n_bins=10_000)
    rows = 3_600
    logits, labels = _data(3, n=rows)
    with pytest.raises(InvalidInput, match=f"above the limit of {metrics.MAX_BOOTSTRAP_WORK:,}"):
        metrics.bootstrap_interval(metrics.brier_score, logits, labels, from_logits=True, n_resamples=10_000)
    with pytest.raises(InvalidInput, match=f"at most {metrics.MAX_BOOTSTRAP_RESAMPLES:,}"):
        metrics.bootstrap_interval(metrics.brier_score, logits, labels, from_logits=True, n_resamples=10_001)


# ------------------------------------------------------------------------------------------ uploads

TEMPERATURE = _document("temperature")


@pytest.mark.parametrize(
    ("name", "document", "needle"),
    [
        (
            "T 1e-300",
            {
                **TEMPERATURE,
                "temperature": 1e-300,
                "params": {**TEMPERATURE["params"], "temperature": 1e-300},
            },
            "outside its bounds",
        ),
        (
            "T 1e300",
            {**TEMPERATURE, "temperature": 1e300, "params": {**TEMPERATURE["params"], "temperature": 1e300}},
            "outside its bounds",
        ),
        (
            "T outside its bounds",
            {
                **TEMPERATURE,
                "temperature": 50.0,
                "params": {**TEMPERATURE["params"], "temperature": 50.0, "bounds": [0.5, 10.0]},
            },
            "outside its bounds params.bounds [0.5, 10]",
        ),
        (
            "T without bounds beyond the range",
            {
                "method": "temperature",
                "num_classes": 3,
                "temperature": 1e-300,
                "params": {"temperature": 1e-300},
            },
            "outside the range of temperatures [0.001, 1000]",
        ),
        (
            "bounds beyond the range",
            _with_params(TEMPERATURE, bounds=[1e-300, 2e-300], temperature=2e-300) | {"temperature": 2e-300},
            "within [0.001, 1000]",
        ),
        ("matrix weights 1e300", "matrix-weights", "outside [-1e+12, 1e+12]"),
        ("vector bias 1e300", "vector-bias", "outside [-1e+12, 1e+12]"),
        ("platt slope 1e300", "platt-slope", "outside [-1e+12, 1e+12]"),
        ("isotonic decreasing", "isotonic-decreasing", "must be non-decreasing"),
        ("isotonic knots beyond [0, 1]", "isotonic-knots", "must lie in [0, 1]"),
        ("histogram too many bins", "histogram-bins", f"above the limit of {HISTOGRAM_MAX_BINS:,}"),
        ("matrix too many classes", "matrix-classes", f"limited to {MATRIX_MAX_CLASSES:,} classes"),
    ],
)
def test_uploaded_documents_with_parameters_out_of_range_are_refused(name, document, needle):
    if isinstance(document, str):
        document = _broken(document)
    with pytest.raises(InvalidInput, match=re.escape(needle)):
        calibrator_from_dict(document)


def _broken(kind: str) -> dict:
    if kind == "matrix-weights":
        document = _document("matrix")
        weights = np.array(document["params"]["weights"])
        weights[0, 1] = 1e300
        return _with_params(document, weights=weights.tolist())
    if kind == "vector-bias":
        document = _document("vector")
        return _with_params(document, bias=[0.0, 1e300, 0.0])
    if kind == "platt-slope":
        return _with_params(_document("platt"), slope=1e300)
    if kind == "isotonic-decreasing":
        document = _document("isotonic")
        curves = [[0.0, 0.5, 1.0]] * 3
        return _with_params(document, x_thresholds=curves, y_thresholds=[[0.9, 0.5, 0.1]] * 3)
    if kind == "isotonic-knots":
        document = _document("isotonic")
        return _with_params(document, x_thresholds=[[-5.0, 0.5, 3.0]] * 3, y_thresholds=[[0.1, 0.5, 0.9]] * 3)
    if kind == "histogram-bins":
        document = _document("histogram")
        n = HISTOGRAM_MAX_BINS + 1
        edges = np.linspace(0.0, 1.0, n + 1).tolist()
        return _with_params(document, bin_edges=[edges] * 3, bin_values=[[0.5] * n] * 3)
    if kind == "matrix-classes":
        k = MATRIX_MAX_CLASSES + 1
        return {"method": "matrix", "num_classes": k, "params": {"weights": [[0.0]], "bias": [0.0]}}
    raise AssertionError(kind)


def test_fitted_documents_round_trip_within_their_limits():
    for method in ("temperature", "vector", "matrix", "platt", "isotonic", "histogram"):
        document = _document(method)
        assert calibrator_from_dict(document).to_dict()["params"] == document["params"]


def test_affine_and_platt_limits_keep_every_accepted_logit_finite():
    # |W z + b| <= K * 1e12 * 1e100 + 1e12 for K <= 1,000: far below float64's 1.8e308
    assert MATRIX_MAX_CLASSES * AFFINE_MAX_PARAMETER * 1e100 < 1e200
    assert PLATT_MAX_PARAMETER * 2e100 < 1e200


# ------------------------------------------------------------------------------------------ labels


@pytest.mark.parametrize(
    "labels", [[True, False], [0, True], np.array([True, False]), np.array([1, True], dtype=object)]
)
def test_boolean_labels_are_refused(labels):
    with pytest.raises(InvalidInput, match="boolean"):
        check_labels(labels, 2, 2)


def test_integer_labels_still_pass():
    np.testing.assert_array_equal(check_labels([0, 1], 2, 2), [0, 1])
    np.testing.assert_array_equal(check_labels(np.array([1.0, 0.0]), 2, 2), [1, 0])
