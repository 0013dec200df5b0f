"""Calibrators: differential tests against scikit-learn and float64 references, real data, properties.

The real classifier outputs in ``tests/data`` (README there) give the reference temperatures and NLLs.
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_softmax
from scipy.special import softmax as scipy_softmax
from sklearn.calibration import CalibratedClassifierCV, calibration_curve
from sklearn.frozen import FrozenEstimator
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.utils.class_weight import compute_class_weight

from service.core.calibrators import (
    CALIBRATORS,
    BaseCalibrator,
    BetaCalibration,
    Calibrator,
    DirichletCalibration,
    EnsembleTemperatureScaling,
    HistogramBinning,
    IsotonicCalibration,
    MatrixScaling,
    PlattScaling,
    TemperatureScaling,
    VectorScaling,
    calibrator_from_dict,
    make_calibrator,
)
from service.core.calibrators.affine import DIRICHLET_CV_GRID
from service.errors import InvalidInput, NotFitted
from tests.helpers.peers import IdentityClassifier

BINARY_ONLY = frozenset(method for method, cls in CALIBRATORS.items() if cls._binary_only)

# Temperature and test-half NLL before -> after, from tests/data/README.md.
README_FIGURES = {
    "netcal_wrn16-4_c10.npz": (2.03915, 0.383129, 0.276111),
    "netcal_lenet5_c10.npz": (1.37627, 1.392503, 1.328826),
    "netcal_densenet-bc-100_c100.npz": (2.15776, 1.163642, 0.846913),
    "kumar_vgg16_c10.npz": (1.70262, 0.245448, 0.192989),
}


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, weights: Any = None) -> float:
    """Reference mean NLL of softmax(z / T), float64, with the single-column binary convention."""
    z = np.asarray(logits, dtype=np.float64)
    if z.shape[1] == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=1)
    log_p = log_softmax(z / temperature, axis=1)[np.arange(len(labels)), labels]
    return float(-np.average(log_p, weights=weights))


def nll_gradient(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Reference dNLL/dbeta at beta = 1/T: mean of E_p[z] - z_y, float64."""
    z = np.asarray(logits, dtype=np.float64)
    p = np.exp(log_softmax(z / temperature, axis=1))
    return float(np.mean((p * z).sum(axis=1) - z[np.arange(len(labels)), labels]))


def prob_nll(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.log(probabilities[np.arange(len(labels)), labels])))


def reference_temperature(logits: np.ndarray, labels: np.ndarray, weights: Any = None) -> float:
    """Bounded Brent search on log T of the float64 NLL: slow, obviously correct."""
    found = minimize_scalar(
        lambda log_t: nll(logits, labels, math.exp(log_t), weights),
        bounds=(math.log(0.05), math.log(100.0)),
        method="bounded",
        options={"xatol": 1e-12},
    )
    return math.exp(found.x)


