"""ECE under peers' conventions (issue #15): each reproduces that library's number on the same data to 1e-7.

Differential against the installed libraries: torchmetrics (multiclass and binary), scikit-learn's
``calibration_curve``, netcal's ``ECE`` and Kumar et al.'s ``uncertainty-calibration`` (skipped where they
cannot be imported), and Guo et al.'s reference ``_ECELoss`` (github.com/gpleiss/temperature_scaling, copied
below: it is not a package). Real data from tests/data, float32 and float64, and the edge cases where the
conventions part: confidences of exactly 1.0, confidences on bin edges, N not a multiple of the bin count.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.calibration import calibration_curve
from torchmetrics.functional.classification import binary_calibration_error, multiclass_calibration_error

from service.core import metrics
from service.core.ece_conventions import CONVENTIONS, torch_linspace
from service.errors import InvalidInput

TOLERANCE = 1e-7
DATA_SETS = [
    "netcal_wrn16-4_c10.npz",
    "kumar_vgg16_c10.npz",
    "netcal_lenet5_c10.npz",
    "netcal_densenet-bc-100_c100.npz",
]


def ours(probabilities, labels, convention, **options) -> float:
    return metrics.expected_calibration_error(probabilities, labels, convention=convention, **options)


# ------------------------------------------------------------------------------------ the peers themselves


def torchmetrics_ece(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    k = probabilities.shape[1]
    return float(
        multiclass_calibration_error(
            torch.from_numpy(probabilities), torch.from_numpy(labels), num_classes=k, n_bins=n_bins
        )
    )


def sklearn_ece(confidence: np.ndarray, outcome: np.ndarray, n_bins: int = 15) -> float:
    """calibration_curve's bin means, weighted by its bins' counts (its binids: searchsorted on inner edges)."""
    prob_true, prob_pred = calibration_curve(outcome.astype(int), confidence, n_bins=n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], confidence), minlength=n_bins)
    counts = counts[counts > 0]
    return float(np.sum(counts / confidence.size * np.abs(prob_true - prob_pred)))


def guo_ece(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """_ECELoss.forward of gpleiss/temperature_scaling (temperature_scaling.py), on probabilities."""
    softmaxes, labels_t = torch.from_numpy(probabilities), torch.from_numpy(labels)
    bin_boundaries = torch.linspace(0, 1, n_bins + 1)
    bin_lowers, bin_uppers = bin_boundaries[:-1], bin_boundaries[1:]
    confidences, predictions = torch.max(softmaxes, 1)
    accuracies = predictions.eq(labels_t)
    ece = torch.zeros(1, device=softmaxes.device)
    for bin_lower, bin_upper in zip(bin_lowers, bin_uppers, strict=True):
        in_bin = confidences.gt(bin_lower.item()) * confidences.le(bin_upper.item())
        prop_in_bin = in_bin.float().mean()
        if prop_in_bin.item() > 0:
            accuracy_in_bin = accuracies[in_bin].float().mean()
            avg_confidence_in_bin = confidences[in_bin].mean()
            ece += torch.abs(avg_confidence_in_bin - accuracy_in_bin) * prop_in_bin
    return float(ece)


def netcal_ece(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    netcal = pytest.importorskip("netcal.metrics")
    return float(netcal.ECE(bins=n_bins).measure(probabilities, labels))


def kumar_ece(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Their equal-mass estimator, lower_bound_scaling_ce(p=2, debias=True, get_equal_bins): what their
    get_calibration_error calls on continuous scores (on scores with fewer than N/4 distinct values it
    switches to one bin per value, get_binning_ce; the convention is the equal-mass estimator)."""
    calibration = pytest.importorskip("calibration")
    return float(
        calibration.lower_bound_scaling_ce(
            probabilities, labels, p=2, debias=True, num_bins=n_bins, mode="top-label"
        )
    )


