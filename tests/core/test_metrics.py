"""Calibration metrics: differential against torchmetrics and scikit-learn, properties, conventions, errors."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from service.core import metrics, validation
from service.core.metrics import (
    accuracy,
    bootstrap_interval,
    brier_score,
    calibration_report,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    overconfidence_error,
    reliability_bins,
    underconfidence_error,
)
from service.core.probability import log_softmax, softmax
from service.errors import InvalidInput
from tests.helpers.numerics import EPS32

NORMS = ("l1", "l2", "max")
# torchmetrics bins and sums float32 confidences in float32; ours sums in float64. Its ECE (a weighted mean of
# |confidence - accuracy| over bins, terms in [0, 1]) thus carries float32 rounding of O(1) terms, an absolute
# error of a few EPS32 for its blocked sums at these N (measured: at most 2 EPS32); 32 EPS32 allowed.
TORCHMETRICS_ABS = 32 * EPS32


def _random_scores(n: int, k: int, seed: int, scale: float = 2.0, dtype=np.float64):
    """Logits, probabilities (softmax) and labels drawn so that a model is over-confident."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(n, k))
    probabilities = softmax(logits)
    # labels follow a flattened version of the model's own probabilities: a miscalibrated model
    flattened = softmax(logits / 2.0)
    labels = (rng.random(n)[:, None] > np.cumsum(flattened, axis=1)).sum(axis=1)
    return logits.astype(dtype), probabilities.astype(dtype), np.minimum(labels, k - 1)


# ---------------------------------------------------------------------------------- torchmetrics


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize(("n", "k", "seed"), [(2000, 10, 0), (3000, 3, 1), (500, 100, 2)])
def test_top_label_matches_torchmetrics_multiclass(norm: str, n: int, k: int, seed: int) -> None:
    _, probabilities, labels = _random_scores(n, k, seed, dtype=np.float32)
    expected = multiclass_calibration_error(
        torch.from_numpy(probabilities), torch.from_numpy(labels), num_classes=k, n_bins=15, norm=norm
    ).item()

    ours = expected_calibration_error(probabilities, labels, norm=norm)

    assert ours == pytest.approx(expected, abs=TORCHMETRICS_ABS)
    assert ours > 0.01  # the data are miscalibrated: the comparison is not between two zeros


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_positive_class_matches_torchmetrics_binary(norm: str, n_bins: int) -> None:
    _, probabilities, labels = _random_scores(2500, 2, seed=3, dtype=np.float32)
    positive = np.ascontiguousarray(probabilities[:, 1])
    expected = binary_calibration_error(
        torch.from_numpy(positive), torch.from_numpy(labels), n_bins=n_bins, norm=norm
    ).item()

    from_one_column = expected_calibration_error(
        positive[:, None], labels, kind="positive_class", norm=norm, n_bins=n_bins
    )
    from_two_columns = expected_calibration_error(
        probabilities, labels, kind="positive_class", norm=norm, n_bins=n_bins
    )

    assert from_one_column == pytest.approx(expected, abs=TORCHMETRICS_ABS)
    assert from_two_columns == pytest.approx(expected, abs=TORCHMETRICS_ABS)


def test_maximum_calibration_error_is_the_max_norm() -> None:
    _, probabilities, labels = _random_scores(1500, 5, seed=4, dtype=np.float32)
    expected = multiclass_calibration_error(
        torch.from_numpy(probabilities), torch.from_numpy(labels), num_classes=5, n_bins=15, norm="max"
    ).item()
    assert maximum_calibration_error(probabilities, labels) == pytest.approx(expected, abs=TORCHMETRICS_ABS)
    assert maximum_calibration_error(probabilities, labels) == expected_calibration_error(
        probabilities, labels, norm="max"
    )


def test_torch_tensors_are_accepted() -> None:
    logits, probabilities, labels = _random_scores(300, 4, seed=5, dtype=np.float32)
    tensor_result = expected_calibration_error(torch.from_numpy(probabilities), torch.from_numpy(labels))
    assert tensor_result == expected_calibration_error(probabilities, labels)
    assert negative_log_likelihood(
        torch.from_numpy(logits), torch.from_numpy(labels), from_logits=True
    ) == negative_log_likelihood(logits, labels, from_logits=True)


# -------------------------------------------------------------------------------------- scikit-learn


@pytest.mark.parametrize("k", [2, 3, 10])
def test_nll_matches_sklearn_log_loss(k: int) -> None:
    logits, probabilities, labels = _random_scores(1000, k, seed=6)
    weights = np.random.default_rng(6).random(1000)
    sklearn_loss = log_loss(labels, probabilities, labels=range(k))

    assert negative_log_likelihood(probabilities, labels) == pytest.approx(sklearn_loss, rel=1e-12)
    assert negative_log_likelihood(logits, labels, from_logits=True) == pytest.approx(sklearn_loss, rel=1e-12)
    assert negative_log_likelihood(probabilities, labels, sample_weight=weights) == pytest.approx(
        log_loss(labels, probabilities, labels=range(k), sample_weight=weights), rel=1e-12
    )


