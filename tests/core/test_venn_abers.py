"""Venn-Abers calibration (IVAP): the fast algorithm against isotonic regression run once per test object,
against the ``venn-abers`` package on the real sets of tests/data, and its properties."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression

from service.core.calibrators import VennAbersCalibration, calibrator_from_dict, make_calibrator
from service.core.calibrators.venn_abers import VENN_ABERS_MAX_GRID, rival_margins, venn_abers_curve
from service.errors import InvalidInput

REAL_SETS = ["netcal_lenet5_c10.npz", "kumar_vgg16_c10.npz", "netcal_wrn16-4_c10.npz"]


def isotonic_at(scores, targets, weights, s: float, label: int) -> float:
    """The definition: isotonic regression of the calibration set with (s, label) of weight 1 added, at s."""
    w = np.ones_like(scores) if weights is None else weights
    regression = IsotonicRegression().fit(
        np.append(scores, s), np.append(targets, label), sample_weight=np.append(w, 1.0)
    )
    return float(regression.predict([s])[0])


def lookup(grid, p0, p1, s):
    return p0[np.searchsorted(grid, s, side="right")], p1[np.searchsorted(grid, s, side="left")]


@settings(max_examples=80, deadline=None)
@given(
    scores=hnp.arrays(np.float64, st.integers(1, 30), elements=st.integers(0, 9).map(float)),
    data=st.data(),
    weighted=st.booleans(),
)
def test_the_fast_algorithm_is_isotonic_regression_with_the_test_object(scores, data, weighted):
    # small integer scores: many ties, and test scores on and between the calibration scores
    n = scores.size
    targets = data.draw(hnp.arrays(np.float64, n, elements=st.sampled_from([0.0, 1.0])))
    weights = None
    if weighted:  # frequency weights, fractional ones and zeros included
        weights = data.draw(hnp.arrays(np.float64, n, elements=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5])))
        assume(weights.sum() > 0)
    grid, p0, p1 = venn_abers_curve(scores, targets, weights)
    assert p0.size == p1.size == grid.size + 1
    assert (np.diff(p0) >= 0).all() and (np.diff(p1) >= 0).all()
    for s in np.arange(-1.0, 10.5, 0.5):
        low, high = lookup(grid, p0, p1, s)
        assert low == pytest.approx(isotonic_at(scores, targets, weights, s, 0), abs=1e-12)
        assert high == pytest.approx(isotonic_at(scores, targets, weights, s, 1), abs=1e-12)
        assert low <= high


def binary_problem(reference_data, name: str):
    """A real binary problem from a multiclass set: the top class's margin over the runner-up, and whether
    the top class is right (fit half, test half)."""
    data = reference_data(name)

    def margin_and_hit(logits, labels):
        ordered = np.sort(logits.astype(np.float64), axis=1)
        return ordered[:, -1] - ordered[:, -2], (logits.argmax(axis=1) == labels).astype(int)

    return (
        *margin_and_hit(data["logits_val"], data["labels_val"]),
        *margin_and_hit(data["logits_test"], data["labels_test"]),
    )


@pytest.mark.parametrize("name", REAL_SETS)
def test_binary_matches_the_venn_abers_package_on_real_data(name, reference_data):
    venn_abers = pytest.importorskip("venn_abers")
    margin, hit, test_margin, _ = binary_problem(reference_data, name)
    fitted = VennAbersCalibration().fit(margin[:, None], hit)
    # the package reads column 1 as the score and only sorts it: give it the same margin
    reference = venn_abers.VennAbers().fit(np.stack([-margin, margin], axis=1), hit)
    for scores in (test_margin, margin):  # unseen scores, and scores equal to calibration scores (ties)
        theirs, their_bounds = reference.predict_proba(np.stack([-scores, scores], axis=1))
        ours = fitted.transform(scores[:, None])
        bounds = fitted.transform_intervals(scores[:, None])[:, 1, :]
        np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bounds, their_bounds, rtol=1e-12, atol=1e-12)
    # ours stores only the grid points where p0 or p1 changes
    assert fitted.grid_[0].size <= np.unique(margin).size


@pytest.mark.parametrize("name", ["netcal_lenet5_c10.npz", "kumar_vgg16_c10.npz"])
def test_multiclass_matches_the_packages_one_vs_rest_with_normalisation(name, reference_data):
    venn_abers = pytest.importorskip("venn_abers.venn_abers")
    data = reference_data(name)
    logits, labels, test_logits = data["logits_val"], data["labels_val"], data["logits_test"]
    fitted = VennAbersCalibration().fit(logits, labels)
    # the package takes each class's column as that class's score: give it our scores
    theirs, their_bounds = venn_abers.predict_proba_prefitted_va(
        rival_margins(logits), labels, rival_margins(test_logits), va_tpe="one_vs_rest"
    )
    np.testing.assert_allclose(fitted.transform(test_logits), theirs, rtol=1e-10, atol=1e-12)
    intervals = fitted.transform_intervals(test_logits)
    for k, bounds in enumerate(their_bounds):
        np.testing.assert_allclose(intervals[:, k, :], bounds, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", REAL_SETS)
def test_no_true_class_gets_probability_zero_and_export_agrees_on_real_sets(name, reference_data):
    data = reference_data(name)
    fitted = make_calibrator("venn_abers").fit(data["logits_val"], data["labels_val"])
    assert fitted.convergence_["converged"] and len(fitted.convergence_["grid_points"]) == 10
    rows = np.arange(len(data["labels_test"]))
    probabilities = fitted.transform(data["logits_test"])
    n = len(data["labels_val"])
    # each class's merged probability is at least 1 / (n + 2) before normalisation
    assert (probabilities[rows, data["labels_test"]] > 1 / (n + 2) / 10).all()
    for logits in (data["logits_test"], data["logits_val"]):  # val rows sit exactly on the grid
        for dtype in (torch.float64, torch.float32):
            exported = fitted.torch_module()(torch.tensor(logits, dtype=dtype)).double().numpy()
            tolerance = 1e-12 if dtype == torch.float64 else 1e-6
            np.testing.assert_allclose(exported, fitted.transform(logits), rtol=tolerance, atol=tolerance)
    scripted = torch.jit.script(fitted.torch_module())
    np.testing.assert_allclose(
        scripted(torch.tensor(data["logits_test"], dtype=torch.float64)).numpy(), probabilities, atol=1e-12
    )


@st.composite
def labelled(draw, max_columns: int = 5):
    n_columns = draw(st.integers(1, max_columns))
    n = draw(st.integers(4, 40))
    logits = draw(
        hnp.arrays(
            np.float64,
            (n, n_columns),
            elements=st.floats(-30.0, 30.0, allow_nan=False, allow_infinity=False, width=32),
        )
    )
    labels = draw(hnp.arrays(np.int64, n, elements=st.integers(0, max(n_columns, 2) - 1)))
    labels[:2] = [0, 1]
    return logits, labels


@settings(max_examples=60, deadline=None)
@given(data=labelled(), test=hnp.arrays(np.float64, (12,), elements=st.floats(-40, 40, width=32)))
def test_rows_sum_to_one_the_answer_lies_in_its_interval_and_export_matches(data, test):
    logits, labels = data
    fitted = VennAbersCalibration().fit(logits, labels)
    n_columns = logits.shape[1]
    queries = np.concatenate([logits, np.resize(test, (len(test) // n_columns, n_columns))])
    probabilities = fitted.transform(queries)
    intervals = fitted.transform_intervals(queries)
    assert probabilities.shape == (len(queries), max(n_columns, 2))
    assert intervals.shape == (*probabilities.shape, 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
    assert ((probabilities > 0) & (probabilities < 1)).all()
    low, high = intervals[..., 0], intervals[..., 1]
    assert (low <= high).all() and (low >= 0).all() and (high <= 1).all()
    if n_columns <= 2:  # binary: the answer lies in [p0, p1], for class 1 and (as 1 - p) for class 0
        assert (low <= probabilities + 1e-15).all() and (probabilities <= high + 1e-15).all()
    else:  # before the normalisation: p_k = p1_k / (1 - p0_k + p1_k) lies in [p0_k, p1_k]
        merged = high / (1.0 - low + high)
        assert (low <= merged + 1e-15).all() and (merged <= high + 1e-15).all()
        np.testing.assert_allclose(probabilities, merged / merged.sum(axis=1, keepdims=True), rtol=1e-12)
    exported = fitted.torch_module()(torch.as_tensor(queries)).numpy()
    np.testing.assert_allclose(exported, probabilities, rtol=1e-12, atol=1e-15)
    again = calibrator_from_dict(json.loads(json.dumps(fitted.to_dict())))
    np.testing.assert_array_equal(again.transform(queries), probabilities)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), slope=st.floats(-2.0, 3.0), shift=st.floats(-2.0, 2.0))
def test_binary_probability_is_non_decreasing_in_the_margin(seed, slope, shift):
    # the argmax rule: a binary answer is a threshold on the margin (not necessarily at 0), even when the
    # labels run against the margin
    rng = np.random.default_rng(seed)
    margin = rng.normal(scale=3.0, size=200)
    labels = (rng.random(200) < expit(slope * margin + shift)).astype(int)
    assume(0 < labels.sum() < 200)
    fitted = VennAbersCalibration().fit(margin[:, None], labels)
    grid = np.sort(np.concatenate([margin, np.linspace(-20, 20, 201)]))[:, None]
    positive = fitted.transform(grid)[:, 1]
    assert (np.diff(positive) >= 0).all()
    intervals = fitted.transform_intervals(grid)[:, 1, :]
    assert (np.diff(intervals, axis=0) >= 0).all()


def test_precision_rounds_the_scores_and_is_validated():
    rng = np.random.default_rng(3)
    margin = rng.normal(scale=3.0, size=2000)
    labels = (rng.random(2000) < expit(margin)).astype(int)
    exact = VennAbersCalibration().fit(margin[:, None], labels)
    rounded = VennAbersCalibration(precision=1).fit(margin[:, None], labels)
    assert rounded.grid_[0].size < exact.grid_[0].size
    assert (np.round(rounded.grid_[0], 1) == rounded.grid_[0]).all()
    reference = VennAbersCalibration().fit(np.round(margin, 1)[:, None], labels)
    np.testing.assert_allclose(
        rounded.transform(margin[:, None]), reference.transform(np.round(margin, 1)[:, None]), atol=1e-12
    )
    exported = rounded.torch_module()(torch.as_tensor(margin[:, None])).numpy()
    np.testing.assert_allclose(exported, rounded.transform(margin[:, None]), atol=1e-12)
    assert rounded.to_dict()["params"]["precision"] == 1
    for bad, message in ((-1, "precision must be an integer >= 0"), (16, "at most 15"), (1.5, "integer")):
        with pytest.raises(InvalidInput, match=message):
            VennAbersCalibration(precision=bad)
    with pytest.raises(InvalidInput, match=r"unknown option 'n_bins' for method 'venn_abers'.*precision"):
        make_calibrator("venn_abers", n_bins=10)


def test_frequency_weights_count_rows():
    rng = np.random.default_rng(4)
    margin = rng.normal(size=300)
    labels = (rng.random(300) < expit(margin)).astype(int)
    counts = rng.integers(0, 4, size=300)
    weighted = VennAbersCalibration().fit(margin[:, None], labels, sample_weight=counts.astype(float))
    repeated = VennAbersCalibration().fit(np.repeat(margin, counts)[:, None], np.repeat(labels, counts))
    queries = np.linspace(-3, 3, 61)[:, None]
    np.testing.assert_allclose(weighted.transform(queries), repeated.transform(queries), atol=1e-12)


def good_document() -> dict:
    rng = np.random.default_rng(5)
    margin = rng.normal(size=50)
    return (
        VennAbersCalibration()
        .fit(margin[:, None], (margin > 0.3).astype(int) ^ (rng.random(50) < 0.2))
        .to_dict()
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: p.update(grid=[[2.0, 1.0]], p0=[[0.0, 0.1, 0.2]], p1=[[0.5, 0.6, 1.0]]),
            "strictly increasing",
        ),
        (lambda p: p.update(p0=[p["p0"][0][:-1]]), "one entry more than grid"),
        (
            lambda p: p.update(p1=[[-0.1, *p["p1"][0][1:]]]),
            r"p1\[0\] must be non-decreasing values in \[0, 1\]",
        ),
        (lambda p: p.update(p0=[list(reversed(p["p0"][0]))]), r"p0\[0\] must be non-decreasing"),
        (lambda p: p.update(p0=[[0.0] + [0.99] * (len(p["p0"][0]) - 1)]), "p0 <= p1"),
        (lambda p: p.update(grid=[p["grid"][0], p["grid"][0]]), "must be a list of 1 lists"),
        (lambda p: p.update(grid=[[float("nan")] * len(p["grid"][0])]), "NaN or Inf"),
    ],
)
def test_malformed_documents_are_refused(change, message):
    document = good_document()
    change(document["params"])
    with pytest.raises(InvalidInput, match=message):
        calibrator_from_dict(document)


def test_the_document_size_is_bounded(monkeypatch):
    from service.core.calibrators import venn_abers

    monkeypatch.setattr(venn_abers, "VENN_ABERS_MAX_GRID", 3)
    rng = np.random.default_rng(6)
    margin = rng.normal(size=400)
    with pytest.raises(InvalidInput, match="above the limit of 3: round the scores with option precision"):
        VennAbersCalibration().fit(margin[:, None], (rng.random(400) < expit(2 * margin)).astype(int))
    assert VENN_ABERS_MAX_GRID == 1_000_000
