"""Binning-free calibration errors (issue #15): smECE against relplot, and Gupta et al.'s KS error."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service import workflows
from service.core import metrics, smooth_calibration

relplot_metrics = pytest.importorskip("relplot.metrics")

DATA_SETS = [
    "netcal_wrn16-4_c10.npz",
    "kumar_vgg16_c10.npz",
    "netcal_lenet5_c10.npz",
    "netcal_densenet-bc-100_c100.npz",
]


def confidences_of(data: dict, part: str = "test") -> tuple[np.ndarray, np.ndarray]:
    return relplot_metrics.multiclass_logits_to_confidences(
        data[f"logits_{part}"].astype(np.float64), data[f"labels_{part}"]
    )


@pytest.mark.parametrize("name", DATA_SETS)
def test_smece_is_relplots_on_real_data(reference_data, name):
    """smECE with the automatic bandwidth, and the bandwidth itself, as relplot computes them."""
    data = reference_data(name)
    for part in ("val", "test"):
        f, y = confidences_of(data, part)
        expected, expected_sigma = relplot_metrics.smECE(f, y, return_width=True)
        value, sigma = smooth_calibration.smooth_ece(f, y)
        assert sigma == expected_sigma
        assert value == pytest.approx(expected, abs=1e-6, rel=1e-9)


@pytest.mark.parametrize("sigma", [0.001, 0.01, 0.05, 0.3])
def test_smece_at_a_fixed_bandwidth_is_relplots(reference_data, sigma):
    f, y = confidences_of(reference_data("netcal_lenet5_c10.npz"))
    assert smooth_calibration.smooth_ece_at(f, y, sigma) == pytest.approx(
        relplot_metrics.smECE_sigma(f, y, sigma), abs=1e-9
    )


def test_the_report_carries_ece_smooth_and_ece_ks(reference_data):
    data = reference_data("netcal_wrn16-4_c10.npz")
    report = metrics.calibration_report(data["logits_test"], data["labels_test"], from_logits=True)
    f, y = confidences_of(data)
    assert report["ece_smooth"] == pytest.approx(relplot_metrics.smECE(f, y), abs=1e-6)
    assert report["ece_ks"] == pytest.approx(gupta_ks(f, y), abs=1e-12)
    assert "smECE" in report["conventions"]["ece_smooth"]
    assert "Gupta" in report["conventions"]["ece_ks"]
    weighted = metrics.calibration_report(
        data["logits_test"], data["labels_test"], from_logits=True, sample_weight=np.ones(len(y))
    )
    assert "ece_smooth" not in weighted and "ece_ks" not in weighted


def gupta_ks(scores: np.ndarray, correct: np.ndarray) -> float:
    """Gupta et al. 2021's KS error, as their code computes it: cumulative scores against cumulative
    accuracy, sorted by score."""
    order = np.argsort(scores, kind="stable")
    n = scores.size
    integrated_scores = np.cumsum(scores[order]) / n
    integrated_accuracy = np.cumsum(correct[order]) / n
    return float(np.max(np.abs(integrated_scores - integrated_accuracy)))


@pytest.mark.parametrize("name", DATA_SETS)
def test_ece_ks_is_the_ks_statistic_before_its_scaling(reference_data, name):
    """ece_ks (an error, in probability units) = ks_calibration (a test statistic) x sigma."""
    data = reference_data(name)
    report = metrics.calibration_report(data["logits_test"], data["labels_test"], from_logits=True)
    f, y = confidences_of(data)
    sigma = math.sqrt(float(np.sum(f * (1 - f)))) / f.size
    assert report["ece_ks"] == pytest.approx(gupta_ks(f, y), abs=1e-12)
    assert report["ece_ks"] == pytest.approx(report["ks_calibration"] * sigma, rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=2, max_value=400), st.integers(min_value=0, max_value=2**31 - 1))
def test_binning_free_errors_are_in_range_and_vanish_for_calibrated_data(n, seed):
    rng = np.random.default_rng(seed)
    f = rng.uniform(0.0, 1.0, n)
    y = (rng.uniform(size=n) < f).astype(float)
    value, sigma = smooth_calibration.smooth_ece(f, y)
    assert 0.0 <= value <= 1.0 and 0.0 < sigma <= 1.0
    assert 0.0 <= smooth_calibration.ks_calibration_error(f, y) <= 1.0
    # y = 1 exactly when f = 1 and 0 when f = 0: no miscalibration at all
    ends = np.repeat([0.0, 1.0], n)
    assert smooth_calibration.ks_calibration_error(ends, ends) == 0.0


def test_evaluate_has_a_smoothed_diagram_per_group(reference_data):
    data = reference_data("kumar_vgg16_c10.npz")
    document = workflows.fit_document(data["logits_val"], data["labels_val"])
    report = workflows.evaluate(data["logits_test"], data["labels_test"], calibrator_document=document)
    for group in ("uncalibrated", "calibrated"):
        curve = report["reliability_smooth"][group]
        assert len(curve["mesh"]) == len(curve["accuracy"]) == len(curve["density"]) == 200
        assert curve["ece_smooth"] == pytest.approx(report[group]["ece_smooth"], abs=1e-15)
        assert all(0.0 <= a <= 1.0 for a in curve["accuracy"])
        assert np.mean(curve["density"]) == pytest.approx(1.0)
    assert report["calibrated"]["ece_smooth"] < report["uncalibrated"]["ece_smooth"]