def test_clipped_nll_matches_sklearn_on_zero_probabilities() -> None:
    probabilities = np.array([[1.0, 0.0], [0.3, 0.7], [0.0, 1.0], [0.5, 0.5]])
    labels = np.array([1, 1, 1, 0])
    eps = float(np.finfo(np.float64).eps)

    assert negative_log_likelihood(probabilities, labels) == math.inf
    assert negative_log_likelihood(probabilities, labels, clip=eps) == pytest.approx(
        log_loss(labels, probabilities), rel=1e-12
    )
    # the clipped loss is finite and bounded by -log(eps)
    assert negative_log_likelihood(probabilities, labels, clip=1e-3) < -math.log(1e-3)


def test_nll_from_logits_is_exact_where_probabilities_underflow() -> None:
    logits = np.array([[0.0, -800.0, 5.0], [1e4, -1e4, 0.0]])
    labels = np.array([1, 1])
    expected = -log_softmax(logits)[np.arange(2), labels].mean()  # about 805 and exactly 2e4 nats

    assert negative_log_likelihood(logits, labels, from_logits=True) == pytest.approx(expected, rel=1e-15)
    assert expected == pytest.approx((805.0 + math.log1p(math.exp(-5.0)) + 2e4) / 2.0, rel=1e-12)


def test_binary_brier_is_twice_sklearn_brier_score_loss() -> None:
    _, probabilities, labels = _random_scores(1000, 2, seed=7)
    weights = np.random.default_rng(7).random(1000)
    positive = probabilities[:, 1]

    assert brier_score(positive[:, None], labels) == pytest.approx(
        2.0 * brier_score_loss(labels, positive), rel=1e-12
    )
    assert brier_score(probabilities, labels) == pytest.approx(
        2.0 * brier_score_loss(labels, positive), rel=1e-12
    )
    assert brier_score(probabilities, labels, sample_weight=weights) == pytest.approx(
        2.0 * brier_score_loss(labels, positive, sample_weight=weights), rel=1e-12
    )


def test_multiclass_brier_matches_its_definition() -> None:
    _, probabilities, labels = _random_scores(400, 7, seed=8, dtype=np.float32)
    one_hot = np.eye(7)[labels]
    expected = ((probabilities.astype(np.float64) - one_hot) ** 2).sum(axis=1).mean()
    assert brier_score(probabilities, labels) == pytest.approx(expected, rel=1e-12)


def test_accuracy_matches_argmax() -> None:
    logits, probabilities, labels = _random_scores(500, 6, seed=9)
    assert accuracy(probabilities, labels) == np.mean(probabilities.argmax(axis=1) == labels)
    assert accuracy(logits, labels, from_logits=True) == accuracy(probabilities, labels)


@pytest.mark.parametrize("n_bins", [5, 10, 15])
def test_width_bins_match_sklearn_calibration_curve(n_bins: int) -> None:
    _, probabilities, labels = _random_scores(2000, 2, seed=10)
    prob_true, prob_pred = calibration_curve(labels, probabilities[:, 1], n_bins=n_bins, strategy="uniform")

    bins = reliability_bins(probabilities, labels, kind="positive_class", n_bins=n_bins)
    nonempty = bins.counts > 0

    np.testing.assert_allclose(bins.accuracy[nonempty], prob_true, rtol=1e-12)
    np.testing.assert_allclose(bins.mean_confidence[nonempty], prob_pred, rtol=1e-12)


