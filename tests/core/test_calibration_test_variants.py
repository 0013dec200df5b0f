"""The statistical calibration tests beyond the top label (issue #15): binary models' positive class in
every report (``<figure>_positive_class``), each class's on request (``per_class_tests``)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from mapie.metrics import calibration as mapie_calibration

from service import workflows
from service.core import calibration_tests, metrics


def binary_set(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Binary logits of an over-confident model (one column: the logit of class 1)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, n)
    labels = (rng.uniform(size=n) < 1 / (1 + np.exp(-z / 2))).astype(int)
    return z[:, None], labels


def test_binary_reports_carry_positive_class_tests_equal_to_mapie():
    logits, labels = binary_set()
    report = metrics.calibration_report(logits, labels, from_logits=True)
    p1 = 1 / (1 + np.exp(-logits[:, 0]))
    expected = calibration_tests.calibration_tests(p1, labels.astype(float))
    for name, value in expected.items():
        assert report[f"{name}_positive_class"] == pytest.approx(value, rel=1e-9, abs=1e-15), name
    # MAPIE's tests are the positive-class ones (y_true, y_score of class 1)
    assert report["spiegelhalter_z_positive_class"] == pytest.approx(
        mapie_calibration.spiegelhalter_statistic(labels, p1), rel=1e-9
    )
    assert report["ks_calibration_positive_class"] == pytest.approx(
        mapie_calibration.kolmogorov_smirnov_statistic(labels, p1), rel=1e-6
    )
    assert "calibration_tests_positive_class" in report["conventions"]
    # Spiegelhalter's Z is symmetric in the two classes ((o - c)(1 - 2c) is unchanged by c -> 1 - c,
    # o -> 1 - o), so on a binary model the top-label and positive-class statistics agree; the others differ
    # (the top-label confidence never goes below 1/2)
    assert report["spiegelhalter_z"] == pytest.approx(report["spiegelhalter_z_positive_class"], rel=1e-9)
    assert report["calibration_intercept"] != pytest.approx(report["calibration_intercept_positive_class"])


def test_multiclass_reports_have_no_positive_class_tests():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(300, 3))
    report = metrics.calibration_report(logits, rng.integers(0, 3, 300), from_logits=True)
    assert not [name for name in report if name.endswith("_positive_class") and name != "ece_positive_class"]


def test_per_class_tests_are_each_classs_one_vs_rest_tests():
    rng = np.random.default_rng(2)
    logits = rng.normal(0.0, 2.0, size=(2000, 4))
    labels = (logits / 2 + rng.gumbel(size=logits.shape)).argmax(axis=1)
    per_class = metrics.per_class_calibration_tests(logits, labels, from_logits=True)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    for k in range(4):
        expected = calibration_tests.calibration_tests(probabilities[:, k], (labels == k).astype(float))
        for name, value in expected.items():
            assert per_class[name][k] == pytest.approx(value, rel=1e-9, abs=1e-15), (name, k)
    assert all(len(values) == 4 for values in per_class.values())


def test_per_class_tests_on_request_in_evaluate():
    logits, labels = binary_set(800, seed=3)
    plain = workflows.evaluate(logits, labels)
    assert "per_class_tests" not in plain
    document = workflows.fit_document(logits, labels)
    report = workflows.evaluate(logits, labels, calibrator_document=document, per_class_tests=True)
    for group in ("uncalibrated", "calibrated"):
        tests = report["per_class_tests"][group]
        assert len(tests["spiegelhalter_p"]) == 2
        # class 1 of a binary model is its positive class
        assert tests["spiegelhalter_z"][1] == pytest.approx(
            report[group]["spiegelhalter_z_positive_class"], rel=1e-9
        )


def test_a_class_without_rows_leaves_its_figures_undefined():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])
    labels = np.array([0, 1, 1, 0])
    per_class = metrics.per_class_calibration_tests(probabilities, labels)
    assert per_class["calibration_slope"][2] is None  # no row of class 2: no slope to fit
    assert all(v is None or math.isfinite(v) for values in per_class.values() for v in values)