def overconfident(n: int, k: int, *, seed: int, sharpness: float = 3.0, dtype: Any = np.float32):
    """Logits whose labels are drawn from softmax(z / sharpness): the best temperature is near sharpness."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, k))
    p = scipy_softmax(z / sharpness, axis=1)
    labels = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    return z.astype(dtype), labels


def two_class_labels(n: int, n_classes: int, seed: int) -> np.ndarray:
    labels = np.random.default_rng(seed).integers(0, n_classes, size=n)
    labels[:2] = [0, 1]
    return labels


def sklearn_beta(logits: np.ndarray, labels: np.ndarray) -> float:
    frozen = FrozenEstimator(IdentityClassifier().fit(logits, labels))
    calibrated = CalibratedClassifierCV(frozen, method="temperature").fit(logits, labels)
    return float(calibrated.calibrated_classifiers_[0].calibrators[0].beta_)


# --------------------------------------------------------------------------------------------------------
# Temperature scaling: exactness


@pytest.mark.filterwarnings("ignore:The least populated class:UserWarning")
@pytest.mark.parametrize(("n", "k", "seed"), [(400, 4, 0), (1000, 10, 1), (300, 30, 2)])
def test_temperature_matches_sklearn_calibrated_classifier_cv(n, k, seed):
    logits, labels = overconfident(n, k, seed=seed, dtype=np.float64)
    ours = TemperatureScaling().fit(logits, labels)
    theirs = 1.0 / sklearn_beta(logits, labels)
    assert ours.temperature_ == pytest.approx(theirs, rel=1e-4)
    assert nll(logits, labels, ours.temperature_) <= nll(logits, labels, theirs) + 1e-12
    assert nll(logits, labels, ours.temperature_) == pytest.approx(nll(logits, labels, theirs), abs=1e-7)


def test_temperature_binary_single_column_matches_sklearn():
    # scikit-learn reads one decision column as logits (-x, x) and we as (0, x): the same model has
    # beta_sklearn = 1 / (2 T).
    rng = np.random.default_rng(3)
    margin = rng.normal(scale=4.0, size=(500, 1))
    labels = (rng.random(500) < expit(margin[:, 0] / 2.5)).astype(int)
    ours = TemperatureScaling().fit(margin, labels)
    assert ours.temperature_ == pytest.approx(1.0 / (2.0 * sklearn_beta(margin, labels)), rel=1e-4)
    assert ours.temperature_ == pytest.approx(2.5, rel=0.3)
    probabilities = ours.transform(margin)
    assert probabilities.shape == (500, 2)
    np.testing.assert_allclose(probabilities[:, 1], expit(margin[:, 0] / ours.temperature_), rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("n", "k", "sharpness", "seed"), [(2000, 10, 3.0, 0), (500, 3, 0.4, 1), (800, 50, 1.5, 2)]
)
def test_temperature_is_the_exact_float64_optimum(n, k, sharpness, seed, dtype):
    logits, labels = overconfident(n, k, seed=seed, sharpness=sharpness, dtype=dtype)
    fitted = TemperatureScaling().fit(logits, labels)
    reference = reference_temperature(logits, labels)
    assert fitted.convergence_["converged"]
    assert fitted.convergence_["at_bound"] is None
    assert nll(logits, labels, fitted.temperature_) <= nll(logits, labels, reference) + 1e-9
    assert fitted.temperature_ == pytest.approx(reference, rel=1e-6)
    assert fitted.convergence_["objective_value"] == pytest.approx(
        nll(logits, labels, fitted.temperature_), abs=1e-12
    )
    # exact: the gradient at the fitted T vanishes (Newton's last step is taken, so the reported gradient is
    # the one before it, of the order of that step)
    assert abs(nll_gradient(logits, labels, fitted.temperature_)) < 1e-10
    assert abs(fitted.convergence_["gradient"]) < 1e-5
    assert fitted.convergence_["evaluations"] <= 10  # Newton: quadratic convergence, no long crawl


def test_float32_and_float64_logits_give_the_same_temperature():
    logits, labels = overconfident(3000, 10, seed=4)
    t32 = TemperatureScaling().fit(logits, labels).temperature_
    t64 = TemperatureScaling().fit(logits.astype(np.float64), labels).temperature_
    assert t32 == pytest.approx(t64, rel=1e-14)


def test_torch_tensors_are_accepted():
    logits, labels = overconfident(500, 5, seed=5)
    from_numpy = TemperatureScaling().fit(logits, labels)
    from_torch = TemperatureScaling().fit(torch.from_numpy(logits), torch.from_numpy(labels))
    assert from_torch.temperature_ == from_numpy.temperature_
    np.testing.assert_array_equal(
        from_torch.transform(torch.from_numpy(logits)), from_numpy.transform(logits)
    )


@pytest.mark.parametrize("name", sorted(README_FIGURES))
def test_real_data_temperature_and_nll_match_readme(reference_data, name):
    data = reference_data(name)
    expected_t, nll_before, nll_after = README_FIGURES[name]
    fitted = TemperatureScaling().fit(data["logits_val"], data["labels_val"])
    assert fitted.temperature_ == pytest.approx(expected_t, rel=1e-4)
    assert fitted.temperature_ == pytest.approx(
        reference_temperature(data["logits_val"], data["labels_val"]), rel=1e-7
    )
    probabilities = fitted.transform(data["logits_test"])
    assert prob_nll(probabilities, data["labels_test"]) == pytest.approx(nll_after, abs=1e-6)
    assert nll(data["logits_test"], data["labels_test"]) == pytest.approx(nll_before, abs=1e-6)
    np.testing.assert_array_equal(probabilities.argmax(axis=1), data["logits_test"].argmax(axis=1))


def test_lbfgs_recipe_stops_short_of_the_optimum():
    # The widely copied recipe: nn.Parameter(T = 1), LBFGS(lr=0.01, max_iter=50), one step on the NLL.
    logits, labels = overconfident(500, 10, seed=6, sharpness=3.0)
    z, y = torch.from_numpy(logits), torch.from_numpy(labels)
    temperature = torch.nn.Parameter(torch.ones(1))
    optimizer = torch.optim.LBFGS([temperature], lr=0.01, max_iter=50)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z / temperature, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    recipe_t = float(temperature.detach())
    fitted = TemperatureScaling().fit(logits, labels)
    assert nll(logits, labels, fitted.temperature_) <= nll(logits, labels, recipe_t)
    assert fitted.temperature_ == pytest.approx(reference_temperature(logits, labels), rel=1e-6)
    assert abs(recipe_t - fitted.temperature_) > 0.1 * fitted.temperature_


# --------------------------------------------------------------------------------------------------------
# Temperature scaling: weights, other objectives, edge cases


def test_integer_sample_weights_equal_repeated_rows():
    logits, labels = overconfident(300, 6, seed=7)
    counts = np.random.default_rng(7).integers(0, 4, size=300)
    weighted = TemperatureScaling().fit(logits, labels, sample_weight=counts)
    repeated = TemperatureScaling().fit(np.repeat(logits, counts, axis=0), np.repeat(labels, counts))
    assert weighted.temperature_ == pytest.approx(repeated.temperature_, rel=1e-10)
    assert weighted.temperature_ == pytest.approx(reference_temperature(logits, labels, counts), rel=1e-6)


def test_balanced_class_weight_is_sklearn_compute_class_weight():
    logits, labels = overconfident(600, 4, seed=8)
    labels[labels == 3] = 0  # unbalanced, one class absent
    weights = compute_class_weight("balanced", classes=np.unique(labels), y=labels)
    per_sample = weights[np.searchsorted(np.unique(labels), labels)]
    expected = reference_temperature(logits, labels, per_sample)
    balanced = TemperatureScaling(class_weight="balanced").fit(logits, labels)
    weighted_nll = TemperatureScaling(objective="weighted_nll").fit(logits, labels)
    explicit = TemperatureScaling(class_weight=[*weights, 5.0]).fit(logits, labels)
    for fitted in (balanced, weighted_nll, explicit):
        assert fitted.temperature_ == pytest.approx(expected, rel=1e-6)
    assert TemperatureScaling().fit(logits, labels).temperature_ != pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize("objective", ["focal", "brier"])
def test_focal_and_brier_objectives_reach_their_minimum(objective):
    logits, labels = overconfident(800, 5, seed=9, sharpness=2.0, dtype=np.float64)
    rows = np.arange(len(labels))

    def loss(temperature: float) -> float:
        p = scipy_softmax(logits / temperature, axis=1)
        if objective == "brier":
            onehot = np.eye(5)[labels]
            return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))
        p_true = p[rows, labels]
        return float(np.mean(-((1.0 - p_true) ** 2.0) * np.log(p_true)))

    fitted = TemperatureScaling(objective=objective).fit(logits, labels)
    grid = np.exp(np.linspace(math.log(0.05), math.log(100.0), 2001))
    best = grid[np.argmin([loss(t) for t in grid])]
    assert fitted.temperature_ == pytest.approx(best, rel=0.01)
    assert loss(fitted.temperature_) <= min(loss(best), loss(best * 1.001), loss(best / 1.001)) + 1e-12
    assert fitted.convergence_["objective_value"] == pytest.approx(loss(fitted.temperature_), rel=1e-10)
    assert fitted.convergence_["method"] == "bounded_brent"


def test_zero_information_rows_keep_temperature_one():
    logits = np.tile(np.full((1, 4), 2.5, dtype=np.float32), (50, 1))
    labels = np.arange(50) % 4
    fitted = TemperatureScaling().fit(logits, labels)
    assert fitted.temperature_ == 1.0
    assert fitted.convergence_["converged"]
    np.testing.assert_allclose(fitted.transform(logits), 0.25)


def test_one_class_labels_fit_temperature_to_a_bound():
    logits, _ = overconfident(200, 3, seed=10)
    labels = logits.argmax(axis=1)
    labels[:] = 2
    fitted = TemperatureScaling(bounds=(0.1, 10.0)).fit(logits, labels)
    assert math.isfinite(fitted.temperature_)
    reference = minimize_scalar(
        lambda log_t: nll(logits, labels, math.exp(log_t)),
        bounds=(math.log(0.1), math.log(10.0)),
        method="bounded",
    )
    assert nll(logits, labels, fitted.temperature_) <= reference.fun + 1e-9
    # Always-correct predictions push T to its lower bound, and the fit says so.
    correct = logits.argmax(axis=1)
    always = TemperatureScaling(bounds=(0.1, 10.0)).fit(logits[correct == 0], correct[correct == 0])
    assert always.temperature_ == 0.1
    assert always.convergence_["at_bound"] == "lower"
    assert always.convergence_["converged"]


def test_random_labels_push_temperature_to_the_upper_bound():
    rng = np.random.default_rng(11)
    logits = rng.normal(scale=10.0, size=(400, 4))
    labels = rng.integers(0, 4, size=400)
    fitted = TemperatureScaling(bounds=(0.05, 20.0)).fit(logits, labels)
    assert fitted.temperature_ == 20.0
    assert fitted.convergence_["at_bound"] == "upper"


@pytest.mark.parametrize("method", sorted(CALIBRATORS))
def test_huge_logits_fit_and_transform_without_nan_or_warnings(method):
    rng = np.random.default_rng(12)
    for n_columns in (1, 2, 4):
        if method in BINARY_ONLY and n_columns > 2:
            continue
        logits = rng.choice([-1e4, 1e4, 0.0, 3.0], size=(60, n_columns))
        labels = two_class_labels(60, max(n_columns, 2), seed=12)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            calibrator = make_calibrator(method).fit(logits, labels)
            probabilities = calibrator.transform(logits)
            document = json.loads(json.dumps(calibrator.to_dict(), allow_nan=False))
        assert np.isfinite(probabilities).all()
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
        assert calibrator_from_dict(document).transform(logits) == pytest.approx(probabilities)


def test_transform_matches_scipy_softmax_and_fast_path():
    logits, labels = overconfident(100, 7, seed=13)
    fitted = TemperatureScaling().fit(logits, labels)
    expected = scipy_softmax(logits.astype(np.float64) / fitted.temperature_, axis=1)
    np.testing.assert_allclose(fitted.transform(logits), expected, rtol=1e-12)
    np.testing.assert_array_equal(fitted.transform(logits, validate=False), fitted.transform(logits))
    big = np.random.default_rng(13).normal(size=(5000, 7)).astype(np.float32)  # the torch path
    np.testing.assert_allclose(
        fitted.transform(big), scipy_softmax(big.astype(np.float64) / fitted.temperature_, axis=1), rtol=1e-12
    )
    assert fitted.transform(logits[:1]).dtype == np.float64


# --------------------------------------------------------------------------------------------------------
# Properties


@st.composite
def labelled_logits(draw, min_columns: int = 1, max_columns: int = 5):
    n_columns = draw(st.integers(min_columns, max_columns))
    n_samples = draw(st.integers(4, 24))
    logits = draw(
        hnp.arrays(
            np.float64,
            (n_samples, n_columns),
            elements=st.floats(-30.0, 30.0, allow_nan=False, allow_infinity=False, width=32),
        )
    )
    n_classes = max(n_columns, 2)
    labels = draw(hnp.arrays(np.int64, n_samples, elements=st.integers(0, n_classes - 1)))
    labels[:2] = [0, 1]
    return logits, labels


PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(data=labelled_logits(), method=st.sampled_from(sorted(CALIBRATORS)))
def test_every_calibrator_gives_probability_rows_and_round_trips_through_json(data, method):
    logits, labels = data
    assume(method not in BINARY_ONLY or logits.shape[1] <= 2)
    calibrator = make_calibrator(method).fit(logits, labels)
    probabilities = calibrator.transform(logits)
    assert probabilities.shape == (len(labels), max(logits.shape[1], 2))
    assert probabilities.dtype == np.float64
    assert ((probabilities >= 0.0) & (probabilities <= 1.0)).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
    document = json.loads(json.dumps(calibrator.to_dict(), allow_nan=False))
    rebuilt = calibrator_from_dict(document)
    assert type(rebuilt) is type(calibrator)
    np.testing.assert_array_equal(rebuilt.transform(logits), probabilities)
    assert rebuilt.to_dict() == calibrator.to_dict()


# Found by hypothesis: a Newton step on log beta of exp(-f' / (beta f'' + f')) overflowed math.exp (500 on /fit).
_A = 1.123046875
_NEWTON_OVERFLOW = (
    np.array(
        [[_A, 0, _A, _A, _A], *[[_A] * 5] * 3, [0, _A, -10, _A, _A], *[[_A] * 5] * 3, [-11, _A, -11, 0, _A]]
    ),
    np.array([0, 1, 1, 1, 1, 1, 1, 1, 1]),
)


@PROPERTY_SETTINGS
@given(data=labelled_logits(), permutation_seed=st.integers(0, 2**32 - 1))
@example(data=_NEWTON_OVERFLOW, permutation_seed=0)
def test_temperature_properties(data, permutation_seed):
    logits, labels = data
    fitted = TemperatureScaling().fit(logits, labels)
    probabilities = fitted.transform(logits)
    # Argmax unchanged wherever the row's top logit is unique (ties may resolve either way).
    full = logits if logits.shape[1] > 1 else np.concatenate([np.zeros_like(logits), logits], axis=1)
    top_two = np.sort(full, axis=1)[:, -2:]
    unique_top = top_two[:, 1] - top_two[:, 0] > 1e-6 * (1.0 + np.abs(top_two[:, 1]))
    np.testing.assert_array_equal(probabilities.argmax(axis=1)[unique_top], full.argmax(axis=1)[unique_top])
    assert nll(logits, labels, fitted.temperature_) <= nll(logits, labels) + 1e-12
    order = np.random.default_rng(permutation_seed).permutation(len(labels))
    shuffled = TemperatureScaling().fit(logits[order], labels[order])
    assert shuffled.temperature_ == pytest.approx(fitted.temperature_, rel=1e-9)


@PROPERTY_SETTINGS
@given(data=labelled_logits(), counts=st.lists(st.integers(0, 3), min_size=24, max_size=24))
def test_temperature_integer_weights_equal_repetition(data, counts):
    logits, labels = data
    weights = np.array(counts[: len(labels)])
    assume(weights.sum() > 0)
    weighted = TemperatureScaling().fit(logits, labels, sample_weight=weights)
    repeated = TemperatureScaling().fit(np.repeat(logits, weights, axis=0), np.repeat(labels, weights))
    assert weighted.temperature_ == pytest.approx(repeated.temperature_, rel=1e-8)


# --------------------------------------------------------------------------------------------------------
# Vector and matrix scaling


@pytest.fixture(scope="module")
def densenet_fits(reference_data):
    data = reference_data("netcal_densenet-bc-100_c100.npz")
    fits = {
        "vector": VectorScaling().fit(data["logits_val"], data["labels_val"]),
        "matrix": MatrixScaling().fit(data["logits_val"], data["labels_val"]),
    }
    return data, fits


@pytest.mark.parametrize("method", ["vector", "matrix"])
def test_vector_and_matrix_scaling_reduce_test_nll_on_cifar100(densenet_fits, method):
    data, fits = densenet_fits
    calibrator = fits[method]
    before = nll(data["logits_test"], data["labels_test"])
    after = prob_nll(calibrator.transform(data["logits_test"]), data["labels_test"])
    assert after < before - 0.25  # 1.16 -> about 0.84: no blow-up at K = 100 on 5,000 samples
    assert calibrator.convergence_["converged"]
    assert calibrator.convergence_["objective_value"] <= nll(data["logits_val"], data["labels_val"])


def vector_objective(calibrator: VectorScaling, x, labels, scale, bias) -> float:
    log_p = log_softmax(x * scale + bias, axis=1)[np.arange(len(labels)), labels]
    return float(-log_p.mean() + calibrator.reg * (np.sum((scale - 1.0) ** 2) + np.sum(bias**2)))


def matrix_objective(calibrator: MatrixScaling, x, labels, weights, bias) -> float:
    log_p = log_softmax(x @ weights.T + bias, axis=1)[np.arange(len(labels)), labels]
    off_diagonal = weights - np.diag(np.diag(weights))
    return float(
        -log_p.mean()
        + calibrator.reg * (np.sum((weights - np.eye(len(bias))) ** 2) + np.sum(bias**2))
        + calibrator.off_diagonal_reg_ * np.sum(off_diagonal**2)
    )


def test_vector_and_matrix_fits_minimise_their_documented_objectives():
    # A wrong analytic gradient would leave L-BFGS-B away from the minimum of the formula in the docstring:
    # check that no small perturbation improves it, and that the fit beats the identity map.
    logits, labels = overconfident(400, 4, seed=14, sharpness=2.0, dtype=np.float64)
    rng = np.random.default_rng(14)
    vector = VectorScaling(reg=1e-2).fit(logits, labels)
    best = vector_objective(vector, logits, labels, vector.scale_, vector.bias_)
    assert best == pytest.approx(vector.convergence_["objective_value"], rel=1e-10)
    assert best < vector_objective(vector, logits, labels, np.ones(4), np.zeros(4))
    for _ in range(20):
        ds, db = rng.normal(scale=1e-3, size=(2, 4))
        assert vector_objective(vector, logits, labels, vector.scale_ + ds, vector.bias_ + db) >= best - 1e-12
    matrix = MatrixScaling(reg=1e-2, off_diagonal_reg=0.05).fit(logits, labels)
    best = matrix_objective(matrix, logits, labels, matrix.weights_, matrix.bias_)
    assert best == pytest.approx(matrix.convergence_["objective_value"], rel=1e-10)
    assert best < matrix_objective(matrix, logits, labels, np.eye(4), np.zeros(4))
    for _ in range(20):
        dw = rng.normal(scale=1e-3, size=(4, 4))
        db = rng.normal(scale=1e-3, size=4)
        assert (
            matrix_objective(matrix, logits, labels, matrix.weights_ + dw, matrix.bias_ + db) >= best - 1e-12
        )
    assert MatrixScaling().fit(logits, labels).off_diagonal_reg_ == pytest.approx(0.04)


@pytest.mark.parametrize("name", ["netcal_lenet5_c10", "kumar_vgg16_c10"])
def test_vector_and_matrix_fits_converge_whatever_the_scale_of_the_logits(name, reference_data):
    # Logits of magnitude 1e4 once left L-BFGS-B at train NLL 405.6 (vector) with `converged: false`; the
    # same fit on the logits / 1e4 reached 2.30. From the temperature-scaled start the fit sees the logits on
    # their own scale: vector scaling's optimum scales with them (its penalty is ~reg K either way) and
    # matrix scaling converges (its penalty, in the weights' units, weighs less on larger logits).
    data = reference_data(f"{name}.npz")
    logits, labels = data["logits_val"].astype(np.float64), data["labels_val"]

    def train_nll(calibrator, z):
        return -float(np.mean(np.log(calibrator.transform(z)[np.arange(len(labels)), labels])))

    small = VectorScaling().fit(logits, labels)
    large = VectorScaling().fit(logits * 1e4, labels)
    assert large.convergence_["converged"] and small.convergence_["converged"]
    assert train_nll(large, logits * 1e4) == pytest.approx(train_nll(small, logits), rel=1e-5)
    # the penalty reg |w - 1|^2 is not scale-free (w near 6e-5 against 0.6), which moves the optimum ~0.2 %
    np.testing.assert_allclose(large.scale_ * 1e4, small.scale_, rtol=1e-2)
    np.testing.assert_allclose(large.bias_, small.bias_, rtol=1e-2, atol=1e-2)
    small = MatrixScaling().fit(logits, labels)
    large = MatrixScaling().fit(logits * 1e4, labels)
    assert large.convergence_["converged"] and small.convergence_["converged"]
    assert train_nll(large, logits * 1e4) <= train_nll(small, logits) + 1e-6


@pytest.mark.parametrize("method", sorted(CALIBRATORS))
def test_binary_calibrators_serve_one_and_two_column_logits_alike(method):
    rng = np.random.default_rng(15)
    # multiples of 2^-20, so that (margin + 1.5) - 1.5 is the margin exactly (Venn-Abers is a step function
    # of the margin with a step at every fit margin: an ulp moves a fit row to the next step)
    margin = np.round(rng.normal(scale=3.0, size=300) * 2**20) / 2**20
    labels = (rng.random(300) < expit(0.6 * margin + 0.2)).astype(int)
    one_column = margin[:, None]
    two_columns = np.stack([np.full(300, 1.5), margin + 1.5], axis=1)  # same margin, shifted rows
    from_one = make_calibrator(method).fit(one_column, labels)
    from_two = make_calibrator(method).fit(two_columns, labels)
    assert from_one.num_classes_ == from_two.num_classes_ == 2
    for fitted in (from_one, from_two):
        np.testing.assert_allclose(fitted.transform(two_columns), fitted.transform(one_column), atol=1e-12)
    np.testing.assert_allclose(from_one.transform(one_column), from_two.transform(one_column), atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Platt, isotonic, histogram: against scikit-learn


@pytest.mark.parametrize("n_columns", [1, 2])
def test_platt_matches_unpenalised_logistic_regression(n_columns):
    rng = np.random.default_rng(16)
    margin = rng.normal(scale=3.0, size=500)
    labels = (rng.random(500) < expit(0.4 * margin - 0.7)).astype(int)
    weights = rng.uniform(0.5, 2.0, size=500)
    logits = margin[:, None] if n_columns == 1 else np.stack([-margin / 2, margin / 2], axis=1)
    fitted = PlattScaling().fit(logits, labels, sample_weight=weights)
    reference = LogisticRegression(C=1e12, tol=1e-12, max_iter=10_000).fit(
        margin[:, None], labels, sample_weight=weights
    )
    assert fitted.slope_ == pytest.approx(reference.coef_[0, 0], rel=1e-4)
    assert fitted.intercept_ == pytest.approx(reference.intercept_[0], rel=1e-4)
    np.testing.assert_allclose(fitted.transform(logits), reference.predict_proba(margin[:, None]), atol=1e-6)
    assert fitted.convergence_["converged"]


def test_platt_huge_logits_match_logistic_regression_on_rescaled_margin():
    rng = np.random.default_rng(17)
    margin = rng.normal(scale=2000.0, size=400)
    labels = (rng.random(400) < expit(margin / 1000.0)).astype(int)
    fitted = PlattScaling().fit(margin[:, None], labels)
    reference = LogisticRegression(C=1e12, tol=1e-12, max_iter=10_000).fit(margin[:, None] / 1000.0, labels)
    assert fitted.slope_ * 1000.0 == pytest.approx(reference.coef_[0, 0], rel=1e-4)
    assert fitted.intercept_ == pytest.approx(reference.intercept_[0], abs=1e-4)


def test_platt_smooth_targets_stay_finite_on_separable_data():
    margin = np.linspace(-3.0, 3.0, 40)[:, None]
    labels = (margin[:, 0] > 0).astype(int)
    smooth = PlattScaling(smooth_targets=True).fit(margin, labels)
    plain = PlattScaling().fit(margin, labels)
    assert 0.0 < smooth.slope_ < 10.0
    assert plain.slope_ > 10.0 * smooth.slope_
    assert np.isfinite(plain.transform(margin)).all()


@pytest.mark.parametrize("n_columns", [1, 2])
def test_isotonic_binary_matches_sklearn_isotonic_regression(n_columns):
    rng = np.random.default_rng(18)
    margin = rng.normal(scale=2.0, size=400)
    labels = (rng.random(400) < expit(1.5 * margin)).astype(int)
    weights = rng.uniform(0.2, 3.0, size=400)
    logits = margin[:, None] if n_columns == 1 else np.stack([np.zeros(400), margin], axis=1)
    fitted = IsotonicCalibration(floor=0).fit(logits, labels, sample_weight=weights)
    reference = IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1).fit(
        expit(margin), labels, sample_weight=weights
    )
    new_margin = np.concatenate([rng.normal(scale=3.0, size=200), [-50.0, 50.0]])
    new_logits = new_margin[:, None] if n_columns == 1 else np.stack([np.zeros(202), new_margin], axis=1)
    probabilities = fitted.transform(new_logits)
    np.testing.assert_allclose(probabilities[:, 1], reference.predict(expit(new_margin)), atol=1e-12)
    np.testing.assert_allclose(probabilities[:, 0], 1.0 - probabilities[:, 1], atol=0)


def test_isotonic_multiclass_is_one_vs_rest_then_renormalised():
    logits, labels = overconfident(300, 4, seed=19, dtype=np.float64)
    fitted = IsotonicCalibration(floor=0).fit(logits, labels)
    p = scipy_softmax(logits, axis=1)
    test_logits = np.random.default_rng(19).normal(scale=2.0, size=(50, 4))
    p_test = scipy_softmax(test_logits, axis=1)
    columns = [
        IsotonicRegression(out_of_bounds="clip", y_min=0, y_max=1)
        .fit(p[:, k], labels == k)
        .predict(p_test[:, k])
        for k in range(4)
    ]
    expected = np.stack(columns, axis=1)
    sums = expected.sum(axis=1, keepdims=True)
    expected = np.where(sums > 0, expected / np.where(sums > 0, sums, 1.0), p_test)
    np.testing.assert_allclose(fitted.transform(test_logits), expected, atol=1e-12)


@pytest.mark.parametrize(("binning", "strategy"), [("width", "uniform"), ("mass", "quantile")])
def test_histogram_binary_bins_match_sklearn_calibration_curve(binning, strategy):
    rng = np.random.default_rng(20)
    margin = rng.normal(scale=2.0, size=1000)
    labels = (rng.random(1000) < expit(0.5 * margin)).astype(int)
    fitted = HistogramBinning(n_bins=10, binning=binning, prior_strength=0, floor=0).fit(
        margin[:, None], labels
    )
    p = expit(margin)
    prob_true, _ = calibration_curve(labels, p, n_bins=10, strategy=strategy)
    edges, values = fitted.bin_edges_[0], fitted.bin_values_[0]
    non_empty = np.unique(np.searchsorted(edges[1:-1], p))
    np.testing.assert_allclose(values[non_empty], prob_true, atol=1e-12)
    if binning == "width":
        np.testing.assert_allclose(edges, np.linspace(0, 1, 11))
    else:
        np.testing.assert_allclose(edges[1:-1], np.percentile(p, np.arange(10, 100, 10)))
    np.testing.assert_allclose(
        fitted.transform(margin[:, None])[:, 1], values[np.searchsorted(edges[1:-1], p)]
    )


def test_histogram_empty_bins_map_to_their_centre_and_edges_close_bins_on_the_right():
    # p1 = 0.047, 0.076 (bin 0), 0.5 exactly (the edge of bins 1 and 2: bins are (e_i, e_i+1], so bin 1),
    # 0.881, 0.953 (bin 3); bin 2 is empty.
    logits = np.array([[-3.0], [-2.5], [0.0], [2.0], [3.0]])
    fitted = HistogramBinning(n_bins=4, prior_strength=0, floor=0).fit(logits, np.array([0, 1, 0, 1, 1]))
    assert fitted.bin_values_[0].tolist() == [0.5, 0.0, 0.625, 1.0]
    np.testing.assert_allclose(fitted.transform(np.array([[0.2], [0.0]])), [[0.375, 0.625], [1.0, 0.0]])


def test_one_vs_rest_rows_without_evidence_fall_back_to_the_softmax_row():
    # Each class is the label only where its probability is >= 0.55 and is not where it is <= 0.4, so every
    # class's isotonic curve is 0 up to 0.4: a row with all probabilities below 0.4 maps to all zeros.
    probabilities = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.05, 0.9, 0.05],
            [0.05, 0.05, 0.9],
            [0.4, 0.55, 0.05],
            [0.05, 0.4, 0.55],
            [0.55, 0.05, 0.4],
        ]
    )
    fitted = IsotonicCalibration(floor=0).fit(np.log(probabilities), np.array([0, 1, 2, 1, 2, 0]))
    row = np.log(np.array([[0.38, 0.32, 0.30]]))
    np.testing.assert_allclose(fitted.transform(row), [[0.38, 0.32, 0.30]], atol=1e-12)
    np.testing.assert_allclose(fitted.transform(np.log(probabilities[:1])), [[1.0, 0.0, 0.0]], atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# Protocol, registry, documents


@pytest.mark.parametrize("name", sorted(README_FIGURES))
@pytest.mark.parametrize("method", ["isotonic", "histogram"])
def test_one_vs_rest_defaults_never_give_the_true_class_probability_zero_on_real_sets(
    name, method, reference_data
):
    # Without a floor the lowest isotonic block and the empty-of-a-class histogram bins are 0: 4 to 104 test
    # rows of every real set then had probability 0 on their true class and the test NLL was infinite.
    data = reference_data(name)
    test_logits, test_labels = data["logits_test"], data["labels_test"]
    rows = np.arange(len(test_labels))
    fitted = make_calibrator(method).fit(data["logits_val"], data["labels_val"])
    n = len(data["labels_val"])
    assert fitted.floor_ == pytest.approx(0.5 / n) and fitted.convergence_["floor"] == fitted.floor_
    probabilities = fitted.transform(test_logits)
    assert (probabilities[rows, test_labels] > 0).all()
    assert np.isfinite(-np.log(probabilities[rows, test_labels]).mean())
    plain = {"floor": 0} if method == "isotonic" else {"floor": 0, "prior_strength": 0}
    unfloored = make_calibrator(method, **plain).fit(data["logits_val"], data["labels_val"])
    if method == "isotonic":  # the defect, still there on request
        assert (unfloored.transform(test_logits)[rows, test_labels] == 0).any()
    # the floor holds in the exported module too (it is in the curve's values)
    exported = fitted.torch_module()(torch.as_tensor(test_logits, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(exported, probabilities, rtol=1e-6, atol=1e-9)


def test_histogram_bins_are_smoothed_towards_the_base_rate_and_floored():
    margin = np.array([-3.0, -2.5, -2.0, 2.0, 2.5, 3.0, 3.5, 0.1])
    labels = np.array([0, 0, 0, 1, 1, 1, 0, 1])
    fitted = HistogramBinning(n_bins=2, prior_strength=2.0, floor=0.01).fit(margin[:, None], labels)
    prior = labels.mean()
    low, high = expit(margin) <= 0.5, expit(margin) > 0.5
    expected = [
        (labels[low].sum() + 2 * prior) / (low.sum() + 2),
        (labels[high].sum() + 2 * prior) / (high.sum() + 2),
    ]
    np.testing.assert_allclose(fitted.bin_values_[0], np.clip(expected, 0.01, 0.99), rtol=1e-12)
    negative_bin = np.array([0, 0, 0, 1, 1, 1, 0, 0])  # the low bin holds no positive
    floored = HistogramBinning(n_bins=2, prior_strength=0.0, floor=0.25).fit(margin[:, None], negative_bin)
    assert floored.bin_values_[0][0] == 0.25
    for bad in (0.5, -0.1, "always"):
        with pytest.raises(InvalidInput, match="floor"):
            HistogramBinning(floor=bad)
        with pytest.raises(InvalidInput, match="floor"):
            IsotonicCalibration(floor=bad)


def test_registry_and_protocol():
    assert set(CALIBRATORS) == {
        "temperature",
        "vector",
        "matrix",
        "platt",
        "isotonic",
        "histogram",
        "beta",
        "ensemble_temperature",
        "dirichlet",
        "segment_temperature",
        "venn_abers",
    }
    for method, cls in CALIBRATORS.items():
        calibrator = make_calibrator(method)
        assert isinstance(calibrator, cls)
        assert isinstance(calibrator, Calibrator)
        assert isinstance(calibrator, BaseCalibrator)
        assert calibrator.method == method
        assert calibrator.params == calibrator.get_params()
        json.dumps(calibrator.params)
    assert make_calibrator("temperature", bounds=(0.5, 4.0)).params["bounds"] == [0.5, 4.0]
    assert make_calibrator("histogram", n_bins=7).params == {
        "n_bins": 7,
        "binning": "width",
        "prior_strength": 1.0,
        "floor": "auto",
    }


def test_temperature_document_format():
    logits, labels = overconfident(200, 3, seed=21)
    document = TemperatureScaling().fit(logits, labels).to_dict()
    assert document["method"] == "temperature"
    assert document["num_classes"] == 3
    assert document["temperature"] == document["params"]["temperature"]
    assert set(document["params"]) == {
        "temperature",
        "objective",
        "class_weight",
        "gamma",
        "bounds",
        "tol",
        "max_iter",
    }
    assert {"iterations", "gradient", "converged", "objective_value", "method"} <= set(
        document["convergence"]
    )
    wrapped = {"format_version": 1, "model": "m", "version": 3, **document}
    assert calibrator_from_dict(wrapped).temperature_ == document["temperature"]


def test_unknown_method_and_option_are_named():
    with pytest.raises(InvalidInput, match=r"unknown calibration method 'gamma'.*temperature"):
        make_calibrator("gamma")
    with pytest.raises(InvalidInput, match=r"unknown option 'temprature' for method 'temperature'.*bounds"):
        make_calibrator("temperature", temprature=2.0)
    with pytest.raises(InvalidInput, match=r"unknown option 'n_bins' for method 'isotonic'"):
        make_calibrator("isotonic", n_bins=3)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("temperature", {"objective": "hinge"}, "objective must be one of"),
        ("temperature", {"bounds": (2.0, 1.0)}, "T_min < T_max"),
        ("temperature", {"bounds": (0.0, 1.0)}, r"bounds\[0\] must be > 0"),
        ("temperature", {"bounds": 3.0}, "pair"),
        ("temperature", {"gamma": float("nan")}, "gamma must be finite"),
        ("temperature", {"class_weight": "inverse"}, "class_weight must be None, 'balanced'"),
        ("temperature", {"class_weight": [1.0, -1.0]}, r"class_weight\[1\] must be >= 0"),
        ("temperature", {"max_iter": 0}, "max_iter must be an integer >= 1"),
        ("vector", {"reg": -1.0}, "reg must be >= 0"),
        ("matrix", {"off_diagonal_reg": "big"}, "off_diagonal_reg must be one of auto"),
        ("platt", {"smooth_targets": "yes"}, "smooth_targets must be true or false"),
        ("histogram", {"n_bins": 0}, "n_bins must be an integer >= 1"),
        ("histogram", {"binning": "log"}, "binning must be one of width, mass"),
    ],
)
def test_invalid_option_values(method, options, message):
    with pytest.raises(InvalidInput, match=message):
        make_calibrator(method, **options)


@pytest.mark.parametrize("method", sorted(CALIBRATORS))
def test_not_fitted(method):
    calibrator = make_calibrator(method)
    assert not calibrator.is_fitted
    for use in (lambda: calibrator.transform(np.zeros((2, 2))), calibrator.to_dict):
        with pytest.raises(NotFitted, match=r"is not fitted yet: call fit\(logits, labels\) first"):
            use()


def test_class_weight_length_is_checked_at_fit():
    logits, labels = overconfident(50, 3, seed=22)
    with pytest.raises(InvalidInput, match="class_weight has 2 entries but there are 3 classes"):
        TemperatureScaling(class_weight=[1.0, 2.0]).fit(logits, labels)


@pytest.mark.parametrize("method", sorted(CALIBRATORS))
def test_wrong_column_count_at_transform(method):
    n_columns = 2 if method in BINARY_ONLY else 10
    logits, labels = overconfident(100, n_columns, seed=23)
    labels[:2] = [0, 1]
    calibrator = make_calibrator(method).fit(logits, labels)
    expected = "calibrator was fitted on 2 classes; logits have 3 columns"
    bad = np.zeros((4, 3))
    if method not in BINARY_ONLY:
        expected = "calibrator was fitted on 10 classes; logits have 5 columns"
        bad = np.zeros((4, 5))
    with pytest.raises(InvalidInput, match=expected):
        calibrator.transform(bad)
    with pytest.raises(InvalidInput, match="contains NaN or Inf at row 1"):
        calibrator.transform(np.where(np.arange(4)[:, None] == 1, np.nan, 0.0) + np.zeros((4, n_columns)))


def top_label_problem(reference_data, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A real binary problem from a multiclass set: the margin of the top class over the runner-up, and
    whether the top class is right (fit half, test half)."""
    data = reference_data(name)

    def margin_and_hit(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ordered = np.sort(logits.astype(np.float64), axis=1)
        return ordered[:, -1] - ordered[:, -2], (logits.argmax(axis=1) == labels).astype(int)

    return (
        *margin_and_hit(data["logits_val"], data["labels_val"]),
        *margin_and_hit(data["logits_test"], data["labels_test"]),
    )


@pytest.mark.parametrize("parameters", ["abm", "ab", "am"])
@pytest.mark.parametrize("name", ["netcal_lenet5_c10.npz", "kumar_vgg16_c10.npz"])
def test_beta_calibration_matches_betacal_and_is_the_exact_maximum_likelihood(
    parameters, name, reference_data
):
    betacal = pytest.importorskip("betacal")
    margin, hit, test_margin, _ = top_label_problem(reference_data, name)
    fitted = BetaCalibration(parameters=parameters).fit(margin[:, None], hit)
    assert fitted.convergence_["converged"]
    ours = fitted.transform(test_margin[:, None])[:, 1]
    reference = betacal.BetaCalibration(parameters=parameters).fit(expit(margin), hit)
    theirs = reference.predict(expit(test_margin))
    # betacal fits with scikit-learn's lbfgs at its default tol (1e-4): its map is within ~1e-4 of the optimum
    np.testing.assert_allclose(ours, theirs, atol=5e-4)

    def train_nll(p: np.ndarray) -> float:
        return -float(np.mean(np.where(hit == 1, np.log(p), np.log1p(-p))))

    assert (
        train_nll(fitted.transform(margin[:, None])[:, 1])
        <= train_nll(reference.predict(expit(margin))) + 1e-12
    )
    # the exact optimum: scikit-learn's unpenalised logistic regression run to tolerance on the same features
    features = {
        "abm": np.stack([np.log(expit(margin)), -np.log(expit(-margin))], axis=1),
        "ab": np.stack([np.log(2 * expit(margin)), np.log(2 * expit(-margin))], axis=1),
        "am": margin[:, None],
    }[parameters]
    if parameters == "abm" and fitted.a_ == 0:  # betacal's rule: a < 0 refits on -ln(1 - s) alone
        features = features[:, 1:]
    elif parameters == "abm" and fitted.b_ == 0:
        features = features[:, :1]
    regression = LogisticRegression(
        penalty=None, tol=1e-12, max_iter=100_000, fit_intercept=parameters != "ab"
    )
    regression.fit(features, hit)
    np.testing.assert_allclose(
        fitted.transform(margin[:, None])[:, 1], regression.predict_proba(features)[:, 1], atol=1e-6
    )


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    slope=st.floats(0.1, 3.0),
    shift=st.floats(-2.0, 2.0),
    parameters=st.sampled_from(["abm", "ab", "am"]),
)
def test_beta_calibration_rows_sum_to_one_and_abm_is_monotone_in_the_margin(seed, slope, shift, parameters):
    rng = np.random.default_rng(seed)
    margin = rng.normal(scale=3.0, size=300)
    labels = (rng.random(300) < expit(slope * margin + shift)).astype(int)
    assume(0 < labels.sum() < 300)
    fitted = BetaCalibration(parameters=parameters).fit(margin[:, None], labels)
    grid = np.linspace(-40, 40, 401)[:, None]
    probabilities = fitted.transform(grid)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-12)
    assert np.isfinite(probabilities).all()
    if parameters == "abm":  # a, b >= 0: the map is non-decreasing in s, so in the margin
        assert fitted.a_ >= 0 and fitted.b_ >= 0
        assert (np.diff(probabilities[:, 1]) >= -1e-12).all()
    exported = fitted.torch_module()(torch.as_tensor(grid)).numpy()
    np.testing.assert_allclose(exported, probabilities, rtol=1e-6, atol=1e-12)