@pytest.mark.parametrize(("n", "n_bins"), [(2000, 10), (1500, 15), (999, 9)])
def test_mass_bins_match_sklearn_quantile_calibration_curve(n: int, n_bins: int) -> None:
    # comparable where N is a multiple of M and the confidences are distinct: then both give N/M per bin
    _, probabilities, labels = _random_scores(n, 2, seed=11)
    prob_true, prob_pred = calibration_curve(labels, probabilities[:, 1], n_bins=n_bins, strategy="quantile")

    bins = reliability_bins(probabilities, labels, kind="positive_class", n_bins=n_bins, binning="mass")

    np.testing.assert_array_equal(bins.counts, n // n_bins)
    np.testing.assert_allclose(bins.accuracy, prob_true, rtol=1e-12)
    np.testing.assert_allclose(bins.mean_confidence, prob_pred, rtol=1e-12)


# --------------------------------------------------------------------------------- bin conventions


def test_bin_edges_are_closed_on_the_right() -> None:
    # positive-class confidences exactly on edges of 15 bins: i/15 falls in bin i - 1, 0 in bin 0, 1 in 14
    confidences = np.array([0.0, 1 / 15, 2 / 15, 7 / 15, 14 / 15, 1.0, np.nextafter(1 / 15, 1.0)])
    labels = np.zeros(confidences.size, dtype=int)
    bins = reliability_bins(confidences[:, None], labels, kind="positive_class", n_bins=15)

    expected_counts = np.zeros(15, dtype=int)
    for bin_index in (0, 0, 1, 6, 13, 14, 1):
        expected_counts[bin_index] += 1
    np.testing.assert_array_equal(bins.counts, expected_counts)
    np.testing.assert_array_equal(bins.edges, np.arange(16) / 15)  # exactly i / 15, the convention's edges


def test_top_label_confidence_on_an_edge_goes_to_the_bin_below() -> None:
    # 15 classes at 1/15 each: the confidence is exactly the first edge
    probabilities = np.full((3, 15), 1 / 15)
    bins = reliability_bins(probabilities, np.array([0, 1, 2]), n_bins=15)
    assert bins.counts[0] == 3
    assert bins.mean_confidence[0] == pytest.approx(1 / 15)
    assert bins.accuracy[0] == pytest.approx(1 / 3)  # argmax ties go to class 0, right once in three


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_bins", [1, 3, 7, 10, 15, 49, 100])
def test_values_next_to_every_edge_are_binned_like_searchsorted(dtype, n_bins: int) -> None:
    # the edges in the input's precision, each with its two neighbouring floats
    edges = (np.arange(n_bins + 1) / n_bins).astype(dtype)
    around = np.concatenate([edges, np.nextafter(edges, dtype(0)), np.nextafter(edges, dtype(1))])
    confidences = np.clip(around, 0, 1).astype(dtype)
    expected_ids = np.maximum(np.searchsorted(edges, confidences, side="left") - 1, 0)

    bins = reliability_bins(
        confidences[:, None], np.zeros(confidences.size, dtype=int), kind="positive_class", n_bins=n_bins
    )

    np.testing.assert_array_equal(bins.counts, np.bincount(expected_ids, minlength=n_bins))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.integers(1, 20),
    block_rows=st.integers(1, 9),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_validation_top_label_equals_numpy_argmax_and_max_ties_included(
    n, k, block_rows, seed, dtype
) -> None:
    # small integer counts normalised per row: many rows have several columns tied at their maximum
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 3, size=(n, k)).astype(np.float64)
    counts[counts.sum(axis=1) == 0, 0] = 1.0
    probabilities = (counts / counts.sum(axis=1, keepdims=True)).astype(dtype)
    with pytest.MonkeyPatch.context() as patch:  # many blocks, and a short last one, even for a few rows
        patch.setattr(validation, "_NARROW_BLOCK_ROWS", block_rows)
        checked, argmax, maxima = validation.check_probabilities_top_label(probabilities)

    assert checked is probabilities or np.array_equal(checked, probabilities)
    if argmax is not None:
        np.testing.assert_array_equal(argmax, probabilities.argmax(axis=1))  # numpy: lowest index on ties
    if maxima is not None:
        np.testing.assert_array_equal(maxima, probabilities.max(axis=1))
    scores = metrics._Scores(probabilities, np.zeros(n, dtype=np.intp), predictions=argmax, maxima=maxima)
    np.testing.assert_array_equal(scores.predictions, probabilities.argmax(axis=1))
    np.testing.assert_array_equal(scores.confidences, probabilities.max(axis=1))


@pytest.mark.parametrize(
    ("row", "value", "message"),
    [(0, np.nan, "NaN or Inf at row 0"), (6, -0.1, "row 6 does not"), (7, np.inf, "NaN or Inf at row 7")],
)
def test_narrow_scan_names_the_first_bad_row_in_any_block(row: int, value: float, message: str) -> None:
    probabilities = np.full((9, 4), 0.25, dtype=np.float32)
    probabilities[row, 1] = value
    with pytest.MonkeyPatch.context() as patch, pytest.raises(InvalidInput, match=re.escape(message)):
        patch.setattr(validation, "_NARROW_BLOCK_ROWS", 4)
        validation.check_probabilities_top_label(probabilities)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_binning_equals_one_pass(chunk: int) -> None:
    _, probabilities, labels = _random_scores(1000, 6, seed=21, dtype=np.float32)
    # confidences on and next to edges, where the chunked loop has to search
    probabilities[:50] = np.float32(1 / 6)
    options = [{"kind": "top_label"}, {"kind": "classwise"}, {"norm": "l2"}, {"norm": "max"}]
    expected = [expected_calibration_error(probabilities, labels, n_bins=15, **o) for o in options]
    expected_bins = reliability_bins(probabilities, labels, n_bins=15)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(metrics, "_CHUNK", chunk)
        chunked = [expected_calibration_error(probabilities, labels, n_bins=15, **o) for o in options]
        chunked_bins = reliability_bins(probabilities, labels, n_bins=15)
    assert chunked == pytest.approx(expected, rel=1e-12, abs=1e-15)
    np.testing.assert_array_equal(chunked_bins.counts, expected_bins.counts)
    np.testing.assert_allclose(chunked_bins.accuracy, expected_bins.accuracy, rtol=1e-12)
    # and both against the plain definition: searchsorted bins, float64 sums
    confidences = probabilities.max(axis=1)
    edges = (np.arange(16) / 15).astype(np.float32)
    ids = np.maximum(np.searchsorted(edges, confidences, side="left") - 1, 0)
    np.testing.assert_array_equal(chunked_bins.counts, np.bincount(ids, minlength=15))
    correct = probabilities.argmax(axis=1) == labels
    gaps = [abs(confidences[ids == b].astype(np.float64).sum() - correct[ids == b].sum()) for b in range(15)]
    assert chunked[0] == pytest.approx(sum(gaps) / len(labels), rel=1e-9)


