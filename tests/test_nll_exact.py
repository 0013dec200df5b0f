"""One NLL everywhere (issue #15): exact by default, infinite where a true class has probability 0.

The library answered ``inf`` while the CLI, ``/evaluate`` and ``/v1/metrics`` answered a finite number (the
probabilities went through ``log(max(p, 1e-300))`` on their way to logits) under ``conventions.nll:
"exact"``. Now every path scores the probabilities as given: the exact NLL is infinite (JSON ``null``, with
the rows in ``nll_infinite_rows``), and the clipped NLL comes only with ``nll_clip`` (CLI ``--nll-clip``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson
import pytest
from sklearn.metrics import log_loss

from service import workflows
from service.core import metrics
from tests.helpers.cli import run_all

# row 0's true class has probability 0; the others are ordinary
PROBABILITIES = np.array([[1.0, 0.0], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]])
LABELS = np.array([1, 1, 0, 1])
CLIP = 1e-15


def clipped_nll(clip: float = CLIP) -> float:
    """scikit-learn's way: clip p_y to [eps, 1 - eps], then log (the closed form, by hand)."""
    p_y = PROBABILITIES[np.arange(LABELS.size), LABELS]
    return float(np.mean(-np.log(np.clip(p_y, clip, 1.0 - clip))))


def test_the_library_is_exact_and_names_the_rows():
    assert metrics.negative_log_likelihood(PROBABILITIES, LABELS) == math.inf
    report = metrics.calibration_report(PROBABILITIES, LABELS)
    assert report["nll"] == math.inf
    assert report["nll_infinite_rows"] == [0]
    assert report["conventions"]["nll"] == "exact"
    clipped = metrics.calibration_report(PROBABILITIES, LABELS, nll_clip=CLIP)
    assert clipped["nll"] == pytest.approx(clipped_nll(), rel=1e-12)
    assert "nll_infinite_rows" not in clipped
    assert clipped["conventions"]["nll"].startswith("clipped")
    # a finite NLL has no list of rows
    assert "nll_infinite_rows" not in metrics.calibration_report(PROBABILITIES[1:], LABELS[1:])


def test_the_clipped_nll_is_sklearn_log_loss():
    """scikit-learn's log_loss clips at eps (and renormalises rows, which these already are)."""
    probabilities = PROBABILITIES.copy()
    report = metrics.calibration_report(probabilities, LABELS, nll_clip=1e-7)
    p_y = probabilities[np.arange(LABELS.size), LABELS]
    assert report["nll"] == pytest.approx(-np.mean(np.log(np.clip(p_y, 1e-7, 1 - 1e-7))), rel=1e-12)
    assert log_loss(LABELS, np.clip(probabilities, 1e-7, 1 - 1e-7), labels=[0, 1]) == pytest.approx(
        report["nll"], rel=1e-6
    )


def test_evaluate_scores_probabilities_as_given():
    report = workflows.evaluate(PROBABILITIES, LABELS, from_logits=False, bootstrap=40)
    figures = report["uncalibrated"]
    assert figures["nll"] == math.inf and figures["nll_infinite_rows"] == [0]
    assert report["conventions"]["nll"] == "exact"
    # the interval of an NLL that is infinite in some resamples reaches infinity (not NaN)
    low, high = report["intervals"]["uncalibrated"]["nll"]
    assert math.isfinite(low) and high == math.inf
    # the other figures are those of the probabilities themselves
    assert figures["brier"] == pytest.approx(metrics.brier_score(PROBABILITIES, LABELS), rel=1e-12)
    assert figures["ece"] == pytest.approx(
        metrics.expected_calibration_error(PROBABILITIES, LABELS), rel=1e-12
    )
    clipped = workflows.evaluate(PROBABILITIES, LABELS, from_logits=False, nll_clip=CLIP)
    assert clipped["uncalibrated"]["nll"] == pytest.approx(clipped_nll(), rel=1e-12)
    assert clipped["conventions"]["nll"].startswith("clipped")


def test_a_threshold_on_an_infinite_nll_that_came_through_json():
    report = workflows.evaluate(PROBABILITIES, LABELS, from_logits=False)
    through_json = orjson.loads(orjson.dumps(report))
    assert through_json["uncalibrated"]["nll"] is None
    for each in (report, through_json):
        (check,) = workflows.check_thresholds(each, ["nll>5"])
        assert check["status"] == "fail" and check["value"] == math.inf


def binary_isotonic() -> tuple[dict, np.ndarray, np.ndarray]:
    """An isotonic calibrator that learnt P(y=1) = 0 below 0, and rows it gives a true class of 0."""
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(2000, 1))
    # floor 0: the plain isotonic curve (the default floor keeps every class above 0)
    document = workflows.fit_document(
        logits, (logits[:, 0] > 0).astype(int), method="isotonic", options={"floor": 0}
    )
    return document, np.array([[-5.0], [5.0], [-6.0]]), np.array([1, 1, 0])