def test_beta_calibration_refuses_unknown_parameters_and_is_binary_only():
    with pytest.raises(InvalidInput, match="parameters must be one of"):
        BetaCalibration(parameters="abc")
    logits, labels = overconfident(50, 3, seed=24)
    with pytest.raises(InvalidInput, match="beta is binary only; got 3 classes"):
        BetaCalibration().fit(logits, labels)


@pytest.mark.parametrize("name", ["netcal_densenet-bc-100_c100.npz", "netcal_lenet5_c10.npz"])
def test_ensemble_temperature_scaling_is_the_nll_optimal_mix_on_the_simplex(name, reference_data):
    data = reference_data(name)
    logits, labels = data["logits_val"].astype(np.float64), data["labels_val"]
    fitted = EnsembleTemperatureScaling().fit(logits, labels)
    scaling = TemperatureScaling().fit(logits, labels)
    assert fitted.temperature_ == scaling.temperature_
    assert (fitted.weights_ >= 0).all() and fitted.weights_.sum() == pytest.approx(1.0, abs=1e-12)
    rows = np.arange(len(labels))
    tempered = scipy_softmax(logits / scaling.temperature_, axis=1)[rows, labels]
    plain = scipy_softmax(logits, axis=1)[rows, labels]
    uniform = np.full(len(labels), 1.0 / logits.shape[1])

    def nll(weights: np.ndarray) -> float:
        return -float(np.mean(np.log(weights[0] * tempered + weights[1] * plain + weights[2] * uniform)))

    best = nll(fitted.weights_)
    assert best == pytest.approx(fitted.convergence_["objective_value"], rel=1e-12)
    assert best <= nll(np.array([1.0, 0.0, 0.0])) + 1e-15  # never worse than temperature scaling
    probabilities = fitted.transform(logits)
    assert -np.mean(np.log(probabilities[rows, labels])) == pytest.approx(best, rel=1e-12)
    # no point of a fine grid on the simplex beats the fit (a convex problem: its minimum is global)
    grid = [np.array([a, b, 1.0 - a - b]) for a in np.linspace(0, 1, 41) for b in np.linspace(0, 1 - a, 41)]
    assert best <= min(nll(point) for point in grid) + 1e-9
    np.testing.assert_array_equal(probabilities.argmax(axis=1), logits.argmax(axis=1))