def test_mass_bins_keep_ties_together() -> None:
    confidences = np.array([0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.7, 0.8, 0.9, 1.0])
    labels = np.array([0, 1, 0, 1, 0, 1, 1, 1, 1, 1])
    bins = reliability_bins(confidences[:, None], labels, kind="positive_class", n_bins=5, binning="mass")

    # the 0.2s fill what would be bins 0-2: equal confidences share one bin and the others are empty
    np.testing.assert_array_equal(bins.counts, [6, 0, 0, 2, 2])
    assert bins.edges[0] == 0.0 and bins.edges[-1] == 1.0
    np.testing.assert_allclose(bins.edges[1:-1], [0.2, 0.2, 0.2, 0.8])
    assert bins.to_dict()["accuracy"][1] is None


def test_classwise_is_the_mean_of_per_class_positive_class_errors() -> None:
    _, probabilities, labels = _random_scores(800, 4, seed=12)
    weights = np.random.default_rng(12).random(800)
    for binning in ("width", "mass"):
        for norm in NORMS:
            per_class = [
                expected_calibration_error(
                    probabilities[:, [k]],
                    (labels == k).astype(np.int64),
                    kind="positive_class",
                    binning=binning,
                    norm=norm,
                    sample_weight=weights,
                )
                for k in range(4)
            ]
            classwise = expected_calibration_error(
                probabilities, labels, kind="classwise", binning=binning, norm=norm, sample_weight=weights
            )
            assert classwise == pytest.approx(np.mean(per_class), rel=1e-12)


def _kumar_debiased_l2(confidences, outcomes, n_bins):
    """Restatement of Kumar et al. (2019) unbiased_l2_ce on width bins, one bin at a time."""
    total = 0.0
    for b in range(n_bins):
        low, high = b / n_bins, (b + 1) / n_bins
        inside = (confidences > low) & (confidences <= high) if b else (confidences <= high)
        n_b = inside.sum()
        if n_b < 2:
            continue
        acc = outcomes[inside].mean()
        gap = confidences[inside].mean() - acc
        total += n_b / confidences.size * (gap**2 - acc * (1 - acc) / (n_b - 1))
    return math.sqrt(max(total, 0.0))


@pytest.mark.parametrize(("n", "seed"), [(40, 13), (500, 14), (5000, 15)])
def test_debiased_matches_the_kumar_estimator(n: int, seed: int) -> None:
    _, probabilities, labels = _random_scores(n, 3, seed)
    confidences = probabilities.max(axis=1)
    outcomes = (probabilities.argmax(axis=1) == labels).astype(float)

    debiased = expected_calibration_error(probabilities, labels, debiased=True)

    assert debiased == pytest.approx(_kumar_debiased_l2(confidences, outcomes, 15), rel=1e-12, abs=1e-15)
    assert debiased < expected_calibration_error(probabilities, labels, norm="l2")


def test_debiased_is_zero_not_nan_when_the_correction_exceeds_the_error() -> None:
    # perfectly calibrated bins with sampling noise: the variance term wins and the estimate clamps at 0
    probabilities = np.array([[0.5, 0.5]] * 4)
    assert expected_calibration_error(probabilities, np.array([0, 1, 0, 1]), debiased=True) == 0.0


# ---------------------------------------------------------------------------------------- properties


@st.composite
def labelled_scores(draw, max_n: int = 30, max_k: int = 5):
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 5.0, 50.0]))
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(n, k))
    labels = rng.integers(0, max(k, 2), size=n)
    return logits, labels, rng


binning_options = st.fixed_dictionaries(
    {
        "n_bins": st.integers(1, 20),
        "binning": st.sampled_from(["width", "mass"]),
        "kind": st.sampled_from(["top_label", "classwise"]),
    }
)


@settings(max_examples=50, deadline=None)
@given(labelled_scores(), binning_options)
def test_errors_are_ordered_and_bounded(data, options) -> None:
    logits, labels, _ = data
    l1 = expected_calibration_error(logits, labels, from_logits=True, **options)
    l2 = expected_calibration_error(logits, labels, from_logits=True, norm="l2", **options)
    mce = maximum_calibration_error(logits, labels, from_logits=True, **options)
    debiased = expected_calibration_error(logits, labels, from_logits=True, debiased=True, **options)

    assert 0.0 <= l1 <= l2 + 1e-12 <= mce + 2e-12 <= 1.0 + 2e-12  # power means of the same gaps
    assert 0.0 <= debiased <= 1.0