def top_label(probabilities: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions = probabilities.argmax(axis=1)
    return probabilities[np.arange(labels.size), predictions], predictions == labels


PEERS = {
    "torchmetrics": torchmetrics_ece,
    "sklearn": lambda p, y, n_bins=15: sklearn_ece(*top_label(p, y), n_bins=n_bins),
    "netcal": netcal_ece,
    "guo2017": guo_ece,
    "kumar2019": kumar_ece,
}


def probabilities_of(logits: np.ndarray, dtype) -> np.ndarray:
    """Softmax in float64, then the dtype the peer gets (float32 rows renormalised in float32)."""
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    p = np.exp(shifted)
    p = (p / p.sum(axis=1, keepdims=True)).astype(dtype)
    return p / p.sum(axis=1, keepdims=True, dtype=dtype)


# ------------------------------------------------------------------------------------------- real data


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", list(PEERS))
@pytest.mark.parametrize("name", DATA_SETS)
def test_each_convention_reproduces_its_library_on_real_data(reference_data, name, convention, dtype):
    data = reference_data(name)
    probabilities = probabilities_of(data["logits_test"], dtype)
    labels = data["labels_test"].astype(np.int64)
    expected = PEERS[convention](probabilities, labels)
    assert ours(probabilities, labels, convention) == pytest.approx(expected, abs=TOLERANCE)


def test_the_default_is_unchanged(reference_data):
    data = reference_data("netcal_wrn16-4_c10.npz")
    logits, labels = data["logits_test"], data["labels_test"]
    assert metrics.expected_calibration_error(logits, labels, from_logits=True) == ours(
        logits, labels, "calibserve", from_logits=True
    )


# ------------------------------------------------------------------------------------------ edge cases


def grid_probabilities(n: int, seed: int, dtype, steps: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Binary rows [1 - c, c] with c on a grid of 1/30: every other value is an edge of 15 bins, and
    1.0 and 0.5 (a tie, to the lowest class) are among them."""
    rng = np.random.default_rng(seed)
    c = rng.integers(0, steps + 1, n) / steps
    c[:3] = [1.0, 0.0, 0.5]
    probabilities = np.stack([1.0 - c, c], axis=1).astype(dtype)
    labels = (rng.uniform(size=n) < c).astype(np.int64)
    return probabilities, labels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("convention", ["torchmetrics", "sklearn", "guo2017", "kumar2019"])
def test_ties_on_bin_edges_and_a_confidence_of_one(convention, dtype):
    probabilities, labels = grid_probabilities(3000, seed=1, dtype=dtype)
    expected = PEERS[convention](probabilities, labels)
    assert ours(probabilities, labels, convention) == pytest.approx(expected, abs=TOLERANCE)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_netcal_on_ties_scores_the_positive_class(dtype):
    """Two labels: netcal bins p_1 against y (not the top label), after clipping to [eps, 1 - eps]."""
    probabilities, labels = grid_probabilities(3000, seed=2, dtype=dtype)
    assert ours(probabilities, labels, "netcal") == pytest.approx(
        netcal_ece(probabilities, labels), abs=TOLERANCE
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binary_positive_class_conventions(dtype):
    probabilities, labels = grid_probabilities(2000, seed=3, dtype=dtype)
    p1 = probabilities[:, 1]
    expected = float(binary_calibration_error(torch.from_numpy(p1), torch.from_numpy(labels), n_bins=15))
    assert ours(probabilities, labels, "torchmetrics", kind="positive_class") == pytest.approx(
        expected, abs=TOLERANCE
    )
    assert ours(probabilities, labels, "sklearn", kind="positive_class") == pytest.approx(
        sklearn_ece(p1, labels == 1), abs=TOLERANCE
    )


@pytest.mark.parametrize("n", [40, 41, 57, 100, 449])
def test_kumar_equal_mass_bins_for_any_n(n):
    """np.array_split bins: calibserve's quantile-edge equal-mass bins agree only when M divides N."""
    rng = np.random.default_rng(n)
    logits = rng.normal(0.0, 2.0, size=(n, 4))
    labels = (logits + rng.gumbel(size=logits.shape)).argmax(axis=1)
    probabilities = probabilities_of(logits, np.float64)
    assert ours(probabilities, labels, "kumar2019") == pytest.approx(
        kumar_ece(probabilities, labels), abs=TOLERANCE
    )


def n40() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 2.0, size=(40, 4))
    labels = (logits + rng.gumbel(size=logits.shape)).argmax(axis=1)
    return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), labels