def test_ensemble_temperature_documents_refuse_weights_off_the_simplex():
    logits, labels = overconfident(200, 4, seed=31)
    document = EnsembleTemperatureScaling().fit(logits, labels).to_dict()
    assert calibrator_from_dict(document).transform(logits) == pytest.approx(
        EnsembleTemperatureScaling().fit(logits, labels).transform(logits)
    )
    for weights in ([0.5, 0.5, 0.5], [-0.1, 0.6, 0.5], [1.0, 0.0]):
        with pytest.raises(InvalidInput, match="weights must be three non-negative numbers that sum to 1"):
            calibrator_from_dict({**document, "params": {**document["params"], "weights": weights}})


@pytest.mark.parametrize("name", ["netcal_lenet5_c10.npz", "kumar_vgg16_c10.npz"])
def test_dirichlet_calibration_is_matrix_scaling_of_log_probabilities(name, reference_data):
    # The sets in tests/data store log(p) as their logits, so ln softmax(z) = z (to rounding) there and
    # Dirichlet calibration must give matrix scaling's fit: the reference its figures are checked against.
    data = reference_data(name)
    logits, labels = data["logits_val"].astype(np.float64), data["labels_val"]
    dirichlet = DirichletCalibration().fit(logits, labels)
    matrix = MatrixScaling().fit(log_softmax(logits, axis=1), labels)
    test = data["logits_test"].astype(np.float64)
    np.testing.assert_allclose(
        dirichlet.transform(test), matrix.transform(log_softmax(test, axis=1)), atol=1e-6
    )
    # shifting the logits of a row changes nothing (it acts on probabilities), unlike matrix scaling
    shifted = logits + np.random.default_rng(0).normal(scale=5.0, size=(len(logits), 1))
    np.testing.assert_allclose(
        DirichletCalibration().fit(shifted, labels).transform(test), dirichlet.transform(test), atol=1e-6
    )
    exported = dirichlet.torch_module()(torch.as_tensor(test)).numpy()
    np.testing.assert_allclose(exported, dirichlet.transform(test), rtol=1e-9, atol=1e-12)