@settings(max_examples=50, deadline=None)
@given(labelled_scores(), binning_options)
def test_over_and_underconfidence_add_up_to_the_ece(data, options) -> None:
    logits, labels, _ = data
    ece = expected_calibration_error(logits, labels, from_logits=True, **options)
    over = overconfidence_error(logits, labels, from_logits=True, **options)
    under = underconfidence_error(logits, labels, from_logits=True, **options)

    assert over >= 0.0 and under >= 0.0
    assert over + under == pytest.approx(ece, abs=1e-12)
    if options["kind"] == "top_label":
        bins = reliability_bins(logits, labels, from_logits=True, **options)
        assert (bins.ece, bins.overconfidence, bins.underconfidence) == pytest.approx((ece, over, under))


@settings(max_examples=50, deadline=None)
@given(labelled_scores(), binning_options, st.sampled_from(NORMS))
def test_permutation_invariance(data, options, norm) -> None:
    logits, labels, rng = data
    order = rng.permutation(labels.size)
    weights = rng.random(labels.size) + 0.01
    original = expected_calibration_error(
        logits, labels, from_logits=True, norm=norm, sample_weight=weights, **options
    )
    permuted = expected_calibration_error(
        logits[order], labels[order], from_logits=True, norm=norm, sample_weight=weights[order], **options
    )
    assert permuted == pytest.approx(original, abs=1e-12)
    assert brier_score(logits[order], labels[order], from_logits=True) == pytest.approx(
        brier_score(logits, labels, from_logits=True), rel=1e-12
    )


@settings(max_examples=50, deadline=None)
@given(labelled_scores(), binning_options)
def test_logits_path_equals_probabilities_path(data, options) -> None:
    logits, labels, _ = data
    probabilities = softmax(logits)

    assert expected_calibration_error(
        logits, labels, from_logits=True, **options
    ) == expected_calibration_error(probabilities, labels, **options)
    assert brier_score(logits, labels, from_logits=True) == brier_score(probabilities, labels)
    assert accuracy(logits, labels, from_logits=True) == accuracy(probabilities, labels)
    if probabilities.min() > 1e-300:  # where no probability underflows, the two NLLs agree
        assert negative_log_likelihood(logits, labels, from_logits=True) == pytest.approx(
            negative_log_likelihood(probabilities, labels), rel=1e-9
        )


def _all_figures(scores, labels, options, **kwargs) -> list[float]:
    return [
        expected_calibration_error(scores, labels, from_logits=True, **options, **kwargs),
        expected_calibration_error(scores, labels, from_logits=True, norm="l2", **options, **kwargs),
        expected_calibration_error(scores, labels, from_logits=True, debiased=True, **options, **kwargs),
        maximum_calibration_error(scores, labels, from_logits=True, **options, **kwargs),
        overconfidence_error(scores, labels, from_logits=True, **options, **kwargs),
        brier_score(scores, labels, from_logits=True, **kwargs),
        negative_log_likelihood(scores, labels, from_logits=True, **kwargs),
        accuracy(scores, labels, from_logits=True, **kwargs),
    ]


@settings(max_examples=50, deadline=None)
@given(labelled_scores(), binning_options)
def test_unit_weights_equal_no_weights(data, options) -> None:
    logits, labels, _ = data
    weighted = _all_figures(logits, labels, options, sample_weight=np.ones(labels.size))
    assert weighted == pytest.approx(_all_figures(logits, labels, options), abs=1e-12)


@settings(max_examples=50, deadline=None)
@given(labelled_scores(max_n=20), binning_options)
def test_integer_weights_equal_repeated_rows(data, options) -> None:
    logits, labels, rng = data
    counts = rng.integers(0, 4, size=labels.size)
    counts[0] = max(counts[0], 1)  # not all zero
    repeated = np.repeat(np.arange(labels.size), counts)

    weighted = _all_figures(logits, labels, options, sample_weight=counts)
    assert weighted == pytest.approx(_all_figures(logits[repeated], labels[repeated], options), abs=1e-12)


# ------------------------------------------------------------------------- reliability bins and report


