"""The reliability bins a fit stores (``fit.reliability``): those of the fit data before and after calibration,
as :func:`service.core.metrics.reliability_bins` computes them; checked on upload; absent from old documents."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from service import workflows
from service.core import metrics
from service.errors import InvalidInput


def assert_same_bins(stored: dict, expected: metrics.ReliabilityBins) -> None:
    assert stored["counts"] == expected.counts.tolist()
    for key in ("mean_confidence", "accuracy"):
        values = np.array([np.nan if value is None else value for value in stored[key]])
        # empty bins are null in both; a mean differs by float64 rounding at most
        np.testing.assert_allclose(values, getattr(expected, key), rtol=1e-12, atol=1e-15)


def expected_bins(document: dict, logits: np.ndarray, labels: np.ndarray, segments=None):
    calibrator = workflows.load_calibrator(document)
    if segments is not None:
        probabilities = calibrator.transform_segments(logits, segments)[0]
    else:
        probabilities = calibrator.transform(logits)
    before = metrics.reliability_bins(logits, labels, from_logits=True)
    return before, metrics.reliability_bins(probabilities, labels)


@pytest.mark.parametrize("method", ["temperature", "vector", "isotonic", "histogram"])
def test_a_fit_stores_the_bins_of_its_data_before_and_after(reference_data, method):
    data = reference_data("netcal_wrn16-4_c10.npz")
    logits, labels = data["logits_val"][:3000], data["labels_val"][:3000]
    document = workflows.fit_document(logits, labels, method=method)
    stored = document["fit"]["reliability"]
    assert stored.keys() == {"kind", "binning", "n_bins", "before", "after"}
    assert (stored["kind"], stored["binning"], stored["n_bins"]) == ("top_label", "width", 15)
    before, after = expected_bins(document, logits, labels)
    assert_same_bins(stored["before"], before)
    assert_same_bins(stored["after"], after)
    # the figures keep their keys (the bins are not among them), and their ECE is that of the bins
    assert "reliability" not in document["fit"]["before"] and "reliability" not in document["fit"]["after"]
    report = workflows.stored_reliability(document)
    assert report["calibrated"]["ece"] == pytest.approx(document["fit"]["after"]["ece"], rel=1e-12)
    assert report["uncalibrated"]["ece"] == pytest.approx(before.ece, rel=1e-12)
    assert report["n"] == 3000 and report["reliability"]["calibrated"]["edges"][-1] == 1.0
    workflows.load_calibrator(document)  # its own bins pass the upload's checks


def test_the_bins_of_a_large_fit_come_from_the_second_thread_and_agree():
    """Above 1 MB of logits the 'before' figures (and so their bins) are computed alongside the fit."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((60_000, 10))
    labels = (base + rng.gumbel(size=base.shape)).argmax(axis=1)
    logits = (3.0 * base).astype(np.float32)
    assert logits.nbytes >= 1 << 20
    document = workflows.fit_document(logits, labels, method="isotonic")
    before, after = expected_bins(document, logits, labels)
    assert_same_bins(document["fit"]["reliability"]["before"], before)
    assert_same_bins(document["fit"]["reliability"]["after"], after)


def test_binary_one_column_and_segment_temperature_fits_store_their_bins():
    rng = np.random.default_rng(4)
    logit = rng.normal(0.0, 3.0, size=(2000, 1))
    labels = (rng.random(2000) < 1 / (1 + np.exp(-logit[:, 0] / 2))).astype(int)
    document = workflows.fit_document(logit, labels, method="platt")
    two = np.concatenate([np.zeros_like(logit), logit], axis=1)  # the softmax of (0, z) is the sigmoid
    before, after = expected_bins(document, logit, labels)
    assert_same_bins(
        document["fit"]["reliability"]["before"], metrics.reliability_bins(two, labels, from_logits=True)
    )
    assert_same_bins(document["fit"]["reliability"]["after"], after)
    assert sum(before.counts) == 2000

    logits = rng.normal(0.0, 3.0, size=(3000, 4))
    labels = (logits / 2 + rng.gumbel(size=logits.shape)).argmax(axis=1)
    segments = ["shop" if i % 3 else "app" for i in range(3000)]
    document = workflows.fit_document(logits, labels, method="segment_temperature", segments=segments)
    before, after = expected_bins(document, logits, labels, segments=segments)
    assert_same_bins(document["fit"]["reliability"]["before"], before)
    assert_same_bins(document["fit"]["reliability"]["after"], after)


def small_document() -> dict:
    rng = np.random.default_rng(9)
    logits = rng.normal(0.0, 2.0, size=(500, 3))
    labels = (logits + rng.gumbel(size=logits.shape)).argmax(axis=1)
    return workflows.fit_document(logits, labels)


def test_an_old_document_without_bins_loads_and_has_no_stored_diagram():
    document = small_document()
    del document["fit"]["reliability"]
    workflows.load_calibrator(document)
    assert workflows.stored_reliability(document) is None
    assert workflows.stored_reliability({"method": "temperature", "temperature": 1.0}) is None


def with_reliability(document: dict, change) -> dict:
    changed = copy.deepcopy(document)
    change(changed["fit"]["reliability"])
    return changed


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update(n_bins=14), "must be a list of 14 values"),
        (lambda r: r.update(n_bins=True), "n_bins must be an integer"),
        (lambda r: r.update(binning="mass"), "equal-width top-label bins"),
        (lambda r: r.update(before=None, after=None), "needs the bins"),
        (lambda r: r["after"].update(counts=[-1, *r["after"]["counts"][1:]]), "sample counts"),
        (
            lambda r: r["after"]["counts"].__setitem__(14, r["after"]["counts"][14] + 1),
            "not the fit's n = 500",
        ),
        (lambda r: r["after"]["accuracy"].__setitem__(14, 1.5), "accuracy[14] must be a number in [0, 1]"),
        (
            lambda r: r["after"]["mean_confidence"].__setitem__(14, 0.5),
            "mean_confidence[14] must be a number",
        ),
        (lambda r: r["after"]["accuracy"].__setitem__(14, None), "accuracy[14] must be a number"),
        (lambda r: r["before"]["mean_confidence"].__setitem__(0, 0.01), "mean_confidence[0] must be null"),
        (lambda r: r["after"]["mean_confidence"].__setitem__(14, float("nan")), "must be a number"),
        (lambda r: r.__setitem__("after", [1, 2]), "must be an object"),
    ],
)
def test_a_document_with_malformed_bins_is_refused(change, message):
    document = small_document()
    assert document["fit"]["reliability"]["before"]["counts"][0] == 0  # 3 classes: no confidence below 1/3
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")) as refused:
        workflows.load_calibrator(with_reliability(document, change))
    assert refused.value.field.startswith("fit.reliability")


def test_a_document_with_only_the_after_bins_is_accepted_and_drawn_alone():
    document = with_reliability(small_document(), lambda r: r.pop("before"))
    workflows.load_calibrator(document)
    report = workflows.stored_reliability(document)
    assert list(report["reliability"]) == ["calibrated"] and "uncalibrated" not in report