def test_dirichlet_cross_validation_picks_the_grid_point_of_least_held_out_nll(reference_data):
    data = reference_data("kumar_vgg16_c10.npz")
    logits, labels = data["logits_val"][:2000].astype(np.float64), data["labels_val"][:2000]
    fitted = DirichletCalibration(reg="cv").fit(logits, labels)
    assert len(fitted.cv_scores_) == len(DIRICHLET_CV_GRID)
    best = min(fitted.cv_scores_, key=fitted.cv_scores_.__getitem__)
    assert best == f"{fitted.reg_:g},{fitted.off_diagonal_reg_:g}"
    assert fitted.params["reg"] == "cv"
    again = calibrator_from_dict(fitted.to_dict())
    np.testing.assert_array_equal(again.transform(logits[:50]), fitted.transform(logits[:50]))
    with pytest.raises(InvalidInput, match="folds must be at least 2"):
        DirichletCalibration(reg="cv", folds=1)
    with pytest.raises(InvalidInput, match="reg must be one of"):
        DirichletCalibration(reg="grid")


def test_platt_is_binary_only():
    logits, labels = overconfident(50, 3, seed=24)
    with pytest.raises(InvalidInput, match="platt scaling is binary only; got 3 classes"):
        PlattScaling().fit(logits, labels)