def test_reliability_bins_are_consistent_and_json_ready() -> None:
    logits, _, labels = _random_scores(300, 5, seed=16)
    bins = reliability_bins(logits, labels, from_logits=True, n_bins=20)

    assert bins.edges.shape == (21,) and bins.counts.shape == (20,)
    assert bins.counts.sum() == 300
    assert bins.proportions.sum() == pytest.approx(1.0)
    empty = bins.counts == 0
    assert empty.any(), "softmax of 5 classes never gives confidence below 1/5: the low bins are empty"
    assert np.isnan(bins.accuracy[empty]).all() and np.isnan(bins.mean_confidence[empty]).all()
    nonempty = ~empty
    centres_ok = (bins.mean_confidence[nonempty] > bins.edges[:-1][nonempty]) & (
        bins.mean_confidence[nonempty] <= bins.edges[1:][nonempty]
    )
    assert centres_ok.all()
    assert bins.ece == expected_calibration_error(logits, labels, from_logits=True, n_bins=20)
    assert bins.mce == maximum_calibration_error(logits, labels, from_logits=True, n_bins=20)

    document = bins.to_dict()
    text = json.dumps(document, allow_nan=False)  # NaN would fail: empty bins must be null
    assert json.loads(text)["accuracy"][0] is None
    assert document["counts"] == bins.counts.tolist()

    with pytest.raises(dataclasses.FrozenInstanceError):
        bins.ece = 0.0  # type: ignore[misc]
    with pytest.raises(ValueError, match="read-only"):
        bins.counts[0] = 1


def test_reliability_bins_reject_classwise() -> None:
    with pytest.raises(InvalidInput, match="kind"):
        reliability_bins(np.array([[0.2, 0.8]]), np.array([1]), kind="classwise")


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_report_agrees_with_the_single_figure_functions(binning: str) -> None:
    logits, _, labels = _random_scores(700, 4, seed=17, dtype=np.float32)
    weights = np.random.default_rng(17).random(700)
    kwargs = {"from_logits": True, "sample_weight": weights}

    report = calibration_report(logits, labels, n_bins=12, binning=binning, **kwargs)

    expected = {
        "ece": expected_calibration_error(logits, labels, n_bins=12, binning=binning, **kwargs),
        "mce": maximum_calibration_error(logits, labels, n_bins=12, binning=binning, **kwargs),
        "ece_l2": expected_calibration_error(logits, labels, n_bins=12, binning=binning, norm="l2", **kwargs),
        "ece_debiased": expected_calibration_error(
            logits, labels, n_bins=12, binning=binning, debiased=True, **kwargs
        ),
        "ece_mass": expected_calibration_error(logits, labels, n_bins=12, binning="mass", **kwargs),
        "ece_classwise": expected_calibration_error(
            logits, labels, n_bins=12, binning=binning, kind="classwise", **kwargs
        ),
        "overconfidence": overconfidence_error(logits, labels, n_bins=12, binning=binning, **kwargs),
        "underconfidence": underconfidence_error(logits, labels, n_bins=12, binning=binning, **kwargs),
        "brier": brier_score(logits, labels, **kwargs),
        "nll": negative_log_likelihood(logits, labels, **kwargs),
        "accuracy": accuracy(logits, labels, **kwargs),
    }
    for name, value in expected.items():
        assert report[name] == value, name
        assert type(report[name]) is float, name
    assert report["n"] == 700
    assert "ece_positive_class" not in report
    assert report["conventions"]["binning"] == binning
    assert report["conventions"]["n_bins"] == 12
    assert report["conventions"]["kind"] == "top_label"
    assert report["conventions"]["norm"] == "l1"
    assert report["conventions"]["nll"] == "exact"
    json.dumps(report, allow_nan=False)


def test_report_of_a_binary_model_has_the_positive_class_ece() -> None:
    logits, _, labels = _random_scores(400, 1, seed=18)
    labels = np.random.default_rng(18).integers(0, 2, 400)
    report = calibration_report(logits, labels, from_logits=True)
    assert report["ece_positive_class"] == expected_calibration_error(
        logits, labels, from_logits=True, kind="positive_class"
    )