ON_EDGE = [[0.8, 0.2, 0.0], [0.76, 0.24, 0.0], [0.82, 0.18, 0.0], [0.2, 0.3, 0.5], [0.2, 0.3, 0.5]]
DOCUMENTED = {
    # name: (probabilities, labels, {convention: ECE}) -- the table of docs/ece-conventions.md
    "a confidence of 1.0": (
        np.array([[1.0, 0.0, 0.0], [0.95, 0.05, 0.0], [0.5, 0.3, 0.2], [0.1, 0.2, 0.7]]),
        np.array([1, 0, 0, 2]),
        {
            "calibserve": 0.4375,
            "torchmetrics": 0.4625,
            "sklearn": 0.4375,
            "netcal": 0.4375,
            "guo2017": 0.4375,
        },
    ),
    "on the edge 0.8 (float64)": (
        np.array(ON_EDGE),
        np.array([0, 1, 0, 2, 1]),
        {"calibserve": 0.148, "torchmetrics": 0.228, "sklearn": 0.148, "netcal": 0.228, "guo2017": 0.148},
    ),
    "on the edge 0.8 (float32)": (
        np.array(ON_EDGE, dtype=np.float32),
        np.array([0, 1, 0, 2, 1]),
        {"calibserve": 0.148, "torchmetrics": 0.228, "sklearn": 0.228, "netcal": 0.228, "guo2017": 0.148},
    ),
    "0.6, an ulp above torch's edge": (
        np.array([[0.6, 0.4], [0.58, 0.42], [0.62, 0.38]]),
        np.array([1, 0, 0]),
        {"calibserve": 0.186667, "torchmetrics": 0.213333, "sklearn": 0.186667, "guo2017": 0.213333},
    ),
    "binary, scores near 0.5": (
        np.array([[0.52, 0.48], [0.48, 0.52], [0.9, 0.1], [0.2, 0.8]]),
        np.array([1, 1, 0, 0]),
        {"calibserve": 0.235, "torchmetrics": 0.235, "sklearn": 0.235, "netcal": 0.475, "guo2017": 0.235},
    ),
    "N = 40, M = 15": (*n40(), {"calibserve": 0.098702, "kumar2019": 0.0}),
}


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_the_documented_differences(name):
    """Each row of the table in docs/ece-conventions.md, and each peer's own number on it."""
    probabilities, labels, expected = DOCUMENTED[name]
    for convention, value in expected.items():
        assert ours(probabilities, labels, convention) == pytest.approx(value, abs=1e-6), convention
        if convention in PEERS:
            assert PEERS[convention](probabilities, labels) == pytest.approx(value, abs=1e-6), convention


def test_calibserve_equal_mass_bins_are_not_kumars_at_n_40():
    probabilities, labels = n40()
    ours_mass = metrics.expected_calibration_error(probabilities, labels, binning="mass", debiased=True)
    assert ours_mass == pytest.approx(0.171802, abs=1e-6)
    assert ours(probabilities, labels, "kumar2019") == 0.0


def test_torch_linspace_is_torchs():
    for n_bins in (1, 9, 10, 15, 100):
        for dtype, torch_dtype in ((np.float32, torch.float32), (np.float64, torch.float64)):
            np.testing.assert_array_equal(
                torch_linspace(n_bins, np.dtype(dtype)),
                torch.linspace(0, 1, n_bins + 1, dtype=torch_dtype).numpy(),
            )


@settings(max_examples=40, deadline=None)
@given(
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=5, max_value=300),
    st.integers(min_value=0, max_value=2**31 - 1),
    st.sampled_from([np.float32, np.float64]),
)
def test_torchmetrics_and_sklearn_on_random_grids(n_bins, n, seed, dtype):
    """Scores on a grid of 1/(2 M) (half of them bin edges), any bin count."""
    probabilities, labels = grid_probabilities(n, seed, dtype, steps=2 * n_bins)
    for convention in ("torchmetrics", "sklearn", "guo2017"):
        expected = PEERS[convention](probabilities, labels, n_bins=n_bins)
        assert ours(probabilities, labels, convention, n_bins=n_bins) == pytest.approx(
            expected, abs=TOLERANCE
        ), convention


# --------------------------------------------------------------------------------------------- options


def test_conventions_refuse_options_they_do_not_have():
    probabilities, labels = grid_probabilities(100, seed=4, dtype=np.float64)
    for options in ({"binning": "mass"}, {"norm": "l2"}, {"sample_weight": np.ones(100)}):
        with pytest.raises(InvalidInput, match="convention"):
            ours(probabilities, labels, "torchmetrics", **options)
    with pytest.raises(InvalidInput, match="convention"):
        ours(probabilities, labels, "pandas")
    with pytest.raises(InvalidInput, match="top-label only"):
        ours(probabilities, labels, "guo2017", kind="positive_class")
    assert set(CONVENTIONS) == {"calibserve", *PEERS}