@pytest.mark.parametrize(
    ("method", "label"),
    [
        ("vector", "vector scaling"),
        ("matrix", "matrix scaling"),
        ("platt", "platt scaling"),
        ("beta", "beta"),
        ("isotonic", "isotonic"),
        ("histogram", "histogram binning"),
        ("venn_abers", "venn-abers"),
    ],
)
def test_one_class_labels_are_refused_where_nothing_can_be_learnt(method, label):
    n_columns = 2 if method in BINARY_ONLY else 5
    logits, _ = overconfident(40, n_columns, seed=25)
    labels = np.full(40, 1 if method in BINARY_ONLY else 3)
    with pytest.raises(
        InvalidInput, match=rf"labels hold one class only \(class {labels[0]}\); {label} cannot"
    ):
        make_calibrator(method).fit(logits, labels)
    # Weights that zero out every other class count as one class too.
    mixed = np.arange(40) % 2
    with pytest.raises(InvalidInput, match=r"labels hold one class only \(class 1\)"):
        make_calibrator(method).fit(logits, mixed, sample_weight=mixed.astype(float))


def test_fit_input_errors_come_from_validation():
    with pytest.raises(InvalidInput, match=r"labels\[1\] = 7 is outside \[0, 3\)"):
        TemperatureScaling().fit(np.zeros((3, 3)), [0, 7, 1])
    with pytest.raises(InvalidInput, match=r"labels\[0\] = 2 is outside \[0, 2\)"):
        TemperatureScaling().fit(np.zeros((3, 1)), [2, 0, 1])
    with pytest.raises(InvalidInput, match="sample_weight sums to 0"):
        TemperatureScaling().fit(np.zeros((3, 3)), [0, 1, 2], sample_weight=[0, 0, 0])