def test_extreme_logits_give_finite_figures_without_warnings() -> None:
    logits = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 1e4], [0.0, 0.0, -1e4]], dtype=np.float32)
    labels = np.array([0, 2, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = calibration_report(logits, labels, from_logits=True)
        bins = reliability_bins(logits, labels, from_logits=True).to_dict()
    figures = [value for value in report.values() if isinstance(value, float)]
    assert all(math.isfinite(value) for value in figures)
    assert report["nll"] == pytest.approx((0.0 + math.log(2.0) + math.log(2.0)) / 3.0, rel=1e-12)
    assert json.dumps(bins, allow_nan=False)
    # the one-sided 1e4 logit gives probability exactly 1 and an exact log-loss of 2e4 for the wrong label
    assert negative_log_likelihood(np.array([[1e4, -1e4]]), np.array([1]), from_logits=True) == 2e4


# ------------------------------------------------------------------------------------------ bootstrap


@pytest.mark.parametrize(
    ("metric", "kwargs"),
    [
        (expected_calibration_error, {}),
        (expected_calibration_error, {"binning": "mass", "norm": "l2"}),
        (expected_calibration_error, {"kind": "classwise", "debiased": True}),
        (maximum_calibration_error, {"n_bins": 10}),
        (brier_score, {}),
        (negative_log_likelihood, {}),
        (accuracy, {}),
        (overconfidence_error, {}),
    ],
)
def test_bootstrap_fast_path_equals_resampling_rows(metric, kwargs) -> None:
    logits, _, labels = _random_scores(300, 4, seed=19)

    # a lambda is not recognised: it resamples rows and calls the metric each time
    def wrapped(p, y, **kw):
        return metric(p, y, **kw)

    method = "bca" if metric is expected_calibration_error else "percentile"
    options = {"n_resamples": 40, "seed": 5, "from_logits": True, "method": method, **kwargs}
    fast = bootstrap_interval(metric, logits, labels, **options)
    slow = bootstrap_interval(wrapped, logits, labels, **options)

    assert fast == pytest.approx(slow, abs=1e-12)
    low, high = fast  # unpacks as a pair
    assert (low, high) == (fast.low, fast.high)
    assert low < high


@pytest.mark.parametrize(
    "metric", [brier_score, negative_log_likelihood, accuracy, expected_calibration_error]
)
def test_bootstrap_interval_brackets_the_estimate(metric) -> None:
    logits, _, labels = _random_scores(1000, 4, seed=22)
    low, high = bootstrap_interval(metric, logits, labels, n_resamples=200, from_logits=True)
    assert low < metric(logits, labels, from_logits=True) < high


def test_bootstrap_interval_narrows_with_more_data_and_follows_the_seed() -> None:
    logits, _, labels = _random_scores(4000, 3, seed=20)
    small = bootstrap_interval(
        expected_calibration_error, logits[:250], labels[:250], n_resamples=200, from_logits=True
    )
    large = bootstrap_interval(expected_calibration_error, logits, labels, n_resamples=200, from_logits=True)
    assert large.high - large.low < (small.high - small.low) / 2

    again = bootstrap_interval(expected_calibration_error, logits, labels, n_resamples=200, from_logits=True)
    other = bootstrap_interval(
        expected_calibration_error, logits, labels, n_resamples=200, seed=1, from_logits=True
    )
    assert again == large
    assert other != large

    wide = bootstrap_interval(
        expected_calibration_error, logits, labels, n_resamples=200, confidence=0.99, from_logits=True
    )
    assert wide.low <= large.low and wide.high >= large.high


def test_bootstrap_with_sample_weight_uses_them() -> None:
    logits, _, labels = _random_scores(500, 3, seed=21)
    weights = np.where(np.arange(500) < 250, 1.0, 0.0)
    weighted = bootstrap_interval(
        brier_score, logits, labels, sample_weight=weights, n_resamples=50, from_logits=True
    )
    resampled_rows = bootstrap_interval(
        lambda p, y, sample_weight=None, **kw: brier_score(p, y, sample_weight=sample_weight, **kw),
        logits,
        labels,
        sample_weight=weights,
        n_resamples=50,
        from_logits=True,
    )
    assert weighted == pytest.approx(resampled_rows, abs=1e-12)


# -------------------------------------------------------------------------------------------- errors


PROBABILITIES = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]])
LABELS = np.array([1, 0, 1])


@pytest.mark.parametrize(
    ("call", "field", "message"),
    [
        (
            lambda: expected_calibration_error(np.array([[0.2, 0.8], [np.nan, 0.5]]), [1, 0]),
            "probabilities",
            "row 1",
        ),
        (lambda: expected_calibration_error(np.array([0.2, 0.8]), [1, 0]), "probabilities", "2-D"),
        (
            lambda: expected_calibration_error(PROBABILITIES, [1, 0]),
            "labels",
            "2 entries but the scores have 3",
        ),
        (lambda: expected_calibration_error(PROBABILITIES, [1, 0, 2]), "labels", "labels[2] = 2 is outside"),
        (lambda: expected_calibration_error(np.empty((0, 3)), []), "probabilities", "empty"),
        (
            lambda: expected_calibration_error(np.array([[0.2, 0.8], [0.6, 0.6]]), [1, 0]),
            "probabilities",
            "row 1 sums to 1.2",
        ),
        (
            lambda: expected_calibration_error(PROBABILITIES, LABELS, n_bins=0),
            "n_bins",
            "n_bins must be an integer >= 1",
        ),
        (
            lambda: expected_calibration_error(PROBABILITIES, LABELS, binning="log"),
            "binning",
            "binning must be one of width, mass",
        ),
        (
            lambda: expected_calibration_error(PROBABILITIES, LABELS, kind="marginal"),
            "kind",
            "kind must be one of",
        ),
        (lambda: expected_calibration_error(PROBABILITIES, LABELS, norm="l3"), "norm", "norm must be one of"),
        (
            lambda: expected_calibration_error(PROBABILITIES, LABELS, norm="l1", debiased=True),
            "debiased",
            "norm='l2'",
        ),
        (
            lambda: expected_calibration_error(np.eye(3), [0, 1, 2], kind="positive_class"),
            "kind",
            "binary model",
        ),
        (
            lambda: expected_calibration_error(PROBABILITIES, LABELS, sample_weight=[1, -1, 1]),
            "sample_weight",
            "sample_weight[1]",
        ),
        (lambda: negative_log_likelihood(PROBABILITIES, LABELS, clip=0.7), "clip", "clip must be"),
        (
            lambda: calibration_report(PROBABILITIES, LABELS, binning="quantile"),
            "binning",
            "binning must be one of",
        ),
        (
            lambda: bootstrap_interval(accuracy, PROBABILITIES, LABELS, confidence=1.5),
            "confidence",
            "confidence must be",
        ),
        (
            lambda: bootstrap_interval(accuracy, PROBABILITIES, LABELS, n_resamples=0),
            "n_resamples",
            "n_resamples must be",
        ),
        (lambda: brier_score(np.array([[0.2, 1.3]]), [1]), "probabilities", "must lie in [0, 1]: row 0"),
    ],
    ids=[
        "nan-row",
        "one-dimensional",
        "n-mismatch",
        "label-out-of-range",
        "empty",
        "row-sum",
        "zero-bins",
        "unknown-binning",
        "unknown-kind",
        "unknown-norm",
        "debiased-l1",
        "positive-class-of-three",
        "negative-weight",
        "bad-clip",
        "report-binning",
        "bad-confidence",
        "zero-resamples",
        "outside-unit-interval",
    ],
)
def test_bad_input_raises_invalid_input_naming_the_problem(call, field: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=re.escape(message)) as caught:
        call()
    assert caught.value.field == field


