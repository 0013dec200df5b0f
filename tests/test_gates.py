"""``--fail-on`` gates beyond a figure's value (issue #15): bounds of bootstrap intervals and p-values."""

from __future__ import annotations

import numpy as np
import pytest

from service import workflows
from service.errors import InvalidInput


@pytest.fixture(scope="module")
def report() -> dict:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(2000, 4))
    labels = (logits / 2.0 + rng.gumbel(size=logits.shape)).argmax(axis=1)  # over-confident logits
    document = workflows.fit_document(logits[:1000], labels[:1000])
    return workflows.evaluate(logits[1000:], labels[1000:], calibrator_document=document, bootstrap=100)


@pytest.mark.parametrize(
    ("expression", "group", "metric", "bound"),
    [
        ("ece.upper>0.03", None, "ece", "upper"),
        ("calibrated.ece.upper>0.03", "calibrated", "ece", "upper"),
        ("uncalibrated.mce.lower >= 0.1", "uncalibrated", "mce", "lower"),
        ("spiegelhalter_p<0.01", None, "spiegelhalter_p", None),
        ("calibrated.ks_calibration_p<0.05", "calibrated", "ks_calibration_p", None),
    ],
)
def test_thresholds_parse(expression, group, metric, bound):
    threshold = workflows.Threshold.parse(expression)
    assert (threshold.group, threshold.metric, threshold.bound) == (group, metric, bound)


@pytest.mark.parametrize("expression", ["ece.middle>0.03", "ece.upper.lower>0.1", "calibrated.>0.1"])
def test_malformed_thresholds_are_refused(expression):
    with pytest.raises(InvalidInput, match=r"ece\.upper>0\.03"):
        workflows.Threshold.parse(expression)


def test_a_bound_reads_the_interval_of_its_group(report):
    checks = workflows.check_thresholds(
        report, ["ece.upper>0.0", "uncalibrated.ece.lower>1", "calibrated.brier.lower<1"]
    )
    upper, lower, brier = checks
    assert upper["group"] == "calibrated" and upper["value"] == report["intervals"]["calibrated"]["ece"][1]
    assert upper["status"] == "fail" and upper["interval"] == "basic"
    assert lower["value"] == report["intervals"]["uncalibrated"]["ece"][0] and lower["status"] == "pass"
    assert brier["interval"] == "percentile" and brier["status"] == "fail"


def test_a_bound_without_intervals_is_refused(report):
    without = {key: value for key, value in report.items() if key != "intervals"}
    with pytest.raises(InvalidInput, match="--bootstrap N"):
        workflows.check_thresholds(without, ["ece.upper>0.03"])
    with pytest.raises(InvalidInput, match="no bootstrap interval"):
        workflows.check_thresholds(report, ["ece_l2.upper>0.03"])


def test_a_p_value_gate_carries_its_test_and_statistic(report):
    (check,) = workflows.check_thresholds(report, ["uncalibrated.spiegelhalter_p<0.01"])
    assert check["test"] == "Spiegelhalter's Z test"
    assert check["statistic"] == "spiegelhalter_z"
    assert check["statistic_value"] == report["uncalibrated"]["spiegelhalter_z"]
    assert check["value"] == report["uncalibrated"]["spiegelhalter_p"]


def test_monitoring_rules_refuse_bounds():
    rule = workflows.parse_monitor_rule("ece.upper>0.05")
    with pytest.raises(InvalidInput, match="no bootstrap intervals"):
        workflows.monitoring_report({"figures": {"n": 10, "ece": 0.1}}, rules=[rule])