def fitted_documents() -> dict[str, dict[str, Any]]:
    logits, labels = overconfident(120, 3, seed=26)
    binary_logits = logits[:, :1]
    binary_labels = two_class_labels(120, 2, seed=26)
    documents = {}
    for method in CALIBRATORS:
        if method in BINARY_ONLY:
            documents[method] = make_calibrator(method).fit(binary_logits, binary_labels).to_dict()
        else:
            documents[method] = make_calibrator(method).fit(logits, labels).to_dict()
    return documents


DOCUMENTS = fitted_documents()


def _without(mapping: dict, key: str) -> dict:
    return {k: v for k, v in mapping.items() if k != key}


def _with_params(document: dict, **changes: Any) -> dict:
    return {**document, "params": {**document["params"], **changes}}


MALFORMED = [
    ("no method", _without(DOCUMENTS["temperature"], "method"), "lacks 'method'"),
    ("unknown method", {**DOCUMENTS["temperature"], "method": "gamma"}, "unknown calibration method 'gamma'"),
    ("no params", _without(DOCUMENTS["vector"], "params"), "lacks 'params'"),
    ("no num_classes", _without(DOCUMENTS["vector"], "num_classes"), "lacks 'num_classes'"),
    ("num_classes 1", {**DOCUMENTS["vector"], "num_classes": 1}, "num_classes must be an integer >= 2"),
    ("num_classes str", {**DOCUMENTS["vector"], "num_classes": "3"}, "num_classes must be an integer >= 2"),
    ("params list", {**DOCUMENTS["vector"], "params": [1, 2]}, "params must be an object"),
    (
        "T zero",
        _with_params(_without(DOCUMENTS["temperature"], "temperature"), temperature=0.0),
        "must be > 0",
    ),
    ("T negative", {**DOCUMENTS["temperature"], "temperature": -1.0}, "must be > 0"),
    (
        "T nan",
        _with_params(_without(DOCUMENTS["temperature"], "temperature"), temperature=float("nan")),
        "finite",
    ),
    ("T inf", {**DOCUMENTS["temperature"], "temperature": float("inf")}, "finite"),
    (
        "T text",
        _with_params(_without(DOCUMENTS["temperature"], "temperature"), temperature="2"),
        "must be a number",
    ),
    ("T missing", _with_params(DOCUMENTS["temperature"]) | {"params": {}}, "params lacks 'temperature'"),
    ("T disagree", {**DOCUMENTS["temperature"], "temperature": 7.5}, "disagrees with params.temperature"),
    ("bad option", _with_params(DOCUMENTS["temperature"], bounds=[3.0, 1.0]), "T_min < T_max"),
    ("unknown param", _with_params(DOCUMENTS["temperature"], temp=2.0), "unknown keys 'temp'"),
    ("bias short", _with_params(DOCUMENTS["vector"], bias=[0.0, 0.0]), r"bias must have shape \(3,\)"),
    ("scale nan", _with_params(DOCUMENTS["vector"], scale=[1.0, None, 1.0]), "NaN or Inf"),
    ("weights shape", _with_params(DOCUMENTS["matrix"], weights=[[1.0, 0.0], [0.0, 1.0]]), r"shape \(3, 3\)"),
    ("weights ragged", _with_params(DOCUMENTS["matrix"], weights=[[1.0], [0.0, 1.0]]), "rectangular"),
    ("platt multi", {**DOCUMENTS["platt"], "num_classes": 3}, "binary only"),
    ("platt slope", _with_params(DOCUMENTS["platt"], slope=[1.0]), "slope must be a number"),
    ("isotonic count", _with_params(DOCUMENTS["isotonic"], x_thresholds=[[0.0, 1.0]]), "list of 3 lists"),
    (
        "isotonic unsorted",
        _with_params(DOCUMENTS["isotonic"], x_thresholds=[[1.0, 0.0]] * 3, y_thresholds=[[0.0, 1.0]] * 3),
        "must be sorted",
    ),
    (
        "isotonic length",
        _with_params(DOCUMENTS["isotonic"], x_thresholds=[[0.0, 1.0]] * 3, y_thresholds=[[0.5]] * 3),
        "equal length",
    ),
    (
        "histogram values",
        _with_params(DOCUMENTS["histogram"], bin_values=[[0.5]] * 3),
        "one entry per bin",
    ),
    (
        "histogram range",
        _with_params(DOCUMENTS["histogram"], bin_edges=[[0.0, 1.0]] * 3, bin_values=[[1.5]] * 3),
        r"must lie in \[0, 1\]",
    ),
    ("not a dict", [("method", "temperature")], "must be an object"),
    ("wrong class", {**DOCUMENTS["vector"], "method": "matrix"}, "unknown keys 'scale' for method 'matrix'"),
]


@pytest.mark.parametrize(("case", "document", "message"), MALFORMED, ids=[case for case, _, _ in MALFORMED])
def test_malformed_documents_are_refused(case, document, message):
    with pytest.raises(InvalidInput, match=message):
        calibrator_from_dict(document)


def test_from_dict_of_the_class_checks_the_method():
    with pytest.raises(InvalidInput, match="has method 'vector', expected 'temperature'"):
        TemperatureScaling.from_dict(DOCUMENTS["vector"])
    assert isinstance(VectorScaling.from_dict(DOCUMENTS["vector"]), VectorScaling)