def test_the_calibrated_figures_are_exact():
    document, logits, labels = binary_isotonic()
    report = workflows.evaluate(logits, labels, calibrator_document=document)
    assert report["calibrated"]["nll"] == math.inf
    assert report["calibrated"]["nll_infinite_rows"] == [0]
    assert math.isfinite(report["uncalibrated"]["nll"])
    assert report["drift"]["change"]["calibrated"]["nll"] == math.inf


def test_temperature_scaling_keeps_an_exact_finite_nll_where_probabilities_underflow():
    """softmax(z / T) underflows to 0 for a true class 3e4 below the top, but its log is -3e4 / T."""
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 2.0, size=(500, 3))
    labels = (logits + rng.gumbel(size=logits.shape)).argmax(axis=1)
    logits[0] = [3e4, 0.0, 0.0]
    labels[0] = 1
    document = workflows.fit_document(logits, labels)
    temperature = document["temperature"]
    report = workflows.evaluate(logits, labels, calibrator_document=document)
    expected = metrics.negative_log_likelihood(logits / temperature, labels, from_logits=True)
    assert report["calibrated"]["nll"] == pytest.approx(expected, rel=1e-12)
    assert report["calibrated"]["nll"] > 3e4 / temperature / 500  # the floor would have said 690.8 / 500
    assert document["fit"]["after"]["nll"] == pytest.approx(expected, rel=1e-12)


def test_fit_time_figures_are_exact_too():
    document, logits, labels = binary_isotonic()
    _, after = workflows.fit_time_figures(workflows.load_calibrator(document), logits, labels)
    assert after["nll"] == math.inf and after["nll_infinite_rows"] == [0]
    # the stored document says null, and drift against it stays a number where it can
    assert orjson.loads(orjson.dumps(after))["nll"] is None


# ------------------------------------------------------------------------------------------------- CLI


def test_cli_evaluate_is_exact_unless_asked(tmp_path: Path):
    np.save(tmp_path / "p.npy", PROBABILITIES)
    np.save(tmp_path / "y.npy", LABELS)
    data = ["--probabilities", "p.npy", "--labels", "y.npy"]
    runs = run_all(
        {
            "exact": ["evaluate", *data, "--fail-on", "nll>5", "--out", "exact.json", "--out", "exact.md"],
            "clipped": ["evaluate", *data, "--nll-clip", "1e-15", "--out", "clipped.json"],
        },
        tmp_path,
    )
    assert runs["exact"].returncode == 1, runs["exact"].stderr  # an infinite NLL breaches nll>5
    exact = orjson.loads((tmp_path / "exact.json").read_bytes())
    assert exact["uncalibrated"]["nll"] is None and exact["uncalibrated"]["nll_infinite_rows"] == [0]
    assert exact["thresholds"][0]["status"] == "fail"
    assert "inf" in (tmp_path / "exact.md").read_text()
    assert runs["clipped"].returncode == 0, runs["clipped"].stderr
    clipped = orjson.loads((tmp_path / "clipped.json").read_bytes())
    assert clipped["uncalibrated"]["nll"] == pytest.approx(clipped_nll(), rel=1e-12)
    assert clipped["conventions"]["nll"].startswith("clipped")


def test_cli_ece_convention_and_its_gate(tmp_path: Path):
    """``--ece-convention torchmetrics`` adds ece_torchmetrics, which --fail-on can gate on."""
    probabilities = np.array([[1.0, 0.0, 0.0], [0.95, 0.05, 0.0], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7]])
    np.save(tmp_path / "p.npy", probabilities)
    np.save(tmp_path / "y.npy", np.array([1, 0, 0, 2]))
    data = ["--probabilities", "p.npy", "--labels", "y.npy"]
    runs = run_all(
        {
            "gate": [
                *("evaluate", *data, "--ece-convention", "torchmetrics"),
                *("--fail-on", "ece_torchmetrics>0.45", "--fail-on", "ece>0.45", "--out", "conv.json"),
            ]
        },
        tmp_path,
    )
    assert runs["gate"].returncode == 1, runs["gate"].stderr
    report = orjson.loads((tmp_path / "conv.json").read_bytes())
    assert report["uncalibrated"]["ece_torchmetrics"] == pytest.approx(0.4625, abs=1e-7)  # float32
    assert report["uncalibrated"]["ece"] == pytest.approx(0.4375, abs=1e-12)
    assert [check["status"] for check in report["thresholds"]] == ["fail", "pass"]