def test_nan_logits_name_their_row() -> None:
    logits = np.zeros((5, 3))
    logits[3, 1] = np.inf
    with pytest.raises(InvalidInput, match="logits contains NaN or Inf at row 3") as caught:
        calibration_report(logits, np.zeros(5, dtype=int), from_logits=True)
    assert caught.value.row == 3


def test_public_names_are_exported() -> None:
    for name in metrics.__all__:
        assert hasattr(metrics, name), name


def test_rows_of_zero_weight_do_not_count() -> None:
    # the first row's true class has probability 0 (an infinite loss) but weight 0: it must not turn into NaN
    probabilities = np.array([[1.0, 0.0], [0.3, 0.7], [0.9, 0.1]])
    labels = np.array([1, 1, 0])
    weights = np.array([0.0, 1.0, 3.0])
    kept = np.array([1, 2, 2, 2])

    assert negative_log_likelihood(probabilities, labels, sample_weight=weights) == pytest.approx(
        -(math.log(0.7) + 3 * math.log(0.9)) / 4, rel=1e-12
    )
    for function in (expected_calibration_error, maximum_calibration_error, brier_score, accuracy):
        assert function(probabilities, labels, sample_weight=weights) == pytest.approx(
            function(probabilities[kept], labels[kept]), rel=1e-12
        ), function.__name__


# ------------------------------------------------------------------------ the checked report's fast paths


@pytest.mark.parametrize("n_columns", [1, 2, 3, 10, 12, 20])
def test_blocked_softmax_with_top_label_equals_softmax_and_argmax(n_columns):
    rng = np.random.default_rng(5)
    logits = (rng.normal(0.0, 4.0, size=(40_000, n_columns))).astype(np.float32)
    logits[:50] = 1.5  # tied rows: the argmax is the lowest column
    probabilities, predictions, maxima = metrics._softmax_top_label(logits)
    expected = softmax(logits)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-14, atol=0)
    if predictions is not None:
        np.testing.assert_array_equal(predictions, expected.argmax(axis=1))
        np.testing.assert_array_equal(maxima, probabilities.max(axis=1))


@pytest.mark.parametrize("n_classes", [2, 7, 30])
def test_chunked_classwise_sums_equal_the_whole_array_ones(n_classes):
    rng = np.random.default_rng(6)
    probabilities = rng.dirichlet(np.full(n_classes, 0.3), size=50_000)
    probabilities[:20, 0] = 1.0 / 15  # on a bin edge
    probabilities[:20] /= probabilities[:20].sum(axis=1, keepdims=True)
    labels = rng.integers(0, n_classes, size=50_000)
    chunked = expected_calibration_error(probabilities, labels, kind="classwise")
    # unit weights take the path that bins the whole N x K array at once
    whole = expected_calibration_error(probabilities, labels, kind="classwise", sample_weight=np.ones(50_000))
    assert chunked == pytest.approx(whole, rel=1e-12, abs=1e-15)
    report = metrics.calibration_report(probabilities, labels)
    assert report["ece_classwise"] == pytest.approx(whole, rel=1e-12, abs=1e-15)


def test_checked_report_equals_the_validating_one():
    rng = np.random.default_rng(7)
    logits = (rng.normal(0.0, 3.0, size=(20_000, 6))).astype(np.float32)
    labels = rng.integers(0, 6, size=20_000)
    checked = metrics.calibration_report_checked(None, labels, logits=logits)
    validated = metrics.calibration_report(logits, labels, from_logits=True)
    assert checked.keys() == validated.keys()
    for name, value in validated.items():
        if isinstance(value, float):
            assert checked[name] == pytest.approx(value, rel=1e-12, abs=1e-15), name
        else:
            assert checked[name] == value, name
